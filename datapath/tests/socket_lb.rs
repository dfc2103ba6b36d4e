//! Real packets through the real programs: every test builds its own client/backend
//! namespaces and cgroup (see `testenv`), attaches the socket load balancer to that
//! cgroup, and drives traffic with the `kubeshift-dp-probe` binary. Needs root.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use kubeshift_datapath::{
    testenv::Lab, Affinity, Backend, Datapath, DatapathConfig, Hook, Protocol, ServiceKey, Verdict, DEFAULT_BPFFS_ROOT,
};

const B1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const B2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn probe_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kubeshift-dp-probe"))
}

/// Owns the datapath and the lab; Drop removes pins first, then (through `lab`'s own
/// Drop) servers, cgroup and namespaces — also when the test panicked.
struct Ctx {
    dp: Option<Datapath>,
    pin_dir: PathBuf,
    lab: Lab,
}

impl Ctx {
    fn new() -> Ctx {
        let mut lab = Lab::new(&[B1, B2]).expect("lab");
        lab.tcp_server(SocketAddrV4::new(B1, TCP_PORT), "b1").unwrap();
        lab.tcp_server(SocketAddrV4::new(B2, TCP_PORT), "b2").unwrap();
        lab.udp_server(SocketAddrV4::new(B1, UDP_PORT), "b1").unwrap();
        lab.udp_server(SocketAddrV4::new(B2, UDP_PORT), "b2").unwrap();
        let pin_dir = Path::new(DEFAULT_BPFFS_ROOT).join(format!("test-{}", lab.tag));
        let mut ctx = Ctx { dp: None, pin_dir, lab };
        ctx.dp = Some(Datapath::load(ctx.config()).expect("load datapath"));
        ctx
    }

    fn config(&self) -> DatapathConfig {
        DatapathConfig { pin_dir: self.pin_dir.clone(), cgroup: self.lab.cgroup.path.clone() }
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath loaded")
    }

    fn probe(&self, op: &str, addr: SocketAddrV4, n: usize) -> Vec<String> {
        self.lab.probe(probe_bin(), &[op, &addr.to_string(), &n.to_string()]).expect("probe")
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            if let Err(e) = dp.detach_and_unpin() {
                eprintln!("detach_and_unpin: {e}");
            }
        }
        // Also covers a test that dropped its handle on purpose (restart test).
        let _ = Datapath::purge(&self.pin_dir);
    }
}

fn tcp_svc() -> ServiceKey {
    ServiceKey { vip: VIP, port: 80, protocol: Protocol::Tcp }
}

fn udp_svc() -> ServiceKey {
    ServiceKey { vip: VIP, port: 53, protocol: Protocol::Udp }
}

fn be(ip: Ipv4Addr, port: u16) -> Backend {
    Backend { ip, port }
}

fn vip_tcp() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

fn vip_udp() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 53)
}

/// Parses `OK id=b1 peer=… from=…` lines into maps; panics on `ERR`.
fn ok_fields(lines: &[String]) -> Vec<BTreeMap<String, String>> {
    lines
        .iter()
        .map(|l| {
            let rest = l.strip_prefix("OK ").unwrap_or_else(|| panic!("probe failed: {l}"));
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn ids(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in ok_fields(lines) {
        *m.entry(f["id"].clone()).or_default() += 1;
    }
    m
}

#[test]
fn tcp_to_clusterip_reaches_backend_and_peer_is_the_vip() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    let lines = ctx.probe("tcp", vip_tcp(), 3);
    for f in ok_fields(&lines) {
        assert_eq!(f["id"], "b1");
        assert_eq!(f["peer"], vip_tcp().to_string(), "getpeername must show the VIP");
    }
    // Traffic to an address that is not a service is left alone.
    let direct = ctx.probe("tcp", SocketAddrV4::new(B2, TCP_PORT), 1);
    assert_eq!(ok_fields(&direct)[0]["id"], "b2");

    let flows = ctx.dp().read_flows();
    let fwd: Vec<_> = flows.iter().filter(|f| f.verdict == Verdict::Forwarded && f.hook == Hook::Connect).collect();
    assert_eq!(fwd.len(), 3, "one flow event per translated connect: {flows:?}");
    for f in fwd {
        assert_eq!(f.service, vip_tcp());
        assert_eq!(f.backend, Some(SocketAddrV4::new(B1, TCP_PORT)));
        assert_eq!(f.protocol, Some(Protocol::Tcp));
        assert_ne!(f.socket_cookie, 0);
    }
}

#[test]
fn udp_connected_and_unconnected_replies_come_from_the_vip() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(udp_svc(), vec![be(B1, UDP_PORT)], Affinity::None).unwrap();
    for f in ok_fields(&ctx.probe("udp-conn", vip_udp(), 3)) {
        assert_eq!(f["id"], "b1");
        assert_eq!(f["peer"], vip_udp().to_string());
        assert_eq!(f["from"], vip_udp().to_string());
    }
    for f in ok_fields(&ctx.probe("udp", vip_udp(), 3)) {
        assert_eq!(f["id"], "b1");
        assert_eq!(f["from"], vip_udp().to_string(), "recvmsg4 must rewrite the source");
    }
    let flows = ctx.dp().read_flows();
    assert_eq!(flows.iter().filter(|f| f.hook == Hook::Connect).count(), 3);
    assert_eq!(flows.iter().filter(|f| f.hook == Hook::SendMsg).count(), 3);
    // A TCP service on the same VIP and port number must not catch UDP, and vice versa.
    let tcp_to_udp_port = ctx.probe("tcp", vip_udp(), 1);
    assert!(tcp_to_udp_port[0].starts_with("ERR"), "{tcp_to_udp_port:?}");
}

#[test]
fn ipv6_sockets_with_v4_mapped_addresses_are_balanced_too() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    ctx.dp().upsert_service(udp_svc(), vec![be(B2, UDP_PORT)], Affinity::None).unwrap();
    let mapped = |a: SocketAddrV4| format!("[::ffff:{}]:{}", a.ip(), a.port());
    for f in ok_fields(&ctx.probe("tcp6", vip_tcp(), 2)) {
        assert_eq!(f["id"], "b1");
        assert_eq!(f["peer"], mapped(vip_tcp()));
    }
    for f in ok_fields(&ctx.probe("udp6-conn", vip_udp(), 2)) {
        assert_eq!(f["id"], "b2");
        assert_eq!(f["peer"], mapped(vip_udp()));
        assert_eq!(f["from"], mapped(vip_udp()));
    }
    for f in ok_fields(&ctx.probe("udp6", vip_udp(), 2)) {
        assert_eq!(f["id"], "b2");
        assert_eq!(f["from"], mapped(vip_udp()));
    }
    let flows = ctx.dp().read_flows();
    assert_eq!(flows.len(), 6, "{flows:?}");
    assert!(flows.iter().all(|f| f.verdict == Verdict::Forwarded), "{flows:#?}");
    // connect() on an IPv6 socket runs the connect6 hook with the mapped address; an
    // unconnected sendto() to a mapped address is handed to the IPv4 UDP code by the
    // kernel before the sendmsg6 hook, so sendmsg4 translates it (6.18 behaviour).
    assert!(flows.iter().filter(|f| f.hook == Hook::Connect).all(|f| f.v4mapped));
    assert_eq!(flows.iter().filter(|f| f.hook == Hook::SendMsg).count(), 2);
    // Refusal works from IPv6 sockets as well.
    ctx.dp().set_backends(tcp_svc(), vec![]).unwrap();
    assert_eq!(ctx.probe("tcp6", vip_tcp(), 1), vec![format!("ERR {}", libc::ECONNREFUSED)]);
}

#[test]
fn a_client_that_is_its_own_backend_reaches_itself() {
    let mut ctx = Ctx::new();
    let me = SocketAddrV4::new(kubeshift_datapath::testenv::CLIENT_IP, 9090);
    ctx.lab.client_tcp_server(me, "self").unwrap();
    ctx.dp().upsert_service(tcp_svc(), vec![be(*me.ip(), me.port())], Affinity::None).unwrap();
    for f in ok_fields(&ctx.probe("tcp", vip_tcp(), 3)) {
        assert_eq!(f["id"], "self");
        assert_eq!(f["peer"], vip_tcp().to_string());
    }
}

#[test]
fn two_backends_are_both_picked() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT), be(B2, TCP_PORT)], Affinity::None).unwrap();
    let n = 60;
    let seen = ids(&ctx.probe("tcp", vip_tcp(), n));
    // P(one backend never picked in 60 even draws) = 2^-59.
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["b1", "b2"], "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), n);
}

#[test]
fn client_ip_affinity_sticks_and_follows_endpoint_removal() {
    let mut ctx = Ctx::new();
    let affinity = Affinity::ClientIp { timeout: Duration::from_secs(600) };
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT), be(B2, TCP_PORT)], affinity).unwrap();
    let seen = ids(&ctx.probe("tcp", vip_tcp(), 30));
    assert_eq!(seen.len(), 1, "affinity must pin the client to one backend: {seen:?}");
    // Each probe run is a new process in the same netns: still the same client.
    let again = ids(&ctx.probe("tcp", vip_tcp(), 10));
    assert_eq!(again.keys().collect::<Vec<_>>(), seen.keys().collect::<Vec<_>>());

    // Remove the sticky backend: the client must move to the remaining one, not fail.
    let sticky = seen.keys().next().unwrap().clone();
    let (gone, left) = if sticky == "b1" { (B1, "b2") } else { (B2, "b1") };
    let remaining = if gone == B1 { B2 } else { B1 };
    ctx.dp().set_backends(tcp_svc(), vec![be(remaining, TCP_PORT)]).unwrap();
    let after = ids(&ctx.probe("tcp", vip_tcp(), 5));
    assert_eq!(after.keys().collect::<Vec<_>>(), [left]);

    // A service without affinity on the same datapath still spreads.
    let other = ServiceKey { port: 81, ..tcp_svc() };
    ctx.dp().upsert_service(other, vec![be(B1, TCP_PORT), be(B2, TCP_PORT)], Affinity::None).unwrap();
    assert_eq!(ids(&ctx.probe("tcp", SocketAddrV4::new(VIP, 81), 60)).len(), 2);
}

#[test]
fn client_ip_affinity_applies_to_unconnected_udp() {
    let mut ctx = Ctx::new();
    let affinity = Affinity::ClientIp { timeout: Duration::from_secs(600) };
    ctx.dp().upsert_service(udp_svc(), vec![be(B1, UDP_PORT), be(B2, UDP_PORT)], affinity).unwrap();
    let seen = ids(&ctx.probe("udp", vip_udp(), 30));
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[test]
fn a_failing_test_leaves_nothing_behind() {
    use std::sync::Mutex;
    let names: Mutex<Option<(PathBuf, PathBuf, PathBuf, PathBuf)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut ctx = Ctx::new();
        ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
        *names.lock().unwrap() =
            Some((ctx.pin_dir.clone(), ctx.lab.cgroup.path.clone(), ctx.lab.client.path(), ctx.lab.backend.path()));
        panic!("deliberate failure in the middle of a test");
    }));
    assert!(result.is_err());
    let (pins, cgroup, client_ns, backend_ns) = names.into_inner().unwrap().unwrap();
    for p in [pins, cgroup, client_ns, backend_ns] {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn affinity_expires_after_timeout() {
    let mut ctx = Ctx::new();
    let affinity = Affinity::ClientIp { timeout: Duration::from_secs(1) };
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT), be(B2, TCP_PORT)], affinity).unwrap();
    let first = ids(&ctx.probe("tcp", vip_tcp(), 5));
    assert_eq!(first.len(), 1);
    // Expiry is a property of elapsed time itself, so waiting out the timeout is the
    // condition under test, not a synchronisation guess. After expiry, each new pick is
    // random: over 12 rounds (each one expiry + fresh pick) both backends must appear.
    let mut seen = first.clone();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(1100));
        for k in ids(&ctx.probe("tcp", vip_tcp(), 1)).into_keys() {
            *seen.entry(k).or_default() += 1;
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "expired affinity must allow a new pick: {seen:?}");
}

#[test]
fn service_without_endpoints_refuses_with_econnrefused() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![], Affinity::None).unwrap();
    ctx.dp().upsert_service(udp_svc(), vec![], Affinity::None).unwrap();
    let refused = format!("ERR {}", libc::ECONNREFUSED);
    assert_eq!(ctx.probe("tcp", vip_tcp(), 2), vec![refused.clone(); 2]);
    assert_eq!(ctx.probe("udp-conn", vip_udp(), 1), vec![refused.clone()]);
    assert_eq!(ctx.probe("udp", vip_udp(), 1), vec![refused.clone()]);
    let flows = ctx.dp().read_flows();
    assert_eq!(flows.iter().filter(|f| f.verdict == Verdict::RefusedNoBackends).count(), 4, "{flows:?}");
    assert!(flows.iter().all(|f| f.backend.is_none()));
}

#[test]
fn endpoint_changes_take_effect_on_the_next_connect() {
    let mut ctx = Ctx::new();
    let svc = tcp_svc();
    ctx.dp().upsert_service(svc, vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    // Another service that the endpoint changes below must not disturb.
    let bystander = ServiceKey { port: 82, ..svc };
    ctx.dp().upsert_service(bystander, vec![be(B2, TCP_PORT)], Affinity::None).unwrap();

    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 5)).into_keys().collect::<Vec<_>>(), ["b1"]);

    ctx.dp().set_backends(svc, vec![be(B2, TCP_PORT)]).unwrap();
    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 5)).into_keys().collect::<Vec<_>>(), ["b2"]);

    ctx.dp().set_backends(svc, vec![be(B2, TCP_PORT), be(B1, TCP_PORT)]).unwrap();
    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 60)).len(), 2);

    ctx.dp().set_backends(svc, vec![]).unwrap();
    assert_eq!(ctx.probe("tcp", vip_tcp(), 1), vec![format!("ERR {}", libc::ECONNREFUSED)]);

    ctx.dp().set_backends(svc, vec![be(B1, TCP_PORT)]).unwrap();
    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 3)).into_keys().collect::<Vec<_>>(), ["b1"]);

    // Removed: the VIP is just an address again, and nothing routes it here.
    assert!(ctx.dp().remove_service(&svc).unwrap());
    let after = ctx.probe("tcp", vip_tcp(), 1);
    assert_eq!(after, vec![format!("ERR {}", libc::ENETUNREACH)]);

    let bys = ids(&ctx.probe("tcp", SocketAddrV4::new(VIP, 82), 5));
    assert_eq!(bys.into_keys().collect::<Vec<_>>(), ["b2"]);
    assert_eq!(ctx.dp().services(), vec![(bystander, vec![be(B2, TCP_PORT)], Affinity::None)]);
}

#[test]
fn endpoint_flapping_under_load_never_fails_a_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut ctx = Ctx::new();
    let svc = tcp_svc();
    ctx.dp().upsert_service(svc, vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    let done = AtomicBool::new(false);
    let Ctx { dp, lab, .. } = &mut ctx;
    let dp = dp.as_mut().unwrap();
    let (lines, flips) = std::thread::scope(|s| {
        let client = s.spawn(|| {
            let out = lab.probe(probe_bin(), &["tcp", &vip_tcp().to_string(), "300"]);
            done.store(true, Ordering::SeqCst);
            out.unwrap()
        });
        // Replace the whole backend set, back and forth, as fast as the loader can.
        let mut flips = 0u32;
        while !done.load(Ordering::SeqCst) {
            let to = if flips.is_multiple_of(2) { B2 } else { B1 };
            dp.set_backends(svc, vec![be(to, TCP_PORT)]).unwrap();
            flips += 1;
        }
        (client.join().unwrap(), flips)
    });
    eprintln!("{flips} endpoint changes during 300 connects");
    let seen = ids(&lines); // panics on any failed connect
    assert_eq!(seen.values().sum::<usize>(), 300);
    assert!(flips > 10, "only {flips} endpoint changes happened during the traffic");
}

#[test]
fn restart_reopens_pins_and_traffic_never_stops() {
    let mut ctx = Ctx::new();
    let affinity = Affinity::ClientIp { timeout: Duration::from_secs(300) };
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], affinity).unwrap();
    ctx.dp().upsert_service(udp_svc(), vec![be(B2, UDP_PORT)], Affinity::None).unwrap();
    assert!(!ctx.dp().reopened());

    // The "agent" goes away: no process holds a program, link or map fd any more.
    drop(ctx.dp.take());
    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 3)).into_keys().collect::<Vec<_>>(), ["b1"]);
    assert_eq!(ids(&ctx.probe("udp", vip_udp(), 2)).into_keys().collect::<Vec<_>>(), ["b2"]);

    // A slot no service points at, as a loader crashing mid-update would leave behind.
    let backends_pin = ctx.pin_dir.join("maps/ks_backends");
    let bpftool_map = |op: &[&str]| {
        std::process::Command::new("bpftool")
            .args(["map", op[0], "pinned"])
            .arg(&backends_pin)
            .args(&op[1..])
            .output()
            .unwrap()
            .status
            .success()
    };
    let orphan_key = ["key", "hex", "e7", "03", "00", "00", "00", "00", "00", "00"];
    let mut update = vec!["update"];
    update.extend_from_slice(&orphan_key);
    update.extend_from_slice(&["value", "hex", "0a", "c8", "00", "02", "1f", "90", "00", "00"]);
    assert!(bpftool_map(&update));

    // The "agent" comes back: it must find its state instead of reloading.
    let t = std::time::Instant::now();
    let dp = Datapath::load(ctx.config()).unwrap();
    eprintln!("reopen took {:?}", t.elapsed());
    let mut lookup = vec!["lookup"];
    lookup.extend_from_slice(&orphan_key);
    assert!(!bpftool_map(&lookup), "orphan backend slot must be collected on reopen");
    assert!(dp.reopened());
    // services() is sorted by key: port 53 before port 80.
    assert_eq!(
        dp.services(),
        vec![(udp_svc(), vec![be(B2, UDP_PORT)], Affinity::None), (tcp_svc(), vec![be(B1, TCP_PORT)], affinity),]
    );
    ctx.dp = Some(dp);
    ctx.dp().set_backends(tcp_svc(), vec![be(B2, TCP_PORT)]).unwrap();
    assert_eq!(ids(&ctx.probe("tcp", vip_tcp(), 3)).into_keys().collect::<Vec<_>>(), ["b2"]);
    // Events written while no agent was running are still in the pinned ring buffer.
    let flows = ctx.dp().read_flows();
    assert!(flows.len() >= 5 + 3, "{}", flows.len());
}

#[test]
fn flow_events_switch_off_and_a_lost_map_pin_is_recovered_in_place() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    assert!(ctx.dp().flow_events_enabled().unwrap());
    ctx.dp().set_flow_events(false).unwrap();
    ok_fields(&ctx.probe("tcp", vip_tcp(), 2));
    assert_eq!(ctx.dp().read_flows(), vec![]);
    ctx.dp().set_flow_events(true).unwrap();
    ok_fields(&ctx.probe("tcp", vip_tcp(), 1));
    assert_eq!(ctx.dp().read_flows().len(), 1);

    // What a build that adds a map looks like to `load`: one map pin is missing. The
    // running programs must be moved to the new map, not left on one nobody can reach.
    drop(ctx.dp.take());
    std::fs::remove_file(ctx.pin_dir.join("maps/ks_config")).unwrap();
    let dp = Datapath::load(ctx.config()).unwrap();
    assert!(!dp.reopened());
    assert_eq!(dp.upgraded_programs(), 8);
    assert!(ctx.pin_dir.join("maps/ks_config").exists());
    ctx.dp = Some(dp);
    assert_eq!(attached_programs(&ctx.lab.cgroup.path).len(), 8);
    ctx.dp().set_flow_events(false).unwrap();
    let f = ok_fields(&ctx.probe("tcp", vip_tcp(), 2));
    assert!(f.iter().all(|f| f["id"] == "b1"), "services survive: {f:?}");
    assert_eq!(ctx.dp().read_flows(), vec![], "programs must read the new config map");
}

#[test]
fn a_build_with_another_map_layout_is_refused_and_the_running_one_keeps_serving() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    drop(ctx.dp.take());
    // Stand-in for pins written by a build with another layout: ks_revnat with 8-byte
    // values instead of 16. The running programs keep their own map by reference.
    let pin = ctx.pin_dir.join("maps/ks_revnat");
    std::fs::remove_file(&pin).unwrap();
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "lru_hash", "key", "16", "value", "8", "entries", "16", "name", "ks_revnat"])
        .status()
        .unwrap();
    assert!(made.success());
    let err = match Datapath::load(ctx.config()) {
        Ok(_) => panic!("a mismatching map layout must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("size"), "{err}");
    assert_eq!(attached_programs(&ctx.lab.cgroup.path).len(), 8);
    let f = ok_fields(&ctx.probe("tcp", vip_tcp(), 2));
    assert!(f.iter().all(|f| f["id"] == "b1" && f["peer"] == vip_tcp().to_string()));
}

fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = std::process::Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("ks_")).map(str::to_string).collect()
}

#[cfg(ks_upgrade_variant)]
#[test]
fn new_program_build_is_swapped_in_place_under_traffic_and_can_roll_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT), be(B2, TCP_PORT)], Affinity::None).unwrap();
    assert_eq!(attached_programs(&ctx.lab.cgroup.path).len(), 8);

    // Same build again: reopened, nothing replaced.
    drop(ctx.dp.take());
    let dp = Datapath::load(ctx.config()).unwrap();
    assert!(dp.reopened());
    assert_eq!(dp.upgraded_programs(), 0);
    drop(dp);

    // A new build arrives while a client keeps connecting: the client has finished one
    // batch before the swap starts and runs batches until after it has finished.
    let done = AtomicBool::new(false);
    let cfg = ctx.config();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (lines, dp) = std::thread::scope(|s| {
        let lab = &ctx.lab;
        let done = &done;
        let client = s.spawn(move || {
            let mut all = Vec::new();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let batch = lab.probe(probe_bin(), &["tcp", &vip_tcp().to_string(), "20"]).unwrap();
                all.extend(batch);
                let _ = started_tx.send(());
                if finished {
                    return all;
                }
            }
        });
        started_rx.recv().unwrap();
        let dp = Datapath::load_object(cfg.clone(), kubeshift_datapath::SOCK_LB_OBJ_BUILD2).unwrap();
        done.store(true, Ordering::SeqCst);
        (client.join().unwrap(), dp)
    });
    ctx.dp = Some(dp);
    // Only connect4/6 and sendmsg4/6 emit events, so only their code differs; the
    // reverse-translation programs are identical and stay as they are.
    assert_eq!(ctx.dp().upgraded_programs(), 4);
    // At least one batch before and one after the swap; ok_fields panics on any failure.
    assert!(lines.len() >= 40, "{}", lines.len());
    assert!(ok_fields(&lines).iter().all(|f| f["peer"] == vip_tcp().to_string()));
    assert_eq!(attached_programs(&ctx.lab.cgroup.path).len(), 8, "replaced, not added");

    // Events from before and after the swap, in order, and the maps kept their content.
    ok_fields(&ctx.probe("tcp", vip_tcp(), 3));
    let builds: Vec<u8> = ctx.dp().read_flows().iter().map(|f| f.program_build).collect();
    assert_eq!(builds.first(), Some(&1), "{builds:?}");
    assert_eq!(builds.last(), Some(&2), "{builds:?}");
    assert!(builds.windows(2).all(|w| w[0] <= w[1]), "{builds:?}");
    assert_eq!(ctx.dp().services().len(), 1);

    // Rolling back is the same operation with the old build.
    drop(ctx.dp.take());
    ctx.dp = Some(Datapath::load(ctx.config()).unwrap());
    assert_eq!(ctx.dp().upgraded_programs(), 4);
    ok_fields(&ctx.probe("tcp", vip_tcp(), 2));
    let after: Vec<u8> = ctx.dp().read_flows().iter().map(|f| f.program_build).collect();
    assert_eq!(after, vec![1, 1]);
}

#[test]
fn detach_and_unpin_leaves_nothing_and_traffic_is_untouched() {
    let mut ctx = Ctx::new();
    ctx.dp().upsert_service(tcp_svc(), vec![be(B1, TCP_PORT)], Affinity::None).unwrap();
    assert_eq!(ok_fields(&ctx.probe("tcp", vip_tcp(), 1))[0]["id"], "b1");
    let dp = ctx.dp.take().unwrap();
    dp.detach_and_unpin().unwrap();
    assert!(!ctx.pin_dir.exists());
    // Programs are gone from the cgroup: the VIP is no longer translated.
    assert_eq!(ctx.probe("tcp", vip_tcp(), 1), vec![format!("ERR {}", libc::ENETUNREACH)]);
    let attached = attached_programs(&ctx.lab.cgroup.path);
    assert!(attached.is_empty(), "programs still attached: {attached:?}");
}
