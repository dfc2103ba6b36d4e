//! Structural pass over `iptables-save` output: tables, chain declarations
//! and rules, with every integrity error tied to a line.

use super::lexer::{parse_rule, tokenize, Rule, Tok};
use super::{ParseError, ParseErrorKind};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash-style hasher: chain names are short ASCII, the map is hit for every
/// line of a huge dump, and SipHash's DoS resistance buys nothing here.
#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            h = (h.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            h = (h.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
        self.0 = h;
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, BuildHasherDefault<FastHasher>>;

/// Chains whose rules the model reads. Other chains only get counted, which
/// keeps memory flat for clusters whose CNI writes more rules than kube-proxy.
pub(crate) fn is_kube_chain(name: &str) -> bool {
    name.starts_with("KUBE-")
}

pub(crate) struct Chain<'a> {
    pub name: &'a str,
    pub builtin: bool,
    pub rule_count: usize,
    /// Range in `Table::rules`; only KUBE-* chains have their rules kept.
    start: u32,
    len: u32,
}

/// A chain with its rules, as the model builder reads it.
#[derive(Clone, Copy)]
pub(crate) struct ChainRef<'t, 'a> {
    pub name: &'a str,
    pub rules: &'t [Rule<'a>],
}

pub(crate) struct Table<'a> {
    pub name: &'a str,
    pub chains: Vec<Chain<'a>>,
    pub index: FastMap<&'a str, usize>,
    /// All kept rules of the table in one allocation, grouped by chain after
    /// `finish()`. One vector instead of one per chain: most KUBE-SEP chains
    /// hold two rules, and per-chain vectors doubled the memory.
    rules: Vec<Rule<'a>>,
    rule_chain: Vec<u32>,
}

impl<'a> Table<'a> {
    pub fn empty(name: &'a str) -> Self {
        Table { name, chains: Vec::new(), index: FastMap::default(), rules: Vec::new(), rule_chain: Vec::new() }
    }

    fn view(&self, c: &Chain<'a>) -> ChainRef<'_, 'a> {
        ChainRef { name: c.name, rules: &self.rules[c.start as usize..(c.start + c.len) as usize] }
    }

    pub fn chain(&self, name: &str) -> Option<ChainRef<'_, 'a>> {
        self.index.get(name).map(|&i| self.view(&self.chains[i]))
    }

    pub fn chain_refs(&self) -> impl Iterator<Item = ChainRef<'_, 'a>> {
        self.chains.iter().map(|c| self.view(c))
    }

    /// Sets each chain's rule range. iptables-save writes a chain's rules
    /// together, so this is one pass; a hand-edited dump with interleaved
    /// chains gets a stable sort first (rule order within a chain matters).
    fn finish(&mut self) {
        let contiguous = {
            let mut seen = vec![false; self.chains.len()];
            let mut prev = u32::MAX;
            self.rule_chain.iter().all(|&c| {
                if c == prev {
                    return true;
                }
                prev = c;
                !std::mem::replace(&mut seen[c as usize], true)
            })
        };
        if !contiguous {
            // Sort a permutation, not the rules: they are large to move.
            let mut order: Vec<u32> = (0..self.rules.len() as u32).collect();
            order.sort_by_key(|&i| self.rule_chain[i as usize]);
            let mut old = std::mem::take(&mut self.rules);
            let mut rules = Vec::with_capacity(old.len());
            let mut chain_of = Vec::with_capacity(old.len());
            for i in order {
                rules.push(std::mem::take(&mut old[i as usize]));
                chain_of.push(self.rule_chain[i as usize]);
            }
            self.rules = rules;
            self.rule_chain = chain_of;
        }
        let mut i = 0;
        while i < self.rule_chain.len() {
            let c = self.rule_chain[i];
            let start = i;
            while i < self.rule_chain.len() && self.rule_chain[i] == c {
                i += 1;
            }
            self.chains[c as usize].start = start as u32;
            self.chains[c as usize].len = (i - start) as u32;
        }
        self.rule_chain = Vec::new();
    }
}

pub(crate) struct Dump<'a> {
    pub tables: Vec<Table<'a>>,
    /// `# Warning: iptables-legacy tables present` and similar lines the nft
    /// backend prints: they mean part of the ruleset lives elsewhere.
    pub warnings: Vec<String>,
    pub generated_by: Option<&'a str>,
}

impl<'a> Dump<'a> {
    pub fn table(&self, name: &str) -> Option<&Table<'a>> {
        self.tables.iter().find(|t| t.name == name)
    }
}

const STANDARD_TARGETS: &[&str] = &["ACCEPT", "DROP", "RETURN", "QUEUE"];

pub(crate) fn parse_dump<'a>(input_name: &str, text: &'a str) -> Result<Dump<'a>, ParseError> {
    let err = |line: usize, kind: ParseErrorKind| ParseError { input: input_name.to_string(), line, kind };
    let mut dump = Dump { tables: Vec::new(), warnings: Vec::new(), generated_by: None };
    // (table, line where it was opened)
    let mut open: Option<(Table<'a>, usize)> = None;
    let mut seen_tables: Vec<(&'a str, usize)> = Vec::new();
    let mut toks: Vec<Tok<'a>> = Vec::with_capacity(32);
    let mut last_chain: Option<(&'a str, usize)> = None;

    for (idx, raw) in text.split('\n').enumerate() {
        let lineno = idx + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        let first = trimmed.as_bytes()[0];
        match first {
            b'#' => {
                let c = trimmed[1..].trim();
                if let Some(w) = c.strip_prefix("Warning:") {
                    dump.warnings.push(w.trim().to_string());
                } else if let Some(g) = c.strip_prefix("Generated by ") {
                    dump.generated_by = Some(g.split(" on ").next().unwrap_or(g));
                }
            }
            b'*' => {
                if let Some((t, at)) = &open {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure(format!(
                            "table {} (opened at line {at}) is not closed by COMMIT before the next table",
                            t.name
                        )),
                    ));
                }
                let name = trimmed[1..].trim();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(err(lineno, ParseErrorKind::Structure(format!("malformed table line `{trimmed}`"))));
                }
                if let Some((_, prev)) = seen_tables.iter().find(|(n, _)| *n == name) {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure(format!(
                            "table {name} appears twice (first at line {prev}); was the output of two iptables-save runs concatenated?"
                        )),
                    ));
                }
                seen_tables.push((name, lineno));
                last_chain = None;
                let mut table = Table::empty(name);
                // Reserve once for the whole table (its line count bounds its
                // rule count) instead of doubling a ~100 MB vector several times.
                let offset = raw.as_ptr() as usize - text.as_ptr() as usize;
                let rest = &text[offset..];
                let span = memchr::memmem::find(rest.as_bytes(), b"\nCOMMIT").map_or(rest, |end| &rest[..end]);
                let lines = memchr::memchr_iter(b'\n', span.as_bytes()).count();
                table.rules.reserve(lines);
                table.rule_chain.reserve(lines);
                // kube-proxy dumps have about one chain per three lines.
                table.chains.reserve(lines / 3);
                table.index.reserve(lines / 3);
                open = Some((table, lineno));
            }
            b':' => {
                let Some((t, _)) = open.as_mut() else {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure("chain declaration before any `*table` line".into()),
                    ));
                };
                let mut parts = trimmed[1..].split_ascii_whitespace();
                let name = parts.next().unwrap_or("");
                let policy = parts.next();
                if name.is_empty() || policy.is_none() {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure(format!("malformed chain declaration `{trimmed}`")),
                    ));
                }
                let builtin = policy != Some("-");
                if t.index.contains_key(name) {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure(format!("chain {name} declared twice in table {}", t.name)),
                    ));
                }
                t.index.insert(name, t.chains.len());
                t.chains.push(Chain { name, builtin, rule_count: 0, start: 0, len: 0 });
            }
            b'-' => {
                let Some((t, _)) = open.as_mut() else {
                    return Err(err(lineno, ParseErrorKind::Structure("rule before any `*table` line".into())));
                };
                let rest = trimmed
                    .strip_prefix("-A ")
                    .or_else(|| trimmed.strip_prefix("--append "))
                    .ok_or_else(|| {
                        err(
                            lineno,
                            ParseErrorKind::Structure(format!(
                                "unsupported rule command `{}` (iptables-save only writes -A)",
                                trimmed.split(' ').next().unwrap_or("")
                            )),
                        )
                    })?
                    .trim_start();
                let (chain_name, opts) = match rest.find([' ', '\t']) {
                    Some(p) => (&rest[..p], &rest[p + 1..]),
                    None => (rest, ""),
                };
                if chain_name.is_empty() {
                    return Err(err(lineno, ParseErrorKind::Structure("-A without a chain name".into())));
                }
                // iptables-save groups rules by chain, so the previous line's
                // chain is almost always this one: skip the hash lookup then.
                let cached = match last_chain {
                    Some((name, i)) if name == chain_name => Some(i),
                    _ => t.index.get(chain_name).copied(),
                };
                let Some(ci) = cached else {
                    return Err(err(
                        lineno,
                        ParseErrorKind::Structure(format!(
                            "rule appended to chain {chain_name}, which is not declared in table {}",
                            t.name
                        )),
                    ));
                };
                tokenize(opts, &mut toks).map_err(|m| err(lineno, ParseErrorKind::Rule(m)))?;
                let rule = parse_rule(&toks, lineno as u32).map_err(|m| err(lineno, ParseErrorKind::Rule(m)))?;
                // A jump to a KUBE chain that does not exist cannot come from a
                // real kernel dump: it means the dump was edited or mangled.
                if let Some(target) = rule.target {
                    if is_kube_chain(target) && !t.index.contains_key(target) && !STANDARD_TARGETS.contains(&target) {
                        return Err(err(
                            lineno,
                            ParseErrorKind::Structure(format!(
                                "rule jumps to chain {target}, which is not declared in table {}",
                                t.name
                            )),
                        ));
                    }
                }
                last_chain = Some((chain_name, ci));
                let chain = &mut t.chains[ci];
                chain.rule_count += 1;
                if is_kube_chain(chain.name) {
                    t.rules.push(rule);
                    t.rule_chain.push(ci as u32);
                }
            }
            _ if trimmed == "COMMIT" || trimmed.starts_with("COMMIT ") => {
                let Some((mut t, _)) = open.take() else {
                    return Err(err(lineno, ParseErrorKind::Structure("COMMIT without an open table".into())));
                };
                t.finish();
                dump.tables.push(t);
            }
            _ => {
                let shown: String = trimmed.chars().take(60).collect();
                return Err(err(lineno, ParseErrorKind::Structure(format!("unrecognised line `{shown}`"))));
            }
        }
    }
    if let Some((t, at)) = open {
        return Err(err(
            at,
            ParseErrorKind::Structure(format!(
                "table {} is not closed by COMMIT before the end of the input (truncated dump?)",
                t.name
            )),
        ));
    }
    Ok(dump)
}
