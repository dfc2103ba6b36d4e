//! `kubeshift node report`: what one node looks like before its migration.
//!
//! Collected on the node itself (or inside a lab node's network namespace):
//! kernel, BTF, cgroup v2, iptables backend and full `iptables-save` with the
//! parsed rule summary, CNI conf files, interfaces and routes. A probe that
//! fails is recorded in `problems` instead of aborting, because a partial
//! report of a broken node is exactly what the operator needs to see.

use crate::iptables::{parse_iptables_save, ParseError, RuleModel, RuleSummary};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bumped when a field changes meaning; readers reject newer versions.
pub const NODE_REPORT_VERSION: u32 = 1;

/// Minimum kernel for the eBPF datapath (tcx, ring buffer, sock_addr hooks).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Name the node has in the API; the report does not guess it.
    pub node_name: Option<String>,
    /// Where the CNI conf files are. The lab keeps each node's elsewhere.
    pub cni_conf_dir: PathBuf,
    /// `iptables-save` binary (or a path to a specific backend's).
    pub iptables_save: String,
    /// `ip6tables-save`: kube-proxy writes a node's IPv6 services there.
    pub ip6tables_save: String,
    /// `nft`, for kube-proxy's nftables mode (`nft -j list ruleset`).
    pub nft: String,
    /// `ipvsadm` and `ipset`, for kube-proxy's ipvs mode (`ipvsadm -Sn`, `ipset save`).
    pub ipvsadm: String,
    pub ipset: String,
    pub iptables: String,
    pub ip: String,
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            node_name: None,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            iptables_save: "iptables-save".into(),
            ip6tables_save: "ip6tables-save".into(),
            nft: "nft".into(),
            ipvsadm: "ipvsadm".into(),
            ipset: "ipset".into(),
            iptables: "iptables".into(),
            ip: "ip".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct KernelInfo {
    /// `uname -r`, e.g. `6.18.0-1-amd64`.
    pub release: String,
    /// `uname -v`.
    pub version: String,
    pub major: u32,
    pub minor: u32,
    /// At least [`MIN_KERNEL`].
    pub meets_minimum: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BtfInfo {
    pub present: bool,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CgroupInfo {
    pub v2_mounted: bool,
    pub v2_mount_points: Vec<String>,
    /// `self` when found in this process's mount namespace, `init` when only
    /// PID 1's has it (under `ip netns exec`, which remounts /sys).
    pub seen_in: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    Legacy,
    Nft,
    #[default]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct IptablesInfo {
    pub backend: IptablesBackend,
    /// First line of `iptables -V`.
    pub version: String,
    /// Full `iptables-save` output.
    pub save: Option<String>,
    /// The nft backend warns that legacy tables exist too: kube-proxy may
    /// have written to the other backend.
    pub legacy_tables_present: bool,
    /// What iptables-save printed on stderr (1.8.9 writes its warnings there).
    #[serde(default)]
    pub save_warnings: Vec<String>,
    pub rules: Option<RuleSummary>,
    pub parse_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CniFile {
    pub name: String,
    pub content: String,
    /// `None` when the file is not JSON (e.g. a stray backup).
    pub plugin_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CniInfo {
    pub dir: String,
    pub files: Vec<CniFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InterfaceAddress {
    pub family: String,
    pub local: String,
    pub prefixlen: u8,
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Interface {
    pub ifindex: u32,
    pub ifname: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub operstate: Option<String>,
    #[serde(default)]
    pub link_type: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    /// `vxlan`, `bridge`, `veth`, `ipip` …: how flannel.1, cni0, tunl0,
    /// vxlan.calico are recognised.
    #[serde(default)]
    pub kind: Option<String>,
    /// `ip -d` details for the kind (VXLAN id and port, …).
    #[serde(default)]
    pub kind_data: Option<serde_json::Value>,
    #[serde(default)]
    pub addresses: Vec<InterfaceAddress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Route {
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub prefsrc: Option<String>,
    /// 4 or 6.
    pub family: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NodeReport {
    pub report_version: u32,
    pub node_name: Option<String>,
    pub hostname: String,
    pub collected_at_unix: u64,
    pub kernel: KernelInfo,
    pub btf: BtfInfo,
    pub cgroup: CgroupInfo,
    pub iptables: IptablesInfo,
    /// The same for `ip6tables-save` (absent in reports of older kubeshift).
    #[serde(default)]
    pub ip6tables: Option<IptablesInfo>,
    /// `nft -j list ruleset` (kube-proxy's nftables mode keeps its services here).
    #[serde(default)]
    pub nft_ruleset: Option<String>,
    /// `ipvsadm -Sn` (kube-proxy's ipvs mode); `None` without ipvsadm or IPVS.
    #[serde(default)]
    pub ipvs: Option<String>,
    /// `ipset save` (ipvs mode's KUBE-CLUSTER-IP, KUBE-NODE-PORT-* … sets).
    #[serde(default)]
    pub ipset: Option<String>,
    pub cni: CniInfo,
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    /// Probes that failed, in words.
    pub problems: Vec<String>,
}

impl NodeReport {
    /// Node readiness for the eBPF datapath, as reasons it is not ready.
    pub fn readiness_blockers(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.kernel.meets_minimum {
            v.push(format!("kernel {} is older than {}.{}", self.kernel.release, MIN_KERNEL.0, MIN_KERNEL.1));
        }
        if !self.btf.present {
            v.push("no BTF at /sys/kernel/btf/vmlinux".into());
        }
        if !self.cgroup.v2_mounted {
            v.push("cgroup v2 is not mounted".into());
        }
        v
    }

    /// The full rule model of the `iptables-save` text in the report (the
    /// report itself only carries the summary), for `diff::diff_node`.
    /// `None` when the report has no iptables-save output.
    pub fn rule_model(&self) -> Option<Result<RuleModel, ParseError>> {
        let save = self.iptables.save.as_deref()?;
        let node = self.node_name.as_deref().unwrap_or(&self.hostname);
        Some(parse_iptables_save(&format!("{node}:iptables-save"), save))
    }

    /// kube-proxy's nftables tables, modelled per family. `None` when the
    /// report has no ruleset.
    pub fn nft_models(&self) -> Option<Result<crate::nftables::NftKubeProxy, String>> {
        let text = self.nft_ruleset.as_deref()?;
        let node = self.node_name.as_deref().unwrap_or(&self.hostname);
        Some(crate::nftables::parse_nft_json(&format!("{node}:nft -j list ruleset"), text))
    }

    /// The IPVS virtual servers of `ipvsadm -Sn`; `None` without IPVS output.
    pub fn ipvs_virtual_servers(&self) -> Option<Result<Vec<crate::ipvs::VirtualServer>, String>> {
        let text = self.ipvs.as_deref()?;
        let node = self.node_name.as_deref().unwrap_or(&self.hostname);
        Some(crate::ipvs::parse_ipvsadm(&format!("{node}:ipvsadm -Sn"), text))
    }

    /// The rule model of the `ip6tables-save` text, like [`Self::rule_model`].
    pub fn rule_model_v6(&self) -> Option<Result<RuleModel, ParseError>> {
        let save = self.ip6tables.as_ref()?.save.as_deref()?;
        let node = self.node_name.as_deref().unwrap_or(&self.hostname);
        Some(parse_iptables_save(&format!("{node}:ip6tables-save"), save))
    }

    pub fn from_json(text: &str, name: &str) -> Result<Self, String> {
        let r: NodeReport =
            serde_json::from_str(text).map_err(|e| format!("{name}:{}:{}: {e}", e.line(), e.column()))?;
        if r.report_version > NODE_REPORT_VERSION {
            return Err(format!(
                "{name}: node report version {} is newer than this kubeshift understands ({NODE_REPORT_VERSION})",
                r.report_version
            ));
        }
        Ok(r)
    }
}

/// Runs a command and returns stdout, or an error naming the command, its
/// exit status and stderr. Exit status is checked because some iptables
/// front-ends print nothing and still fail.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    run_with_stderr(cmd, args).map(|(out, _)| out)
}

/// Like [`run`], also returning stderr, where iptables-nft-save 1.8.9 writes
/// its "legacy tables present" warning.
fn run_with_stderr(cmd: &str, args: &[&str]) -> Result<(String, String), String> {
    let out =
        Command::new(cmd).args(args).output().map_err(|e| format!("cannot run `{cmd} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout =
        String::from_utf8(out.stdout).map_err(|_| format!("`{cmd} {}` printed non-UTF-8 output", args.join(" ")))?;
    Ok((stdout, String::from_utf8_lossy(&out.stderr).into_owned()))
}

pub(crate) fn parse_kernel_release(release: &str) -> (u32, u32) {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn kernel(problems: &mut Vec<String>) -> KernelInfo {
    let release = read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| {
        problems.push("cannot read /proc/sys/kernel/osrelease".into());
        String::new()
    });
    let version = read_trim("/proc/sys/kernel/version").unwrap_or_default();
    let (major, minor) = parse_kernel_release(&release);
    KernelInfo { meets_minimum: (major, minor) >= MIN_KERNEL, release, version, major, minor }
}

fn btf() -> BtfInfo {
    // Under `ip netns exec` /sys is a fresh sysfs; BTF is still there, but
    // fall back to PID 1's view in case a private /sys hides it.
    for p in ["/sys/kernel/btf/vmlinux", "/proc/1/root/sys/kernel/btf/vmlinux"] {
        if Path::new(p).exists() {
            return BtfInfo { present: true, path: p.into() };
        }
    }
    BtfInfo { present: false, path: "/sys/kernel/btf/vmlinux".into() }
}

/// cgroup2 mount points in a /proc/*/mounts text.
pub(crate) fn cgroup2_mounts(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let target = f.next()?;
            (f.next()? == "cgroup2").then(|| target.replace("\\040", " "))
        })
        .collect()
}

fn cgroup(problems: &mut Vec<String>) -> CgroupInfo {
    for (file, seen) in [("/proc/self/mounts", "self"), ("/proc/1/mounts", "init")] {
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let m = cgroup2_mounts(&text);
                if !m.is_empty() {
                    return CgroupInfo { v2_mounted: true, v2_mount_points: m, seen_in: seen.into() };
                }
            }
            Err(e) if seen == "self" => problems.push(format!("cannot read {file}: {e}")),
            Err(_) => {}
        }
    }
    CgroupInfo::default()
}

pub(crate) fn parse_backend(version_line: &str) -> IptablesBackend {
    if version_line.contains("(nf_tables)") {
        IptablesBackend::Nft
    } else if version_line.contains("(legacy)") {
        IptablesBackend::Legacy
    } else {
        IptablesBackend::Unknown
    }
}

fn iptables(opts: &CollectOptions, problems: &mut Vec<String>) -> IptablesInfo {
    let mut info = IptablesInfo::default();
    match run(&opts.iptables, &["-V"]) {
        Ok(out) => {
            info.version = out.lines().next().unwrap_or("").trim().to_string();
            info.backend = parse_backend(&info.version);
        }
        Err(e) => problems.push(e),
    }
    dump_into(&opts.iptables_save, &mut info, problems);
    info
}

/// `ip6tables-save` with its rule summary; the backend is the one `iptables -V` named.
fn ip6tables(opts: &CollectOptions, backend: IptablesBackend, problems: &mut Vec<String>) -> IptablesInfo {
    let mut info = IptablesInfo { backend, ..Default::default() };
    dump_into(&opts.ip6tables_save, &mut info, problems);
    info
}

/// Runs one `*tables-save` and records its output, warnings and rule summary.
fn dump_into(binary: &str, info: &mut IptablesInfo, problems: &mut Vec<String>) {
    match run_with_stderr(binary, &[]) {
        Ok((out, err)) => {
            info.save_warnings =
                err.lines().map(|l| l.trim_start_matches('#').trim().to_string()).filter(|l| !l.is_empty()).collect();
            let legacy = |w: &String| w.contains("iptables-legacy tables present");
            info.legacy_tables_present = info.save_warnings.iter().any(legacy);
            match parse_iptables_save(&format!("{binary} output"), &out) {
                Ok(model) => {
                    // Older iptables printed the warning into the dump itself.
                    info.legacy_tables_present |= model.warnings.iter().any(legacy);
                    info.rules = Some(model.summary());
                }
                Err(e) => info.parse_error = Some(e.to_string()),
            }
            info.save = Some(out);
        }
        Err(e) => problems.push(e),
    }
}

/// Output of a tool that only some nodes have (nft, ipvsadm, ipset): `None`
/// without a problem when it is not installed, a problem when it fails.
fn optional_tool(binary: &str, args: &[&str], problems: &mut Vec<String>) -> Option<String> {
    match Command::new(binary).args(args).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            problems.push(format!("{binary} {}: {e}", args.join(" ")));
            None
        }
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            problems.push(format!(
                "{binary} {} exited with {}: {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            None
        }
    }
}

/// Reads the CNI conf dir the way the container runtime does: `*.conf`,
/// `*.conflist` and `*.json`, sorted by name (the first one wins).
pub fn read_cni_dir(dir: &Path, problems: &mut Vec<String>) -> CniInfo {
    let mut info = CniInfo { dir: dir.display().to_string(), files: Vec::new() };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("cannot read CNI conf dir {}: {e}", dir.display()));
            return info;
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conf" | "conflist" | "json")))
        .collect();
    names.sort();
    for p in names {
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        match std::fs::read_to_string(&p) {
            Ok(content) => {
                let plugin_types = serde_json::from_str::<serde_json::Value>(&content).ok().map(|v| {
                    let mut t = Vec::new();
                    if let Some(list) = v.get("plugins").and_then(|p| p.as_array()) {
                        t.extend(list.iter().filter_map(|p| p.get("type")?.as_str().map(str::to_string)));
                    } else if let Some(ty) = v.get("type").and_then(|t| t.as_str()) {
                        t.push(ty.to_string());
                    }
                    t
                });
                if plugin_types.is_none() {
                    problems.push(format!("CNI conf {} is not valid JSON", p.display()));
                }
                info.files.push(CniFile { name, content, plugin_types });
            }
            Err(e) => problems.push(format!("cannot read {}: {e}", p.display())),
        }
    }
    info
}

#[derive(Deserialize)]
struct IpAddrJson {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    operstate: Option<String>,
    #[serde(default)]
    link_type: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfoJson>,
    #[serde(default)]
    addr_info: Vec<InterfaceAddress>,
}

#[derive(Deserialize)]
struct LinkInfoJson {
    #[serde(default)]
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<serde_json::Value>,
}

/// Parses `ip -d -j addr` output.
pub fn parse_ip_addr_json(text: &str) -> Result<Vec<Interface>, String> {
    let raw: Vec<IpAddrJson> = serde_json::from_str(text).map_err(|e| format!("ip -j addr output: {e}"))?;
    Ok(raw
        .into_iter()
        .map(|r| Interface {
            ifindex: r.ifindex,
            ifname: r.ifname,
            flags: r.flags,
            mtu: r.mtu,
            operstate: r.operstate,
            link_type: r.link_type,
            address: r.address,
            kind: r.linkinfo.as_ref().and_then(|l| l.info_kind.clone()),
            kind_data: r.linkinfo.and_then(|l| l.info_data),
            addresses: r.addr_info,
        })
        .collect())
}

#[derive(Deserialize)]
struct IpRouteJson {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    prefsrc: Option<String>,
}

/// Parses `ip -j route` output; an empty table prints nothing at all.
pub fn parse_ip_route_json(text: &str, family: u8) -> Result<Vec<Route>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<IpRouteJson> = serde_json::from_str(text).map_err(|e| format!("ip -j route output: {e}"))?;
    Ok(raw
        .into_iter()
        .map(|r| Route {
            dst: r.dst,
            gateway: r.gateway,
            dev: r.dev,
            protocol: r.protocol,
            scope: r.scope,
            prefsrc: r.prefsrc,
            family,
        })
        .collect())
}

/// Collects the report in the current network namespace.
pub fn collect(opts: &CollectOptions) -> NodeReport {
    let mut problems = Vec::new();
    let kernel = kernel(&mut problems);
    let btf = btf();
    let cgroup = cgroup(&mut problems);
    let iptables = iptables(opts, &mut problems);
    let ip6tables = Some(ip6tables(opts, iptables.backend, &mut problems));
    let nft_ruleset = optional_tool(&opts.nft, &["-j", "list", "ruleset"], &mut problems);
    // Without the ip_vs module ipvsadm fails; that is a node without IPVS, not a problem.
    let ipvs = optional_tool(&opts.ipvsadm, &["-Sn"], &mut Vec::new());
    let ipset = optional_tool(&opts.ipset, &["save"], &mut problems);
    let cni = read_cni_dir(&opts.cni_conf_dir, &mut problems);
    let interfaces = match run(&opts.ip, &["-d", "-j", "addr", "show"]).and_then(|o| parse_ip_addr_json(&o)) {
        Ok(v) => v,
        Err(e) => {
            problems.push(e);
            Vec::new()
        }
    };
    let mut routes = Vec::new();
    for (fam, flag) in [(4u8, "-4"), (6u8, "-6")] {
        match run(&opts.ip, &[flag, "-j", "route", "show"]).and_then(|o| parse_ip_route_json(&o, fam)) {
            Ok(v) => routes.extend(v),
            Err(e) => problems.push(e),
        }
    }
    NodeReport {
        report_version: NODE_REPORT_VERSION,
        node_name: opts.node_name.clone(),
        hostname: read_trim("/proc/sys/kernel/hostname").unwrap_or_default(),
        collected_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel,
        btf,
        cgroup,
        iptables,
        ip6tables,
        nft_ruleset,
        ipvs,
        ipset,
        cni,
        interfaces,
        routes,
        problems,
    }
}

/// Collects the report inside a named network namespace (`/run/netns/NAME`
/// or a path) without leaving the host mount namespace: only a helper thread
/// switches its network namespace, and the commands it starts inherit it.
pub fn collect_in_netns(netns: &str, opts: &CollectOptions) -> Result<NodeReport, String> {
    let path = if netns.contains('/') { PathBuf::from(netns) } else { Path::new("/run/netns").join(netns) };
    let file =
        std::fs::File::open(&path).map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?;
    let opts = opts.clone();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot enter network namespace {}: {e}", path.display()))?;
        Ok(collect(&opts))
    })
    .join()
    .map_err(|_| "node report thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_model_from_a_report_names_the_node() {
        let mut r = NodeReport { node_name: Some("node-7".into()), ..Default::default() };
        assert!(r.rule_model().is_none());
        r.iptables.save = Some("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n".into());
        assert!(r.rule_model().unwrap().unwrap().services.is_empty());
        r.iptables.save = Some("*nat\n:KUBE-SERVICES - [0:0]\n".into());
        let e = r.rule_model().unwrap().unwrap_err();
        assert!(e.to_string().starts_with("node-7:iptables-save:1: "), "{e}");
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_release("6.18.0-1-amd64"), (6, 18));
        assert_eq!(parse_kernel_release("5.4.0-150-generic"), (5, 4));
        assert!((5, 4) < MIN_KERNEL && (5, 10) >= MIN_KERNEL);
    }

    #[test]
    fn cgroup2_mount_parsing() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(cgroup2_mounts(m), vec!["/sys/fs/cgroup/unified"]);
        assert!(cgroup2_mounts("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n").is_empty());
    }

    #[test]
    fn backend_from_version() {
        assert_eq!(parse_backend("iptables v1.8.9 (nf_tables)"), IptablesBackend::Nft);
        assert_eq!(parse_backend("iptables v1.8.9 (legacy)"), IptablesBackend::Legacy);
        assert_eq!(parse_backend("iptables v1.4.21"), IptablesBackend::Unknown);
    }

    #[test]
    fn ip_json_parsing() {
        let addr = r#"[{"ifindex":3,"ifname":"flannel.1","flags":["BROADCAST","UP"],"mtu":1450,"operstate":"UNKNOWN","link_type":"ether","address":"aa:bb:cc:dd:ee:ff","linkinfo":{"info_kind":"vxlan","info_data":{"id":1,"port":8472}},"addr_info":[{"family":"inet","local":"10.244.1.0","prefixlen":32,"scope":"global","label":"flannel.1"}]}]"#;
        let i = parse_ip_addr_json(addr).unwrap();
        assert_eq!(i[0].kind.as_deref(), Some("vxlan"));
        assert_eq!(i[0].kind_data.as_ref().unwrap()["port"], 8472);
        assert_eq!(i[0].addresses[0].local, "10.244.1.0");
        let r = parse_ip_route_json(
            r#"[{"dst":"10.244.2.0/24","gateway":"10.244.2.0","dev":"flannel.1","flags":["onlink"]}]"#,
            4,
        )
        .unwrap();
        assert_eq!(r[0].gateway.as_deref(), Some("10.244.2.0"));
        assert!(parse_ip_route_json("", 6).unwrap().is_empty());
        assert!(parse_ip_addr_json("not json").is_err());
    }

    #[test]
    fn cni_dir_reading() {
        let dir = std::env::temp_dir().join(format!("ks-cni-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        std::fs::write(
            dir.join("10-flannel.conflist"),
            r#"{"name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("99-broken.conf"), "{not json").unwrap();
        std::fs::write(dir.join("README"), "ignored").unwrap();
        let mut problems = Vec::new();
        let info = read_cni_dir(&dir, &mut problems);
        assert_eq!(info.files.len(), 2);
        assert_eq!(info.files[0].plugin_types.as_deref(), Some(&["flannel".to_string(), "portmap".to_string()][..]));
        assert_eq!(info.files[1].plugin_types, None);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("99-broken.conf is not valid JSON"));
        let mut p2 = Vec::new();
        read_cni_dir(Path::new("/nonexistent/cni"), &mut p2);
        assert!(p2[0].contains("/nonexistent/cni"));
    }
}
