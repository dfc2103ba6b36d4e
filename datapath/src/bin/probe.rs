//! Test client for the datapath tests and benchmark. It is started already inside the
//! client network namespace and the test cgroup (see `testenv::Lab::probe`), so every
//! socket it opens goes through the socket hooks. One output line per attempt:
//! `OK key=value …` or `ERR <errno>`, `T <nanoseconds>` for timings.

use std::{
    io::Read,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn errno(e: &std::io::Error) -> String {
    format!("ERR {}", e.raw_os_error().unwrap_or(-1))
}

fn tcp(addr: SocketAddr) -> String {
    let mut s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_else(|e| errno(&e));
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let mut id = String::new();
    if let Err(e) = s.read_to_string(&mut id) {
        return errno(&e);
    }
    format!("OK id={} peer={peer}", id.trim())
}

fn udp(addr: SocketAddr, connected: bool) -> String {
    let any = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let s = match UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => return errno(&e),
    };
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let sent = if connected {
        if let Err(e) = s.connect(addr) {
            return errno(&e);
        }
        s.send(b"ping")
    } else {
        s.send_to(b"ping", addr)
    };
    if let Err(e) = sent {
        return errno(&e);
    }
    let mut buf = [0u8; 1500];
    let (n, from) = match s.recv_from(&mut buf) {
        Ok(r) => r,
        Err(e) => return errno(&e),
    };
    let reply = String::from_utf8_lossy(&buf[..n]);
    let id = reply.split_whitespace().next().unwrap_or("");
    let peer =
        if connected { s.peer_addr().map(|p| p.to_string()).unwrap_or_else(|e| errno(&e)) } else { "-".to_string() };
    format!("OK id={id} peer={peer} from={from}")
}

fn time_connect(addr: SocketAddr) -> String {
    let t = Instant::now();
    match TcpStream::connect(addr) {
        Ok(s) => {
            drop(s);
            format!("{}", t.elapsed().as_nanos())
        }
        Err(e) => errno(&e),
    }
}

/// `connect-mix A,B,C COUNT`: COUNT timed connects to each address, round-robin one at a
/// time, so machine noise (other builds on the 2 cores) hits every variant alike. Output:
/// `T <variant index> <ns>`.
///
/// With KS_PROBE_FLOOR=`<floor cgroup>|<this cgroup>|<addr>`, also times `addr` from a
/// cgroup without programs: the probe moves itself there for blocks of 50 connections
/// between the round-robin blocks (a cgroup move per connection would cost more than
/// what is measured). Its variant index is the number of addresses.
fn connect_mix(list: &str, count: usize) {
    const BLOCK: usize = 50;
    // A variant may name several addresses joined by '+': it then rotates through them,
    // e.g. the pod IPs behind a 4-endpoint service, to compare like with like.
    let parse =
        |v: &str| -> Vec<SocketAddr> { v.split('+').map(|a| SocketAddr::V4(a.parse().expect("ADDR:PORT"))).collect() };
    let variants: Vec<Vec<SocketAddr>> = list.split(',').map(parse).collect();
    let floor = std::env::var("KS_PROBE_FLOOR").ok().map(|v| {
        let p: Vec<String> = v.split('|').map(str::to_string).collect();
        (p[0].clone(), p[1].clone(), parse(&p[2]))
    });
    let enter = |cg: &str| {
        std::fs::write(format!("{cg}/cgroup.procs"), "0").expect("move to cgroup");
    };
    let mut out = String::new();
    let mut done = 0;
    while done < count {
        let n = BLOCK.min(count - done);
        for k in done..done + n {
            for (i, a) in variants.iter().enumerate() {
                out.push_str(&format!("T {i} {}\n", time_connect(a[k % a.len()])));
            }
        }
        if let Some((floor_cg, lb_cg, a)) = &floor {
            enter(floor_cg);
            for k in done..done + n {
                let t = time_connect(a[k % a.len()]);
                out.push_str(&format!("T {} {t}\n", variants.len()));
            }
            enter(lb_cg);
        }
        done += n;
    }
    print!("{out}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: {} tcp|udp|udp-conn|tcp6|udp6|udp6-conn|connect-bench ADDR:PORT COUNT", args[0]);
        std::process::exit(2);
    }
    if args[1] == "connect-mix" {
        connect_mix(&args[2], args[3].parse().expect("COUNT"));
        return;
    }
    let addr4: SocketAddrV4 = args[2].parse().expect("ADDR:PORT");
    // The *6 ops reach the same IPv4 address from an IPv6 socket (::ffff:a.b.c.d).
    let addr = SocketAddr::V4(addr4);
    let mapped = SocketAddr::V6(SocketAddrV6::new(addr4.ip().to_ipv6_mapped(), addr4.port(), 0, 0));
    let count: usize = args[3].parse().expect("COUNT");
    let mut out = String::new();
    for _ in 0..count {
        let line = match args[1].as_str() {
            "tcp" => tcp(addr),
            "udp" => udp(addr, false),
            "udp-conn" => udp(addr, true),
            "tcp6" => tcp(mapped),
            "udp6" => udp(mapped, false),
            "udp6-conn" => udp(mapped, true),
            // The benchmark's unit: a new connection, handshake included, then close.
            // A plain blocking connect, as an application would do it.
            "connect-bench" => {
                let r = time_connect(addr);
                if r.starts_with("ERR") {
                    r
                } else {
                    format!("T {r}")
                }
            }
            op => {
                eprintln!("unknown op {op}");
                std::process::exit(2);
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    print!("{out}");
}
