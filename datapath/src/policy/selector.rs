//! Label selector matching as the API defines it: every `matchLabels` pair and every
//! `matchExpressions` requirement must hold; an empty selector matches everything.

use std::collections::BTreeMap;

use super::model::{LabelSelector, SelectorOp, SelectorRequirement};

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl SelectorRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOp::In => value.is_some_and(|v| self.values.contains(v)),
            // A pod without the key is "not in" any value set (same as the API server).
            SelectorOp::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOp::Exists => value.is_some(),
            SelectorOp::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: SelectorOp, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement { key: key.into(), operator, values: values.iter().map(|v| v.to_string()).collect() }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = LabelSelector::default();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s = LabelSelector { match_labels: labels(&[("app", "web"), ("tier", "front")]), ..Default::default() };
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "web"), ("env", "prod")]);
        assert!(req("app", SelectorOp::In, &["web", "db"]).matches(&l));
        assert!(!req("app", SelectorOp::In, &["db"]).matches(&l));
        assert!(!req("missing", SelectorOp::In, &["web"]).matches(&l));
        assert!(!req("app", SelectorOp::In, &[]).matches(&l));

        assert!(!req("app", SelectorOp::NotIn, &["web"]).matches(&l));
        assert!(req("app", SelectorOp::NotIn, &["db"]).matches(&l));
        assert!(req("missing", SelectorOp::NotIn, &["web"]).matches(&l));

        assert!(req("env", SelectorOp::Exists, &[]).matches(&l));
        assert!(!req("missing", SelectorOp::Exists, &[]).matches(&l));
        assert!(req("missing", SelectorOp::DoesNotExist, &[]).matches(&l));
        assert!(!req("env", SelectorOp::DoesNotExist, &[]).matches(&l));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req("env", SelectorOp::NotIn, &["dev"])],
        };
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "prod")])));
    }
}
