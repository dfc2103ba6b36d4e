//! The `kubeshift` CNI plugin (spec 1.0.0 and 1.1.0): ADD, DEL, CHECK, VERSION, STATUS, GC.
//!
//! Pod wiring, Calico's way: a veth pair, the pod side holds its address as a /32 and a
//! default route via the link-local next hop 169.254.1.1 (reached on-link through a
//! permanent neighbour entry pointing at the host side's fixed MAC ee:ee:ee:ee:ee:ee);
//! the host side has no address, only a /32 route to the pod. Why the link-local gateway
//! rather than one from the range: every packet, even pod to pod on one node, is routed
//! through the host interface where the policy programs sit; no address of the node's
//! range is spent on a gateway; and the pod's config is the same on every node. The
//! static neighbour rather than proxy_arp: it does not depend on the node having a route
//! to 169.254.1.1 (proxy_arp only answers for routable targets) and costs no ARP round
//! trip on the pod's first packet. A `gateway` in the config replaces 169.254.1.1.
//!
//! Protocol types are written here rather than taken from a crate: `cni-plugin` is
//! unmaintained and stops at 1.0.0 without STATUS/GC, and `rscni-plugin` 0.5.0, which has
//! the 1.1 types, reads the environment and stdio through type-level traits
//! (`E::get`, `I::io_out()`, its `run_with` is private), so a call cannot be given its own
//! environment and streams: [`main_with`] needs exactly that, for tests that run many
//! plugin invocations in parallel in one process. The protocol is ~one page of serde.

pub mod agent_proto;
pub mod ipam;
mod link;

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::Ipv4Addr,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::{
    agent_proto::{AgentError, AttachRequest, Request},
    ipam::{Ipam, Ipv4Net},
};

pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];
pub const PLUGIN_TYPE: &str = "kubeshift";
/// Next hop of every pod (see the module doc).
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// MAC of every host-side veth, the pod's neighbour entry for the gateway points at it.
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const DEFAULT_MTU: u32 = 1450;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
/// Each I/O step with the agent; the attach itself is a few map updates and a tc attach.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Well-known CNI error codes (SPEC.md "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (≥ 100): the pod interface already exists.
    pub const INTERFACE_EXISTS: u32 = 100;
    /// Plugin-specific: the node's range has no free address.
    pub const RANGE_EXHAUSTED: u32 = 101;
    /// Plugin-specific: an interface or route change failed.
    pub const LINK_FAILURE: u32 = 102;
    /// Plugin-specific: CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 103;
    /// Plugin-specific: the plugin panicked (a bug), caught at the top.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }
}

type Res<T> = Result<T, CniError>;

/// The kubeshift fields of a conflist entry (plus the standard ones).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The node's kubeshift range, e.g. `10.245.3.0/24`.
    pub subnet: String,
    /// The pod's next hop; default 169.254.1.1.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    pub agent_socket: PathBuf,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A parsed, checked config.
struct Net {
    conf: NetConf,
    gateway: Ipv4Addr,
    mtu: u32,
    ipam: Ipam,
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_CONFIG, format!("config field `{field}`: {msg}"), "")
}

fn parse_conf(stdin: &[u8]) -> Res<Net> {
    let raw: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, format!("config on stdin is not JSON: {e}"), ""))?;
    check_version(&raw)?;
    // serde names the field in its message ("missing field `subnet`", "invalid type: …
    // for `mtu`" is not given, so the message is prefixed with what was being read).
    let conf: NetConf = serde_json::from_value(raw.clone()).map_err(|e| match mistyped_field(&raw) {
        Some((field, want)) => invalid(field, format!("expected {want}: {e}")),
        None => CniError::new(code::INVALID_CONFIG, format!("config: {e}"), ""),
    })?;
    if conf.plugin_type != PLUGIN_TYPE {
        return Err(invalid("type", format!("{:?}, expected {PLUGIN_TYPE:?}", conf.plugin_type)));
    }
    if conf.name.is_empty() || conf.name.contains('/') || conf.name.starts_with('.') {
        return Err(invalid("name", format!("{:?} is not usable as a directory name", conf.name)));
    }
    let range = Ipv4Net::parse(&conf.subnet)
        .ok_or_else(|| invalid("subnet", format!("{:?} is not an IPv4 CIDR (a.b.c.d/n)", conf.subnet)))?;
    if range.prefix > 30 {
        return Err(invalid("subnet", format!("{range} leaves no room for pods (prefix at most /30)")));
    }
    let gateway = match &conf.gateway {
        None => DEFAULT_GATEWAY,
        Some(g) => g.parse().map_err(|_| invalid("gateway", format!("{g:?} is not an IPv4 address")))?,
    };
    let mtu = conf.mtu.unwrap_or(DEFAULT_MTU);
    if !(576..=65535).contains(&mtu) {
        return Err(invalid("mtu", format!("{mtu} is outside 576..=65535")));
    }
    if conf.agent_socket.as_os_str().is_empty() {
        return Err(invalid("agentSocket", "empty path"));
    }
    let data_dir = conf.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    // The range's first host address is the node's own: kubeshift.vx carries it, and
    // other nodes route the range via it (overlay::wanted). A gateway inside the range
    // is not a pod's either.
    let mut reserved = vec![Ipv4Addr::from(range.hosts().0)];
    if range.contains(gateway) {
        reserved.push(gateway);
    }
    let ipam = Ipam::new(&data_dir, &conf.name, range, reserved);
    Ok(Net { conf, gateway, mtu, ipam })
}

/// serde_json names a missing field but not a mistyped one ("invalid type: string, expected
/// u32"); this finds which field it was, so the error names it.
fn mistyped_field(raw: &Value) -> Option<(&'static str, &'static str)> {
    const STRINGS: &[&str] = &["cniVersion", "name", "type", "subnet", "gateway", "agentSocket", "dataDir"];
    let obj = raw.as_object()?;
    for f in STRINGS {
        if obj.get(*f).is_some_and(|v| !v.is_string() && !v.is_null()) {
            return Some((f, "a string"));
        }
    }
    if obj.get("mtu").is_some_and(|v| !v.is_null() && v.as_u64().is_none_or(|m| m > u64::from(u32::MAX))) {
        return Some(("mtu", "an unsigned integer"));
    }
    if obj.get("prevResult").is_some_and(|v| !v.is_object() && !v.is_null()) {
        return Some(("prevResult", "an object"));
    }
    let va = "cni.dev/valid-attachments";
    if obj.get(va).is_some_and(|v| serde_json::from_value::<Option<Vec<Attachment>>>(v.clone()).is_err()) {
        return Some((va, "a list of {\"containerID\", \"ifname\"} objects"));
    }
    None
}

fn check_version(raw: &Value) -> Res<()> {
    match raw.get("cniVersion").and_then(Value::as_str) {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => Ok(()),
        Some(v) => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config field `cniVersion`: {v:?} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        )),
        None => Err(invalid("cniVersion", "missing or not a string")),
    }
}

/// The runtime's per-call environment.
struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn need(&self, k: &str) -> Res<&str> {
        self.get(k).ok_or_else(|| CniError::new(code::INVALID_ENV, format!("environment variable {k} is not set"), ""))
    }
}

/// Host-side veth name: `ks` + 13 hex digits of FNV-1a over container id and ifname, so
/// DEL finds it again without the netns and without state (15 chars, IFNAMSIZ - 1).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("ks{:013x}", h & 0x000f_ffff_ffff_ffff)
}

/// Pod-side MAC from its address (`0a:58:` + the 4 bytes, locally administered, the
/// scheme ovn-kubernetes uses): set at creation, so ADD never has to read it back.
fn pod_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The plugin, testable: `env` is the CNI_* environment, the config is read from `stdin`,
/// the result (or the error result) written to `stdout`. Returns the exit code. Never
/// panics: a panic is caught and reported as a CNI error.
pub fn main_with(env: &HashMap<String, String>, stdin: &mut dyn Read, stdout: &mut dyn Write) -> i32 {
    let mut input = Vec::new();
    let outcome = match stdin.read_to_end(&mut input) {
        Err(e) => Err(CniError::new(code::IO_FAILURE, format!("reading the config from stdin: {e}"), "")),
        Ok(_) => catch_unwind(AssertUnwindSafe(|| dispatch(&Env(env), &input))).unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(CniError::new(code::INTERNAL, "kubeshift CNI plugin bug (panic)", what))
        }),
    };
    // Echo the caller's version in errors when it is one we speak, else our newest.
    let version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string());
    match outcome {
        Ok(None) => 0,
        Ok(Some(v)) => {
            if serde_json::to_writer(&mut *stdout, &v).is_err() || stdout.flush().is_err() {
                return 1;
            }
            0
        }
        Err(e) => {
            let v = json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details});
            let _ = serde_json::to_writer(&mut *stdout, &v);
            let _ = stdout.flush();
            1
        }
    }
}

fn dispatch(env: &Env, input: &[u8]) -> Res<Option<Value>> {
    let command = env.need("CNI_COMMAND")?;
    match command {
        "VERSION" => {
            // Any input version is fine here: VERSION is how a runtime finds out.
            let v = serde_json::from_slice::<Value>(input)
                .ok()
                .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| "1.1.0".into());
            Ok(Some(json!({"cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS})))
        }
        "ADD" => add(env, &parse_conf(input)?).map(Some),
        "DEL" => del(env, &parse_conf(input)?).map(|()| None),
        "CHECK" => check(env, &parse_conf(input)?).map(|()| None),
        "STATUS" => status(&need_1_1(parse_conf(input)?, "STATUS")?).map(|()| None),
        "GC" => gc(&need_1_1(parse_conf(input)?, "GC")?).map(|()| None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("environment variable CNI_COMMAND: unknown command {other:?}"),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

fn need_1_1(net: Net, cmd: &str) -> Res<Net> {
    if net.conf.cni_version == "1.0.0" {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{cmd} needs config field `cniVersion` 1.1.0, got 1.0.0"),
            "",
        ));
    }
    Ok(net)
}

/// What an ADD created so far; undone on drop unless `done()`.
struct Undo<'a> {
    net: &'a Net,
    ip: Option<Ipv4Addr>,
    host_if: Option<String>,
}

impl Undo<'_> {
    fn done(mut self) {
        self.ip = None;
        self.host_if = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        // Deleting the host end deletes the pod end and both sides' routes with it.
        if let Some(h) = self.host_if.take() {
            if let Err(e) = link::ip(None, &["link", "del", &h]) {
                eprintln!("kubeshift-cni: undo of ADD: {e}");
            }
        }
        if let Some(ip) = self.ip.take() {
            if let Err(e) = self.net.ipam.records.remove(ip) {
                eprintln!("kubeshift-cni: undo of ADD: {e}");
            }
        }
    }
}

fn link_err(e: String) -> CniError {
    CniError::new(code::LINK_FAILURE, e, "")
}

fn add(env: &Env, net: &Net) -> Res<Value> {
    let id = env.need("CNI_CONTAINERID")?;
    let netns = Path::new(env.need("CNI_NETNS")?);
    let ifname = env.need("CNI_IFNAME")?;
    if net.conf.prev_result.is_some() {
        // kubeshift creates the pod's interface, so it is the first plugin of a chain;
        // a prevResult means another interface plugin ran before it (STYLE.md 8: no
        // implicit chaining mode).
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            "config field `prevResult`: kubeshift creates the pod interface and must be the first plugin in the list",
            "",
        ));
    }
    if ifname.len() > 15 || ifname.contains('/') {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("environment variable CNI_IFNAME: {ifname:?} is not a valid interface name"),
            "",
        ));
    }
    if !netns.exists() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("environment variable CNI_NETNS: {} does not exist", netns.display()),
            "",
        ));
    }
    if link::ifindex_in(netns, ifname).map_err(link_err)?.is_some() {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!("interface {ifname} already exists in netns {}", netns.display()),
            format!("container {id}"),
        ));
    }
    let host_if = host_ifname(id, ifname);
    // A host end without its pod end is a leftover of a crashed ADD of this very
    // container (the name is derived from it): remove it and start clean (STYLE.md 8).
    if link::ifindex(&host_if).is_some() {
        link::ip(None, &["link", "del", &host_if]).map_err(link_err)?;
    }
    let mut undo = Undo { net, ip: None, host_if: None };
    let ip = net.ipam.allocate(id, ifname).map_err(|e| match e {
        ipam::IpamError::Exhausted { .. } => CniError::new(code::RANGE_EXHAUSTED, e.to_string(), ""),
        ipam::IpamError::Io { .. } => CniError::new(code::IO_FAILURE, e.to_string(), ""),
    })?;
    undo.ip = Some(ip);
    let mtu = net.mtu.to_string();
    let pod_mac = pod_mac(ip);
    let ns = netns
        .to_str()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "environment variable CNI_NETNS is not UTF-8", ""))?;
    // The peer is created directly inside the pod's namespace under its final name, so
    // it never appears in the node's namespace and the name check is the kernel's.
    link::ip(
        None,
        &[
            "link", "add", &host_if, "mtu", &mtu, "address", HOST_MAC, "type", "veth", "peer", "name", ifname, "mtu",
            &mtu, "address", &pod_mac, "netns", ns,
        ],
    )
    .map_err(link_err)?;
    undo.host_if = Some(host_if.clone());
    let gw = net.gateway;
    link::ip_batch(
        Some(netns),
        &format!(
            "addr add {ip}/32 dev {ifname}\n\
             link set {ifname} up\n\
             route add {gw}/32 dev {ifname} scope link\n\
             route add default via {gw} dev {ifname}\n\
             neigh replace {gw} lladdr {HOST_MAC} dev {ifname} nud permanent\n"
        ),
    )
    .map_err(link_err)?;
    let host_ifindex = link::ifindex(&host_if)
        .ok_or_else(|| link_err(format!("host interface {host_if} vanished right after it was created")))?;
    // The pod's name lets the agent give its address the pod's identity now, before
    // the kubelet reports the IP: a policy that isolates the pod holds from its first
    // packet. The host end stays down until the agent has answered, so nothing passes
    // the interface unpoliced.
    let (pod_namespace, pod_name) = pod_of(env);
    let req = Request::Attach(AttachRequest {
        container_id: id.to_string(),
        ifname: ifname.to_string(),
        host_ifname: host_if.clone(),
        host_ifindex,
        ip,
        netns: ns.to_string(),
        pod_namespace,
        pod_name,
    });
    agent_proto::call(&net.conf.agent_socket, &req, AGENT_TIMEOUT).map_err(agent_err)?;
    link::ip_batch(None, &format!("link set {host_if} up\nroute replace {ip}/32 dev {host_if} scope link\n"))
        .map_err(link_err)?;
    undo.done();
    Ok(json!({
        "cniVersion": net.conf.cni_version,
        "interfaces": [
            {"name": host_if, "mac": HOST_MAC},
            {"name": ifname, "mac": pod_mac, "sandbox": ns},
        ],
        "ips": [{"address": format!("{ip}/32"), "gateway": gw.to_string(), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gw.to_string()}],
        "dns": {},
    }))
}

/// K8S_POD_NAMESPACE and K8S_POD_NAME from CNI_ARGS (`K=V;K=V`), as the kubelet's
/// runtime passes them; absent when the runtime is not Kubernetes'.
fn pod_of(env: &Env) -> (Option<String>, Option<String>) {
    let args = env.get("CNI_ARGS").unwrap_or("");
    let get = |k: &str| {
        args.split(';').filter_map(|kv| kv.split_once('=')).find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
    };
    (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME"))
}

fn agent_err(e: AgentError) -> CniError {
    match &e {
        // Unreachable or refused: the runtime retries the sandbox, and by then the agent
        // may be up (or have fixed what made it refuse).
        AgentError::Unreachable { .. } | AgentError::Refused { .. } => {
            CniError::new(code::TRY_AGAIN_LATER, e.to_string(), "the node agent attaches the pod's policy programs")
        }
        AgentError::Protocol { .. } => CniError::new(code::IO_FAILURE, e.to_string(), ""),
    }
}

fn del(env: &Env, net: &Net) -> Res<()> {
    let id = env.need("CNI_CONTAINERID")?;
    let ifname = env.need("CNI_IFNAME")?;
    // No netns and no agent needed: the host end's name comes from (id, ifname), and
    // deleting it removes the pod end and the routes. Missing pieces are fine (DEL runs
    // again after a partial DEL, or for an ADD that never happened).
    let host_if = host_ifname(id, ifname);
    if link::ifindex(&host_if).is_some() {
        if let Err(e) = link::ip(None, &["link", "del", &host_if]) {
            // Raced with another deleter, or the kernel refused: only the latter is worth
            // a retry.
            if link::ifindex(&host_if).is_some() {
                return Err(link_err(e));
            }
        }
    }
    net.ipam.records.release(id, ifname).map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))?;
    Ok(())
}

fn check(env: &Env, net: &Net) -> Res<()> {
    let id = env.need("CNI_CONTAINERID")?;
    let netns = Path::new(env.need("CNI_NETNS")?);
    let ifname = env.need("CNI_IFNAME")?;
    let fail = |m: String| CniError::new(code::CHECK_FAILED, m, format!("container {id}"));
    let prev = net.conf.prev_result.as_ref().ok_or_else(|| invalid("prevResult", "CHECK needs the result of ADD"))?;
    let host_if = host_ifname(id, ifname);
    if link::ifindex(&host_if).is_none() {
        return Err(fail(format!("host interface {host_if} of {ifname} is missing")));
    }
    if link::ifindex_in(netns, ifname).map_err(link_err)?.is_none() {
        return Err(fail(format!("interface {ifname} is missing in netns {}", netns.display())));
    }
    let addrs = link::ip(Some(netns), &["-j", "addr", "show", "dev", ifname]).map_err(link_err)?;
    let have: Vec<String> = serde_json::from_str::<Value>(&addrs)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
        .collect();
    for want in prev["ips"].as_array().into_iter().flatten().filter_map(|i| i["address"].as_str()) {
        if !have.iter().any(|h| h == want) {
            return Err(fail(format!("address {want} (prevResult) is not on {ifname}, which has {have:?}")));
        }
    }
    let routes = link::ip(Some(netns), &["-j", "route", "show", "dev", ifname]).map_err(link_err)?;
    let routes: Vec<Value> =
        serde_json::from_str::<Value>(&routes).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default();
    for r in prev["routes"].as_array().into_iter().flatten() {
        let dst = r["dst"].as_str().unwrap_or("");
        let dst_ip = if dst == "0.0.0.0/0" { "default" } else { dst.trim_end_matches("/32") };
        let found = routes.iter().any(|have| {
            have["dst"].as_str() == Some(dst_ip) && r["gw"].as_str().is_none_or(|g| have["gateway"].as_str() == Some(g))
        });
        if !found {
            return Err(fail(format!("route {r} (prevResult) is missing in netns {}", netns.display())));
        }
    }
    // STYLE.md 8: the attachment is only healthy while its policy is kept.
    agent_proto::call(&net.conf.agent_socket, &Request::Ping, AGENT_TIMEOUT).map_err(agent_err)?;
    Ok(())
}

fn status(net: &Net) -> Res<()> {
    agent_proto::call(&net.conf.agent_socket, &Request::Ping, AGENT_TIMEOUT).map_err(|e| {
        CniError::new(code::PLUGIN_NOT_AVAILABLE, e.to_string(), "ADD would fail until the node agent answers")
    })
}

fn gc(net: &Net) -> Res<()> {
    let valid: HashSet<(String, String)> = net
        .conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| invalid("cni.dev/valid-attachments", "GC needs the list of valid attachments"))?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let freed = net.ipam.records.gc(&valid).map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))?;
    // The host ends of vanished containers, where a DEL never came.
    for (_, id, ifname) in freed {
        let h = host_ifname(&id, &ifname);
        if link::ifindex(&h).is_some() {
            let _ = link::ip(None, &["link", "del", &h]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(cmd: Option<&str>, stdin: &str) -> (i32, Value) {
        let mut env = HashMap::new();
        if let Some(c) = cmd {
            env.insert("CNI_COMMAND".to_string(), c.to_string());
        }
        let mut out = Vec::new();
        let rc = main_with(&env, &mut stdin.as_bytes(), &mut out);
        (rc, serde_json::from_slice(&out).unwrap_or(Value::Null))
    }

    #[test]
    fn version_and_error_results() {
        let (rc, v) = call(Some("VERSION"), r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(rc, 0);
        assert_eq!(v, json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]}));

        let (rc, v) = call(None, "{}");
        assert_eq!((rc, v["code"].as_u64()), (1, Some(4)));
        assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{v}");

        let (rc, v) = call(Some("FROB"), r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!((rc, v["code"].as_u64()), (1, Some(4)));
        assert_eq!(v["cniVersion"], "1.0.0", "errors echo the caller's version");

        let (rc, v) = call(Some("ADD"), "not json");
        assert_eq!((rc, v["code"].as_u64()), (1, Some(6)));

        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"kubeshift","subnet":"10.1.0.0/24","agentSocket":"/x"}"#;
        let (rc, v) = call(Some("GC"), conf);
        assert_eq!((rc, v["code"].as_u64()), (1, Some(1)), "GC is 1.1.0 only: {v}");
        let (rc, v) = call(Some("GC"), &conf.replace("1.0.0", "1.1.0"));
        assert_eq!((rc, v["code"].as_u64()), (1, Some(7)));
        assert!(v["msg"].as_str().unwrap().contains("cni.dev/valid-attachments"), "{v}");
    }

    #[test]
    fn host_ifname_fits_and_is_stable() {
        let a = host_ifname("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("ks"));
        assert_eq!(a, host_ifname("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "eth1"));
    }
}
