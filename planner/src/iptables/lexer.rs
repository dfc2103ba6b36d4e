//! Line-level lexing and rule decoding for `iptables-save` output.
//!
//! Hand-written instead of regex: a 700,000-line dump must parse in well under
//! two seconds, and every token borrows from the input so the only allocations
//! per rule are the rule itself and the (rare) comment with escapes.

use std::borrow::Cow;

/// One whitespace-separated token. Quoted tokens are always values, even when
/// their text starts with `-`, so they are kept apart from bare words.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok<'a> {
    Word(&'a str),
    Quoted(Cow<'a, str>),
}

impl<'a> Tok<'a> {
    fn is_option(&self) -> bool {
        matches!(self, Tok::Word(w) if w.starts_with('-') && w.len() > 1)
    }
}

/// Splits a rule line the way iptables-save quotes it (xtables_save_string):
/// a value is wrapped in double quotes when it contains blanks or quotes, and
/// inside quotes only `\"` and `\\` are escaped.
pub(crate) fn tokenize<'a>(line: &'a str, out: &mut Vec<Tok<'a>>) -> Result<(), String> {
    out.clear();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        if b[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            let mut escaped = false;
            loop {
                if j >= b.len() {
                    return Err("unterminated quoted string".into());
                }
                match b[j] {
                    b'\\' if j + 1 < b.len() => {
                        escaped = true;
                        j += 2;
                    }
                    b'"' => break,
                    _ => j += 1,
                }
            }
            let raw = &line[start..j];
            let val = if escaped {
                let mut s = String::with_capacity(raw.len());
                let mut it = raw.chars();
                while let Some(c) = it.next() {
                    if c == '\\' {
                        if let Some(n) = it.next() {
                            s.push(n);
                        }
                    } else {
                        s.push(c);
                    }
                }
                Cow::Owned(s)
            } else {
                Cow::Borrowed(raw)
            };
            out.push(Tok::Quoted(val));
            i = j + 1;
            if i < b.len() && b[i] != b' ' && b[i] != b'\t' {
                return Err("quoted string runs into the next token".into());
            }
        } else {
            let start = i;
            while i < b.len() && b[i] != b' ' && b[i] != b'\t' {
                i += 1;
            }
            out.push(Tok::Word(&line[start..i]));
        }
    }
    Ok(())
}

/// A match value with its `!` negation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Neg<'a> {
    pub negated: bool,
    pub value: &'a str,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Recent<'a> {
    pub name: Option<&'a str>,
    pub rcheck: bool,
    pub set: bool,
    pub seconds: Option<u32>,
}

/// The parts of one `-A` rule that kube-proxy's rule shapes depend on.
/// Everything else (interfaces, conntrack states, physdev …) is skipped but
/// still syntax-checked for the value count. Fields most rules lack live in
/// `extra` so that the 700,000 rules of a big dump stay small.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rule<'a> {
    pub line: u32,
    pub src: Option<Neg<'a>>,
    pub dst: Option<Neg<'a>>,
    pub proto: Option<&'a str>,
    pub dport: Option<&'a str>,
    pub target: Option<&'a str>,
    pub to_destination: Option<&'a str>,
    pub comment: Option<Cow<'a, str>>,
    pub probability: Option<f64>,
    pub extra: Option<Box<Extra<'a>>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Extra<'a> {
    pub recent: Option<Recent<'a>>,
    pub src_type: Option<Neg<'a>>,
    pub dst_type: Option<Neg<'a>>,
    pub mark_match: Option<Neg<'a>>,
    /// (option, value) of the MARK target, e.g. (`--or-mark`, `0x4000`).
    pub set_mark: Option<(&'a str, &'a str)>,
    pub random_fully: bool,
}

static NO_EXTRA: Extra<'static> =
    Extra { recent: None, src_type: None, dst_type: None, mark_match: None, set_mark: None, random_fully: false };

impl<'a> Rule<'a> {
    pub fn extra(&self) -> &Extra<'a> {
        self.extra.as_deref().unwrap_or(&NO_EXTRA)
    }
    fn extra_mut(&mut self) -> &mut Extra<'a> {
        self.extra.get_or_insert_with(Default::default)
    }
    pub fn recent(&self) -> Option<&Recent<'a>> {
        self.extra().recent.as_ref()
    }
    pub fn src_type(&self) -> Option<Neg<'a>> {
        self.extra().src_type
    }
    pub fn dst_type(&self) -> Option<Neg<'a>> {
        self.extra().dst_type
    }
    /// The MARK target's effect as iptables-save prints it (`value/mask`):
    /// kube-proxy writes `--or-mark 0x4000`, the kernel hands back
    /// `--set-xmark 0x4000/0x4000`, and both must compare equal.
    pub fn set_mark(&self) -> Option<String> {
        let (opt, v) = self.extra().set_mark?;
        Some(match opt {
            "--or-mark" => format!("{v}/{v}"),
            "--xor-mark" => format!("{v}/0x0"),
            "--set-mark" if !v.contains('/') => format!("{v}/0xffffffff"),
            _ => v.to_string(),
        })
    }
    pub fn random_fully(&self) -> bool {
        self.extra().random_fully
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Opt {
    /// Takes no value; the payload says which one matters to the model.
    Flag(FlagKind),
    /// Takes exactly one value.
    Value(ValueKind),
    /// Not known: takes all values up to the next option.
    Unknown,
}

#[derive(Clone, Copy, PartialEq)]
enum FlagKind {
    Rcheck,
    Set,
    RandomFully,
    Other,
}

#[derive(Clone, Copy, PartialEq)]
enum ValueKind {
    Src,
    Dst,
    Proto,
    Jump,
    Comment,
    Dport,
    Probability,
    Name,
    Seconds,
    SrcType,
    DstType,
    Mark,
    SetMark,
    ToDestination,
    Ignored,
}

/// Option table. Short options dispatch on one byte and the long ones are
/// ordered by how often kube-proxy writes them: this runs for every option
/// of every rule of a 700,000-line dump.
fn classify(opt: &str) -> Opt {
    use FlagKind as F;
    use ValueKind as V;
    let b = opt.as_bytes();
    if b.len() == 2 {
        return match b[1] {
            b'm' => Opt::Value(V::Ignored),
            b'j' | b'g' => Opt::Value(V::Jump),
            b'p' => Opt::Value(V::Proto),
            b's' => Opt::Value(V::Src),
            b'd' => Opt::Value(V::Dst),
            b'i' | b'o' => Opt::Value(V::Ignored),
            b'f' => Opt::Flag(F::Other),
            _ => Opt::Unknown,
        };
    }
    match opt {
        "--comment" => Opt::Value(V::Comment),
        "--dport" | "--destination-port" => Opt::Value(V::Dport),
        "--to-destination" => Opt::Value(V::ToDestination),
        "--mode" => Opt::Value(V::Ignored),
        "--probability" => Opt::Value(V::Probability),
        "--name" => Opt::Value(V::Name),
        "--rcheck" => Opt::Flag(F::Rcheck),
        "--seconds" => Opt::Value(V::Seconds),
        "--set" => Opt::Flag(F::Set),
        "--mask" => Opt::Value(V::Ignored),
        "--reap" | "--rsource" | "--rdest" | "--rttl" | "--update" | "--remove" => Opt::Flag(F::Other),
        "--src-type" => Opt::Value(V::SrcType),
        "--dst-type" => Opt::Value(V::DstType),
        "--mark" => Opt::Value(V::Mark),
        "--set-xmark" | "--set-mark" | "--or-mark" | "--xor-mark" => Opt::Value(V::SetMark),
        "--random-fully" => Opt::Flag(F::RandomFully),
        "--source" => Opt::Value(V::Src),
        "--destination" => Opt::Value(V::Dst),
        "--protocol" => Opt::Value(V::Proto),
        "--jump" | "--goto" => Opt::Value(V::Jump),
        "--match" | "--in-interface" | "--out-interface" | "--sport" | "--source-port" | "--every" | "--packet"
        | "--hitcount" | "--and-mark" | "--to-source" | "--to-ports" | "--reject-with" | "--ctstate" | "--state" => {
            Opt::Value(V::Ignored)
        }
        "--random"
        | "--persistent"
        | "--physdev-is-in"
        | "--physdev-is-out"
        | "--physdev-is-bridged"
        | "--notrack"
        | "--log-uid"
        | "--log-tcp-sequence"
        | "--log-tcp-options"
        | "--log-ip-options"
        | "--syn"
        | "--fragment"
        | "--return-nomatch"
        | "--strict"
        | "--nflog-prefix-none" => Opt::Flag(F::Other),
        _ => Opt::Unknown,
    }
}

/// Decodes the tokens after the chain name of an `-A CHAIN ...` line.
/// Returns a human-readable error for a malformed option; the caller adds the
/// input name and the line number.
pub(crate) fn parse_rule<'a>(toks: &[Tok<'a>], line: u32) -> Result<Rule<'a>, String> {
    let mut r = Rule { line, ..Default::default() };
    let mut i = 0;
    let mut negate = false;
    while i < toks.len() {
        let opt = match &toks[i] {
            Tok::Word("!") => {
                if negate {
                    return Err("double negation `! !`".into());
                }
                negate = true;
                i += 1;
                continue;
            }
            Tok::Word(w) if w.starts_with('-') && w.len() > 1 => *w,
            Tok::Word(w) => return Err(format!("unexpected token `{w}` (expected an option)")),
            Tok::Quoted(q) => return Err(format!("unexpected quoted value \"{q}\" (expected an option)")),
        };
        i += 1;
        let neg = negate;
        negate = false;
        let kind = match classify(opt) {
            Opt::Flag(f) => {
                match f {
                    FlagKind::Rcheck => recent(&mut r).rcheck = true,
                    FlagKind::Set => recent(&mut r).set = true,
                    FlagKind::RandomFully => r.extra_mut().random_fully = true,
                    FlagKind::Other => {}
                }
                continue;
            }
            Opt::Unknown => {
                // Third-party rules (Calico, Docker) use options we do not
                // know; take their values up to the next option so that they
                // never fail the parse.
                while i < toks.len() && !toks[i].is_option() && toks[i] != Tok::Word("!") {
                    i += 1;
                }
                continue;
            }
            Opt::Value(k) => k,
        };
        let val = match toks.get(i) {
            Some(t) if !t.is_option() && *t != Tok::Word("!") => t,
            _ => return Err(format!("option {opt} needs a value")),
        };
        i += 1;
        let word = |v: &Tok<'a>| -> Result<&'a str, String> {
            match v {
                Tok::Word(w) => Ok(*w),
                Tok::Quoted(Cow::Borrowed(s)) => Ok(*s),
                Tok::Quoted(Cow::Owned(s)) => Err(format!("option {opt}: unexpected escaped value \"{s}\"")),
            }
        };
        use ValueKind as V;
        match kind {
            V::Ignored => {}
            V::Src => r.src = Some(Neg { negated: neg, value: word(val)? }),
            V::Dst => r.dst = Some(Neg { negated: neg, value: word(val)? }),
            V::Proto => r.proto = Some(word(val)?),
            V::Jump => r.target = Some(word(val)?),
            V::Comment => {
                r.comment = Some(match val {
                    Tok::Word(w) => Cow::Borrowed(*w),
                    Tok::Quoted(q) => q.clone(),
                })
            }
            V::Dport => {
                let v = word(val)?;
                if !is_port_or_range(v) {
                    return Err(format!("malformed --dport value `{v}`"));
                }
                r.dport = Some(v);
            }
            V::Probability => {
                let v = word(val)?;
                let p: f64 = v.parse().map_err(|_| format!("malformed --probability value `{v}`"))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("--probability {v} is outside 0..1"));
                }
                r.probability = Some(p);
            }
            V::Name => recent(&mut r).name = Some(word(val)?),
            V::Seconds => {
                let v = word(val)?;
                let s: u32 = v.parse().map_err(|_| format!("malformed --seconds value `{v}`"))?;
                recent(&mut r).seconds = Some(s);
            }
            V::SrcType => r.extra_mut().src_type = Some(Neg { negated: neg, value: word(val)? }),
            V::DstType => r.extra_mut().dst_type = Some(Neg { negated: neg, value: word(val)? }),
            V::Mark => r.extra_mut().mark_match = Some(Neg { negated: neg, value: word(val)? }),
            V::SetMark => r.extra_mut().set_mark = Some((opt, word(val)?)),
            V::ToDestination => {
                let v = word(val)?;
                if split_host_port(v).is_none() {
                    return Err(format!("malformed --to-destination value `{v}` (expected IP:port)"));
                }
                r.to_destination = Some(v);
            }
        }
    }
    if negate {
        return Err("`!` at the end of the rule negates nothing".into());
    }
    Ok(r)
}

fn recent<'r, 'a>(r: &'r mut Rule<'a>) -> &'r mut Recent<'a> {
    r.extra_mut().recent.get_or_insert_with(Default::default)
}

fn is_port_or_range(v: &str) -> bool {
    let mut parts = v.splitn(2, ':');
    let ok = |p: Option<&str>| p.map(|p| p.parse::<u16>().is_ok()).unwrap_or(true);
    let first = parts.next();
    first.is_some_and(|f| f.parse::<u16>().is_ok()) && ok(parts.next())
}

/// `10.0.0.1:80`, `[fd00::1]:80` → (ip, port). Validates the IP so that a
/// garbled DNAT target is reported instead of producing a nonsense endpoint.
pub(crate) fn split_host_port(v: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = v.strip_prefix('[') {
        let end = rest.find(']')?;
        let port = rest[end + 1..].strip_prefix(':')?;
        (&rest[..end], port)
    } else {
        let idx = v.rfind(':')?;
        (&v[..idx], &v[idx + 1..])
    };
    host.parse::<std::net::IpAddr>().ok()?;
    Some((host, port.parse().ok()?))
}

/// Strips the host prefix length iptables-save always prints (`/32`, `/128`).
pub(crate) fn host_ip(v: &str) -> &str {
    match v.split_once('/') {
        Some((ip, "32")) | Some((ip, "128")) => ip,
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok<'_>> {
        let mut v = Vec::new();
        tokenize(s, &mut v).unwrap();
        v
    }

    #[test]
    fn quoted_values_with_escapes() {
        let t = toks(r#"-m comment --comment "a \"b\" c\\" -j X"#);
        assert_eq!(t[3], Tok::Quoted(Cow::Owned("a \"b\" c\\".into())));
        assert_eq!(t[5], Tok::Word("X"));
    }

    #[test]
    fn unterminated_quote_is_an_error() {
        let mut v = Vec::new();
        assert!(tokenize(r#"-m comment --comment "abc"#, &mut v).is_err());
    }

    #[test]
    fn rule_fields() {
        let t = toks(
            r#"! -s 10.244.0.0/16 -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ"#,
        );
        let r = parse_rule(&t, 7).unwrap();
        assert_eq!(r.src, Some(Neg { negated: true, value: "10.244.0.0/16" }));
        assert_eq!(r.dst.unwrap().value, "10.96.0.10/32");
        assert_eq!(r.dport, Some("53"));
        assert_eq!(r.target, Some("KUBE-MARK-MASQ"));
        assert_eq!(r.comment.as_deref(), Some("kube-system/kube-dns:dns cluster IP"));
    }

    #[test]
    fn unknown_options_are_skipped_with_their_values() {
        let t = toks("-m set --match-set cali40all-hosts-net dst,src -m physdev --physdev-is-in -j ACCEPT");
        let r = parse_rule(&t, 1).unwrap();
        assert_eq!(r.target, Some("ACCEPT"));
    }

    #[test]
    fn malformed_values() {
        for bad in [
            "-m statistic --mode random --probability zero -j KUBE-SEP-A",
            "-m statistic --mode random --probability 1.5 -j KUBE-SEP-A",
            "-p tcp -m tcp --dport http -j X",
            "-p tcp -j DNAT --to-destination 10.0.0.1",
            "-p tcp -j DNAT --to-destination nothost:80",
            "-m recent --seconds many --rcheck",
            "-p tcp --dport",
            "-j",
            "stray",
            "-s 1.2.3.4 !",
        ] {
            let t = toks(bad);
            assert!(parse_rule(&t, 1).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("10.1.2.3:8080"), Some(("10.1.2.3", 8080)));
        assert_eq!(split_host_port("[fd00::5]:53"), Some(("fd00::5", 53)));
        assert_eq!(host_ip("10.96.0.1/32"), "10.96.0.1");
        assert_eq!(host_ip("10.0.0.0/8"), "10.0.0.0/8");
    }
}
