//! The runbook, rendered from real plans (the planner's `build_plan`) for a Flannel-like
//! and a Calico-like cluster: complete, every command accepted by kubeshift's own parser,
//! every internal link resolving.

use super::*;
use clap::Parser as _;
use kubeshift_planner::planning::{build_plan, PlanInput, PlanNodeInput};
use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};
use std::collections::{HashMap, HashSet};

fn node(name: &str, pool: &str, pods: usize) -> PlanNodeInput {
    PlanNodeInput { name: name.into(), pool: pool.into(), control_plane: pool == "control-plane", evictable_pods: pods }
}

/// A canary and two pools (the planner takes the canary from the quieter pool), and
/// the control plane last.
fn flannel_plan() -> Plan {
    build_plan(&PlanInput {
        name: "flannel-lab".into(),
        fingerprint: "sha1:f1a77e1".into(),
        cluster_name: Some("lab-flannel".into()),
        legacy_cni: Some("flannel".into()),
        kube_proxy_mode: Some("iptables".into()),
        nodes: vec![
            node("lab-cp", "control-plane", 0),
            node("lab-blue-1", "blue", 4),
            node("lab-blue-2", "blue", 6),
            node("lab-green-1", "green", 20),
            node("lab-green-2", "green", 25),
        ],
        used_cidrs: vec!["10.244.0.0/16".into(), "10.96.0.0/12".into()],
        service_cidr: Some("10.96.0.0/12".into()),
        max_unavailable: 1,
        ..Default::default()
    })
    .unwrap()
}

fn calico_plan() -> Plan {
    build_plan(&PlanInput {
        name: "calico-lab".into(),
        fingerprint: "sha1:ca11c0".into(),
        legacy_cni: Some("calico".into()),
        kube_proxy_mode: Some("iptables".into()),
        nodes: vec![
            node("cp-1", "control-plane", 0),
            node("ip-10-0-1-7.ec2.internal", "general", 3),
            node("ip-10-0-1-8.ec2.internal", "general", 8),
            node("ip-10-0-1-9.ec2.internal", "general", 5),
            node("batch-a", "batch", 40),
            node("batch-b", "batch", 30),
        ],
        used_cidrs: vec!["192.168.0.0/16".into(), "10.96.0.0/12".into()],
        service_cidr: Some("10.96.0.0/12".into()),
        max_unavailable: 2,
        pool_disruption_limit: [("batch".to_string(), 1)].into_iter().collect(),
        ..Default::default()
    })
    .unwrap()
}

fn plans() -> Vec<Plan> {
    let plans = vec![flannel_plan(), calico_plan()];
    for p in &plans {
        let waves: Vec<&str> = p.waves.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(waves.first(), Some(&"canary"), "{waves:?}");
        assert!(waves.len() >= 4, "canary, two pools, control plane: {waves:?}");
    }
    plans
}

fn input(findings: Option<Vec<Finding>>) -> RunbookInput {
    RunbookInput {
        plan_file: "plan.yaml".into(),
        findings_file: findings.as_ref().map(|_| PathBuf::from("analysis.json")),
        findings,
    }
}

fn markdown(plan: &Plan, findings: Option<Vec<Finding>>) -> String {
    render(plan, &input(findings), Format::Markdown, &load_templates(None).unwrap()).unwrap()
}

/// The lines of fenced code blocks.
fn code_lines(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for ev in Parser::new_ext(md, markdown_options()) {
        match ev {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) => in_code = true,
            Event::End(TagEnd::CodeBlock) => in_code = false,
            Event::Text(t) if in_code => out.extend(t.lines().map(|l| l.trim().to_string())),
            _ => {}
        }
    }
    out
}

/// Splits a command line as a POSIX shell would for the commands kubeshift's documents
/// show: words, single and double quotes (variables stay unexpanded), backslash escapes;
/// the command ends at a redirection, a pipe or a list operator.
pub(crate) fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', None) => {
                cur.extend(chars.next());
                has_word = true;
            }
            ('\'' | '"', None) => {
                quote = Some(c);
                has_word = true;
            }
            (c, Some(q)) if c == q => quote = None,
            (c, None) if c.is_whitespace() => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            ('>' | '|' | '&' | ';', None) => break,
            (c, _) => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line:?}");
    if has_word {
        words.push(cur);
    }
    words
}

#[test]
fn every_command_in_the_runbook_is_accepted_by_kubeshifts_parser() {
    for plan in plans() {
        for findings in [None, Some(vec![])] {
            let md = markdown(&plan, findings);
            let commands: Vec<String> = code_lines(&md).into_iter().filter(|l| l.starts_with("kubeshift ")).collect();
            for c in &commands {
                if let Err(e) = crate::Cli::try_parse_from(shell_words(c)) {
                    panic!("{}: the runbook's command {c:?} does not parse:\n{e}", plan.metadata.name);
                }
            }
            // The ones the window depends on, with the plan's own names in them.
            for want in [
                "kubeshift migrate check --plan plan.yaml".to_string(),
                "kubeshift node report --out node-report.json".to_string(),
                "kubeshift connectivity test --save before.json --junit baseline.xml".to_string(),
                "kubeshift migrate rollback --all --yes".to_string(),
                format!("kubeshift migrate apply -f plan.yaml --wave {} --junit wave-{0}.xml", plan.waves[0].name),
            ] {
                assert!(commands.contains(&want), "{}: no {want:?} in a code block", plan.metadata.name);
            }
            // The hand-run gate probes the node against another one (policy scenarios
            // need two), the next in the plan while there is one.
            let order: Vec<&str> =
                plan.waves.iter().flat_map(|w| &w.batches).flat_map(|b| &b.nodes).map(|n| n.name.as_str()).collect();
            for (i, n) in order.iter().enumerate() {
                let peer = order.get(i + 1).unwrap_or(&order[0]);
                let want = format!("kubeshift connectivity test --node {n} --node {peer} --junit gate-{n}.xml");
                assert!(commands.contains(&want), "no {want:?}");
            }
            let rollback_cmds = plan
                .all_steps()
                .filter(|(_, _, s)| s.id.ends_with("/uncordon"))
                .map(|(_, n, _)| {
                    let cmd = format!("kubeshift migrate rollback --node {} --yes", n.name);
                    commands.iter().filter(|c| **c == cmd).count()
                })
                .sum::<usize>();
            let points = plan.all_steps().filter(|(_, _, s)| s.rollback_point).count();
            assert_eq!(rollback_cmds, points, "one rollback command per rollback point");
        }
    }
}

#[test]
fn the_parser_check_is_not_vacuous() {
    // Would the test above notice a command kubeshift does not have?
    for bad in ["kubeshift migrate rollback --node x --force", "kubeshift migrate aply -f plan.yaml"] {
        assert!(crate::Cli::try_parse_from(shell_words(bad)).is_err(), "{bad}");
    }
    assert_eq!(shell_words("kubeshift migrate plan -o json > a.json"), ["kubeshift", "migrate", "plan", "-o", "json"]);
    assert_eq!(shell_words("kubeshift x -f 'my plan.yaml'"), ["kubeshift", "x", "-f", "my plan.yaml"]);
    assert_eq!(shell_words(r#"kubeshift x --node "$node" --yes"#), ["kubeshift", "x", "--node", "$node", "--yes"]);
}

#[test]
fn every_node_and_every_rollback_point_has_its_place() {
    for plan in plans() {
        let md = markdown(&plan, None);
        let headings = headings(&md);
        for (w_i, w) in plan.waves.iter().enumerate() {
            assert!(
                headings.contains(&format!("Wave {}: {}", w_i + 1, w.name)),
                "{}: no heading for wave {}",
                plan.metadata.name,
                w.name
            );
        }
        let mut current_node = None;
        let mut node_sections: HashMap<String, String> = HashMap::new();
        for line in md.lines() {
            if let Some(n) = line.strip_prefix("#### Node ") {
                current_node = Some(n.to_string());
            } else if line.starts_with("#") {
                current_node = None;
            } else if let Some(n) = &current_node {
                node_sections.entry(n.clone()).or_default().push_str(&format!("{line}\n"));
            }
        }
        for (_, n, s) in plan.all_steps() {
            let section = node_sections.get(&n.name).unwrap_or_else(|| panic!("no section for node {}", n.name));
            assert!(section.contains(&format!("`{}`", s.id)), "node {}: step {} missing", n.name, s.id);
            if s.rollback_point {
                let at = section
                    .find(&format!("Rollback point `{}`", s.id))
                    .unwrap_or_else(|| panic!("node {}: rollback point {} not marked", n.name, s.id));
                let cmd = format!("kubeshift migrate rollback --node {} --yes", n.name);
                assert!(section[at..].contains(&cmd), "node {}: no rollback command after {}", n.name, s.id);
            }
        }
        assert_eq!(node_sections.len(), plan.estimates.nodes, "{}: one section per node", plan.metadata.name);
        assert!(md.contains(&plan.cluster.fingerprint));
        assert!(!md.contains("this template does not describe"), "every phase has its text");
    }
}

fn headings(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for ev in Parser::new_ext(md, markdown_options()) {
        match ev {
            Event::Start(Tag::Heading { .. }) => cur = Some(String::new()),
            Event::Text(t) | Event::Code(t) if cur.is_some() => cur.as_mut().unwrap().push_str(&t),
            Event::End(TagEnd::Heading(_)) => out.push(cur.take().unwrap()),
            _ => {}
        }
    }
    out
}

fn internal_links(md: &str) -> Vec<String> {
    Parser::new_ext(md, markdown_options())
        .filter_map(|ev| match ev {
            Event::Start(Tag::Link { dest_url, .. }) => dest_url.strip_prefix('#').map(str::to_string),
            _ => None,
        })
        .collect()
}

#[test]
fn the_markdown_parses_and_every_internal_link_resolves() {
    for plan in plans() {
        for findings in [None, Some(vec![])] {
            let md = markdown(&plan, findings);
            let mut seen = HashMap::new();
            let anchors: HashSet<String> = headings(&md).iter().map(|h| unique_slug(h, &mut seen)).collect();
            let links = internal_links(&md);
            // Contents, go/no-go, every wave's node list.
            assert!(links.len() > plan.estimates.nodes + plan.waves.len(), "{links:?}");
            for l in &links {
                assert!(anchors.contains(l), "{}: link #{l} has no heading; anchors: {anchors:?}", plan.metadata.name);
            }
            // Every fenced block closed: an unclosed one would swallow the rest.
            assert!(headings(&md).iter().any(|h| h == "Communication checklist"));
        }
    }
}

#[test]
fn a_broken_link_is_noticed() {
    let md = "# One\n\n[ok](#one) [bad](#two)\n";
    let mut seen = HashMap::new();
    let anchors: HashSet<String> = headings(md).iter().map(|h| unique_slug(h, &mut seen)).collect();
    let broken: Vec<String> = internal_links(md).into_iter().filter(|l| !anchors.contains(l)).collect();
    assert_eq!(broken, ["two"]);
    assert_eq!(slug("Wave 1: canary"), "wave-1-canary");
    assert_eq!(slug("Node ip-10-0-1-7.ec2.internal"), "node-ip-10-0-1-7ec2internal");
    assert_eq!(slug("Go / no-go"), "go--no-go");
}

fn finding(severity: Severity, subject: &str, message: &str) -> Finding {
    Finding { severity, subject: subject.into(), message: message.into() }
}

#[test]
fn findings_are_listed_blockers_first_and_make_it_a_no_go() {
    let plan = calico_plan();
    let findings = vec![
        finding(Severity::Attention, "networkpolicy/demo/egress-cidr", "ipBlock covers the old pod CIDR"),
        finding(Severity::Info, "cni", "Calico in VXLAN mode"),
        finding(Severity::Blocker, "node/batch-a", "kernel 4.19 is older than 5.10"),
        finding(Severity::Blocker, "globalnetworkpolicy/deny-all", "Calico GlobalNetworkPolicy with | in it"),
    ];
    let md = markdown(&plan, Some(findings.clone()));
    let pos = |s: &str| md.find(s).unwrap_or_else(|| panic!("{s} not in the runbook"));
    assert!(pos("`node/batch-a`") < pos("`networkpolicy/demo/egress-cidr`"));
    assert!(pos("`globalnetworkpolicy/deny-all`") < pos("`networkpolicy/demo/egress-cidr`"));
    assert!(md.contains("2 blocker(s)"));
    assert!(md.contains("no-go until each is fixed"));
    // A `|` in a message must not split the table row.
    let row = md.lines().find(|l| l.contains("globalnetworkpolicy/deny-all")).unwrap();
    assert!(row.contains(r"with \| in it"), "{row}");
    assert!(!md.contains("The plan file does not carry"));

    let none = markdown(&plan, None);
    assert!(none.contains("The plan file does not carry the analysis' findings"));
    let cmds = code_lines(&none);
    assert!(cmds.iter().any(|c| c == "kubeshift migrate plan"), "tells the reader to run the planner");
    assert!(none.contains("legacy CNI calico"), "and lists what the plan has");
}

#[test]
fn findings_are_read_from_migrate_plan_json_and_checked_against_the_plan() {
    let plan = flannel_plan();
    let dir = std::env::temp_dir().join(format!("kubeshift-runbook-findings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "inventory": {},
        "analysis": {"findings": [{"severity": "blocker", "subject": "node/x", "message": "no BTF"}],
                     "policies": [], "readiness": [], "ruleDiffs": []},
        "plan": plan,
    });
    let ok = dir.join("ok.json");
    std::fs::write(&ok, json.to_string()).unwrap();
    let f = read_findings(&ok, &plan).unwrap();
    assert_eq!(f, vec![finding(Severity::Blocker, "node/x", "no BTF")]);

    let other = dir.join("other.json");
    let mut j = json.clone();
    j["plan"]["cluster"]["fingerprint"] = "sha1:0ther".into();
    std::fs::write(&other, j.to_string()).unwrap();
    let e = read_findings(&other, &plan).unwrap_err().to_string();
    assert!(e.contains("other.json") && e.contains("sha1:0ther"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn html_has_the_headings_the_links_point_to() {
    let plan = flannel_plan();
    let html = render(&plan, &input(None), Format::Html, &load_templates(None).unwrap()).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<title>Runbook: flannel-lab</title>"));
    assert!(html.contains("<table>"), "tables rendered");
    let md = markdown(&plan, None);
    for l in internal_links(&md) {
        assert!(html.contains(&format!(" id=\"{l}\"")), "no element with id {l} in the HTML");
        assert!(html.contains(&format!("href=\"#{l}\"")));
    }
    // Commands stay verbatim (escaped, not interpreted) in the HTML.
    assert!(html.contains("kubeshift migrate rollback --node lab-cp --yes"));
}

#[test]
fn templates_can_be_overridden_and_typos_in_them_fail() {
    let plan = flannel_plan();
    let dir = std::env::temp_dir().join(format!("kubeshift-runbook-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("runbook.md.j2"),
        "# {{ plan.metadata.name }}\n{% for w in waves %}{{ w.name }} {% endfor %}\n",
    )
    .unwrap();
    let t = load_templates(Some(&dir)).unwrap();
    let md = render(&plan, &input(None), Format::Markdown, &t).unwrap();
    // trim_blocks eats the newline after the last block tag.
    assert_eq!(md, "# flannel-lab\ncanary pool-blue pool-green control-plane ");
    // The HTML wrapper not given stays kubeshift's.
    assert!(render(&plan, &input(None), Format::Html, &t).unwrap().contains("<h1 id=\"flannel-lab\">"));

    std::fs::write(dir.join("runbook.md.j2"), "{{ plan.metadata.nmae }}\n").unwrap();
    let e = render(&plan, &input(None), Format::Markdown, &load_templates(Some(&dir)).unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("runbook.md.j2"), "{e:#}");

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(load_templates(Some(&empty)).unwrap_err().to_string().contains("none of runbook.md.j2"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn odd_plan_paths_are_quoted_in_the_commands() {
    let plan = flannel_plan();
    let md = render(
        &plan,
        &RunbookInput { plan_file: "my plans/it's.yaml".into(), findings: None, findings_file: None },
        Format::Markdown,
        &load_templates(None).unwrap(),
    )
    .unwrap();
    let check = code_lines(&md).into_iter().find(|l| l.starts_with("kubeshift migrate check")).unwrap();
    assert_eq!(shell_words(&check), ["kubeshift", "migrate", "check", "--plan", "my plans/it's.yaml"]);
}

#[test]
fn html_renders_the_checklist_as_checkboxes() {
    let html = render(&flannel_plan(), &input(None), Format::Html, &load_templates(None).unwrap()).unwrap();
    assert!(html.matches("type=\"checkbox\"").count() >= 6, "the communication checklist has boxes to tick");
}

#[test]
fn nodes_that_move_together_are_said_to() {
    // max-unavailable 2: the general pool's two remaining nodes form one batch.
    let plan = calico_plan();
    let wave = plan.waves.iter().find(|w| w.name == "pool-general").unwrap();
    assert_eq!(wave.batches.len(), 1);
    let names: Vec<&str> = wave.batches[0].nodes.iter().map(|n| n.name.as_str()).collect();
    let md = markdown(&plan, None);
    assert!(md.contains(&format!("Batch 1 of 1: {} (at once", names.join(", "))), "{names:?}");
}
