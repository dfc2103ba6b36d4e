//! How a run is shown: a terminal summary, JUnit XML for CI, and JSON.

use crate::suite::SuiteReport;
use std::fmt::Write;

pub fn text(r: &SuiteReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "connectivity test on nodes {} ({:.1}s)", r.nodes.join(", "), r.seconds);
    for sc in &r.scenarios {
        let mark = if sc.skipped.is_some() {
            "SKIP"
        } else if sc.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        let _ = writeln!(
            s,
            "  {mark} {:<28} {:>2} checks, slowest {:>7.1} ms  {}",
            sc.name, sc.checks, sc.max_ms, sc.description
        );
        if let Some(why) = &sc.skipped {
            let _ = writeln!(s, "       skipped: {why}");
        }
        for f in &sc.failures {
            let _ = writeln!(s, "       {} -> {} ({}): {}", f.from, f.to, f.address, f.detail);
        }
    }
    let allowed = r.matrix.entries.values().filter(|v| **v == crate::model::Verdict::Allowed).count();
    let _ = writeln!(
        s,
        "  verdict matrix: {} pairs, {} allowed, {} denied",
        r.matrix.entries.len(),
        allowed,
        r.matrix.entries.len() - allowed
    );
    if let Some(ch) = &r.changes {
        if ch.is_empty() {
            let _ = writeln!(s, "  compared with the saved matrix: no verdict changed");
        } else {
            let _ = writeln!(s, "  compared with the saved matrix: {} verdicts changed", ch.len());
            for c in ch {
                let f = |v: Option<crate::model::Verdict>| v.map(|v| v.to_string()).unwrap_or_else(|| "absent".into());
                let _ = writeln!(s, "       {}: {} -> {}", c.pair, f(c.before), f(c.after));
            }
        }
    }
    let failed = r.scenarios.iter().filter(|s| !s.failures.is_empty()).count();
    let skipped = r.scenarios.iter().filter(|s| s.skipped.is_some()).count();
    let _ = writeln!(s, "{} passed, {} failed, {} skipped", r.scenarios.len() - failed - skipped, failed, skipped);
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn junit(r: &SuiteReport) -> String {
    let failed = r.scenarios.iter().filter(|s| !s.failures.is_empty()).count();
    let skipped = r.scenarios.iter().filter(|s| s.skipped.is_some()).count();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(s, "<testsuites><testsuite name=\"kubeshift-connectivity\" tests=\"{}\" failures=\"{failed}\" skipped=\"{skipped}\" time=\"{:.3}\">", r.scenarios.len(), r.seconds);
    for sc in &r.scenarios {
        let _ = write!(
            s,
            "  <testcase classname=\"connectivity\" name=\"{}\" time=\"{:.3}\">",
            esc(&sc.name),
            sc.max_ms / 1000.0
        );
        if let Some(why) = &sc.skipped {
            let _ = write!(s, "<skipped message=\"{}\"/>", esc(why));
        }
        if !sc.failures.is_empty() {
            let body: Vec<String> =
                sc.failures.iter().map(|f| format!("{} -> {} ({}): {}", f.from, f.to, f.address, f.detail)).collect();
            let _ = write!(
                s,
                "<failure message=\"{} of {} checks failed\">{}</failure>",
                sc.failures.len(),
                sc.checks,
                esc(&body.join("\n"))
            );
        }
        s.push_str("</testcase>\n");
    }
    s.push_str("</testsuite></testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{Failure, ScenarioOutcome};

    #[test]
    fn junit_marks_failures_and_escapes() {
        let r = SuiteReport {
            nodes: vec!["n1".into()],
            scenarios: vec![
                ScenarioOutcome {
                    name: "ok".into(),
                    description: String::new(),
                    checks: 1,
                    failures: vec![],
                    skipped: None,
                    max_ms: 1.0,
                },
                ScenarioOutcome {
                    name: "bad".into(),
                    description: String::new(),
                    checks: 2,
                    failures: vec![Failure {
                        from: "n1/pod-1".into(),
                        to: "svc<x>".into(),
                        address: "1.2.3.4:80/tcp".into(),
                        detail: "timeout".into(),
                    }],
                    skipped: None,
                    max_ms: 2.0,
                },
            ],
            matrix: crate::model::Matrix::new(),
            changes: None,
            seconds: 1.0,
        };
        let x = junit(&r);
        assert!(x.contains("tests=\"2\" failures=\"1\" skipped=\"0\""));
        assert!(x.contains("svc&lt;x&gt;"));
        assert!(text(&r).contains("1 passed, 1 failed, 0 skipped"));
    }
}
