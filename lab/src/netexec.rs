//! The echo server behind the lab's `agnhost netexec` image: the subset of agnhost's
//! netexec that connectivity checks use. HTTP: `/hostname`, `/clientip`,
//! `/echo?msg=…`, `/healthz`; UDP: `hostname`, `clientip`, `echo …`.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default())
}

/// The reply for one request path, or None for 404.
pub fn http_reply(path: &str, client: &str) -> Option<String> {
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    match p {
        "/hostname" => Some(hostname()),
        "/clientip" => Some(client.to_string()),
        "/healthz" => Some("ok".into()),
        "/echo" => Some(query.split('&').find_map(|kv| kv.strip_prefix("msg=")).unwrap_or("").to_string()),
        "/" => Some(format!("NOW: {}", k8s_openapi::jiff::Timestamp::now())),
        _ => None,
    }
}

pub fn udp_reply(msg: &str, client: &str) -> String {
    let msg = msg.trim();
    if msg == "hostname" {
        hostname()
    } else if msg == "clientip" {
        client.to_string()
    } else if let Some(rest) = msg.strip_prefix("echo ") {
        rest.to_string()
    } else {
        format!("unknown command {msg:?}")
    }
}

fn serve_http(mut s: TcpStream) {
    let client = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut line = String::new();
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    if r.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers so the client sees a clean close.
    let mut h = String::new();
    while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
        h.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match http_reply(path, &client) {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", "not found".to_string()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Replies leave from the address the request was sent to (IP_PKTINFO). On a node
/// with several addresses (cni0, eth0) the routing table would otherwise pick the
/// source, and a client's connected UDP socket drops the mismatched reply.
fn serve_udp(sock: &UdpSocket) -> Result<()> {
    use nix::sys::socket::{
        recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn,
    };
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    setsockopt(sock, sockopt::Ipv4PacketInfo, &true)?;
    let fd = sock.as_raw_fd();
    let mut buf = [0u8; 2048];
    loop {
        let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
        let (n, from, local) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
            let local = msg.cmsgs()?.find_map(|c| match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => Some(pi.ipi_addr),
                _ => None,
            });
            (msg.bytes, msg.address, local)
        };
        let Some(from) = from else { continue };
        let reply = udp_reply(&String::from_utf8_lossy(&buf[..n]), &std::net::SocketAddrV4::from(from).to_string());
        let iov = [IoSlice::new(reply.as_bytes())];
        let r = match local {
            Some(addr) => {
                let pi = libc::in_pktinfo { ipi_ifindex: 0, ipi_spec_dst: addr, ipi_addr: addr };
                sendmsg(fd, &iov, &[ControlMessage::Ipv4PacketInfo(&pi)], MsgFlags::empty(), Some(&from))
            }
            None => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&from)),
        };
        if let Err(e) = r {
            eprintln!("netexec: UDP reply to {from}: {e}");
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut http = 8080u16;
    let mut udp = None;
    for a in args {
        if let Some(v) = a.strip_prefix("--http-port=") {
            http = v.parse().with_context(|| format!("netexec: bad {a}"))?;
        } else if let Some(v) = a.strip_prefix("--udp-port=") {
            udp = Some(v.parse::<u16>().with_context(|| format!("netexec: bad {a}"))?);
        }
    }
    if let Some(port) = udp {
        let sock = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("netexec: UDP port {port}"))?;
        std::thread::spawn(move || {
            if let Err(e) = serve_udp(&sock) {
                eprintln!("netexec: UDP: {e}");
            }
        });
    }
    let l = TcpListener::bind(("0.0.0.0", http)).with_context(|| format!("netexec: HTTP port {http}"))?;
    for s in l.incoming().flatten() {
        std::thread::spawn(move || serve_http(s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(http_reply("/echo?msg=hi", "1.2.3.4:5").as_deref(), Some("hi"));
        assert_eq!(http_reply("/clientip", "1.2.3.4:5").as_deref(), Some("1.2.3.4:5"));
        assert_eq!(http_reply("/nope", ""), None);
        assert_eq!(udp_reply("echo x y\n", ""), "x y");
        assert_eq!(udp_reply("clientip", "9.9.9.9:1"), "9.9.9.9:1");
    }
}
