//! The masquerade bridges between the legacy pod network and kubeshift's: source
//! addresses are kept between the two, and kubeshift pods' traffic to anywhere else
//! leaves with the node's address.
//!
//! Flannel's FLANNEL-POSTRTG masquerades everything its pods send outside its network
//! (and everything foreign sent into it); Calico's natOutgoing masquerades what its
//! pools send to addresses outside all pools. Both would hide a legacy pod's address
//! from a kubeshift pod (and the other way round), and NetworkPolicy on either side
//! would then judge the node instead of the pod. Their rules are theirs (flanneld
//! rewrites its chain on restart), so kubeshift does not edit them. Instead its own
//! nftables table has a NAT chain on postrouting one priority ahead of iptables' nat
//! table (`srcnat - 1`) that maps traffic between the two networks to its own source
//! range. The kernel keeps the original address when it fits the range and is unique,
//! and a connection whose source NAT is settled skips every later NAT chain
//! (`nf_nat_inet_fn`), iptables-legacy's and iptables-nft's alike. So the legacy rules
//! stay as they are and no longer apply between the two networks; deleting the table
//! undoes it completely.
//!
//! The table is only kubeshift's: replaced as a whole in one `nft` transaction, never
//! merged with anything else, deleted by [`remove`].

use super::Cidr;
use anyhow::{Context, Result};
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix, Range};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::path::Path;

pub const TABLE: &str = "kubeshift";
const CHAIN: &str = "pod-network-bridge";
/// One ahead of iptables' nat POSTROUTING (`srcnat`, 100).
const PRIORITY: i32 = 99;

/// What the table is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridges {
    /// kubeshift's pod CIDR (all node ranges).
    pub kubeshift: Cidr,
    /// The legacy CNI's pod networks (Flannel's Network, Calico's IPPools).
    pub legacy: Vec<Cidr>,
}

fn payload(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed("ip"),
        field: Cow::Borrowed(field),
    })))
}

fn prefix(c: &Cidr) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(c.network().to_string()))),
        len: u32::from(c.len),
    }))
}

fn matches(field: &'static str, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left: payload(field), right, op })
}

/// `snat to <first>-<last of c>`: keeps a source inside `c` as it is.
fn snat_within(c: &Cidr) -> Statement<'static> {
    let last = std::net::Ipv4Addr::from(u32::from(c.network()) | !c.mask());
    Statement::SNAT(Some(NAT {
        addr: Some(Expression::Range(Box::new(Range {
            range: [
                Expression::String(Cow::Owned(c.network().to_string())),
                Expression::String(Cow::Owned(last.to_string())),
            ],
        }))),
        family: None,
        port: None,
        flags: None,
    }))
}

fn rule(expr: Vec<Statement<'static>>, comment: &str) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(expr),
        comment: Some(Cow::Owned(comment.to_string())),
        ..Default::default()
    })
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table { family: NfFamily::IP, name: Cow::Borrowed(TABLE), ..Default::default() })
}

/// The whole table, replacing any earlier version in the same transaction (add, then
/// delete, then add again: the delete cannot fail on a missing table).
pub fn ruleset(b: &Bridges) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    batch.add(table());
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(CHAIN),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    }));
    for l in &b.legacy {
        batch.add(rule(
            vec![
                matches("saddr", Operator::EQ, prefix(l)),
                matches("daddr", Operator::EQ, prefix(&b.kubeshift)),
                snat_within(l),
            ],
            "legacy pod to kubeshift pod: keep the source",
        ));
        batch.add(rule(
            vec![
                matches("saddr", Operator::EQ, prefix(&b.kubeshift)),
                matches("daddr", Operator::EQ, prefix(l)),
                snat_within(&b.kubeshift),
            ],
            "kubeshift pod to legacy pod: keep the source",
        ));
    }
    batch.add(rule(
        vec![
            matches("saddr", Operator::EQ, prefix(&b.kubeshift)),
            matches("daddr", Operator::EQ, prefix(&b.kubeshift)),
            snat_within(&b.kubeshift),
        ],
        "kubeshift pod to kubeshift pod: keep the source",
    ));
    // Anything else a kubeshift pod sends (other nodes, outside the cluster) leaves
    // with the node's address, as the legacy network's pods do.
    batch.add(rule(
        vec![matches("saddr", Operator::EQ, prefix(&b.kubeshift)), Statement::Masquerade(None)],
        "kubeshift pod to outside the pod networks: masquerade",
    ));
    batch.to_nftables()
}

fn nft_in(netns: Option<&Path>) -> (String, Vec<String>) {
    match netns {
        Some(ns) => ("nsenter".into(), vec![format!("--net={}", ns.display()), "nft".into()]),
        None => ("nft".into(), vec![]),
    }
}

/// Writes the table into the network namespace at `netns` (None: the agent's own).
pub fn apply(b: &Bridges, netns: Option<&Path>) -> Result<()> {
    let (prog, args) = nft_in(netns);
    nftables::helper::apply_ruleset_with_args(&ruleset(b), Some(&prog), &args)
        .with_context(|| format!("writing nftables table ip {TABLE} (the pod network bridges) with {prog} {args:?}"))
}

/// Whether the table is there (someone may have flushed the ruleset by hand).
pub fn present(netns: Option<&Path>) -> Result<bool> {
    let (prog, mut args) = nft_in(netns);
    args.extend(["list".into(), "table".into(), "ip".into(), TABLE.into()]);
    let out = std::process::Command::new(&prog).args(&args).output().with_context(|| format!("running {prog}"))?;
    Ok(out.status.success())
}

/// Deletes the table (absent already: fine).
pub fn remove(netns: Option<&Path>) -> Result<()> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    let (prog, args) = nft_in(netns);
    nftables::helper::apply_ruleset_with_args(&batch.to_nftables(), Some(&prog), &args)
        .with_context(|| format!("deleting nftables table ip {TABLE} with {prog} {args:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_replaces_itself_and_keeps_sources_between_the_networks() {
        let b = Bridges { kubeshift: "10.200.0.0/16".parse().unwrap(), legacy: vec!["10.244.0.0/16".parse().unwrap()] };
        let j = serde_json::to_value(ruleset(&b)).unwrap();
        let cmds = j["nftables"].as_array().unwrap();
        // add table, delete table, add table, add chain, then the rules.
        assert!(cmds[0]["add"]["table"].is_object() && cmds[1]["delete"]["table"].is_object(), "{j}");
        let chain = &cmds[3]["add"]["chain"];
        assert_eq!(
            (chain["type"].as_str(), chain["hook"].as_str(), chain["prio"].as_i64()),
            (Some("nat"), Some("postrouting"), Some(99))
        );
        let rules: Vec<&serde_json::Value> = cmds[4..].iter().map(|c| &c["add"]["rule"]).collect();
        assert_eq!(rules.len(), 4, "{j}");
        let first = serde_json::to_string(&rules[0]["expr"]).unwrap();
        assert!(first.contains("\"10.244.0.0\"") && first.contains("\"len\":16"), "{first}");
        assert!(first.contains("\"snat\":{\"addr\":{\"range\":[\"10.244.0.0\",\"10.244.255.255\"]}}"), "{first}");
        assert!(serde_json::to_string(&rules[3]["expr"]).unwrap().contains("masquerade"), "{j}");
    }
}
