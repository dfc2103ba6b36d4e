//! The overlay's kernel side through rtnetlink, in the agent's network namespace (the
//! node's: the agent runs with hostNetwork). Every write is a create-or-replace, so
//! applying the same state twice is a no-op.
//!
//! rtnetlink 0.14 has no request for "an FDB entry with a destination IP" (what
//! `bridge fdb add MAC dev vx dst IP self permanent` sends), so that one pushes NDA_DST
//! onto the request message itself; the same for the route's `onlink` flag.

use super::{Cidr, Forwarding, OverlayConfig};
use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlag, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlag, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};
use std::net::{IpAddr, Ipv4Addr};

/// A netlink connection in the current network namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = h.clone().link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("looking up link {name}")),
    }
}

/// The interface carrying `ip` and its MTU: the overlay's underlay.
pub async fn underlay(h: &Handle, ip: Ipv4Addr) -> Result<(u32, String, u32)> {
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await.context("listing addresses")? {
        let has = a.attributes.iter().any(|at| {
            matches!(at, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == ip)
        });
        if has {
            let idx = a.header.index;
            let mut links = h.clone().link().get().match_index(idx).execute();
            let l = links.try_next().await.with_context(|| format!("reading link {idx}"))?.context("link vanished")?;
            let name = link_name(&l).unwrap_or_default();
            let mtu = l.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None });
            return Ok((idx, name, mtu.unwrap_or(1500)));
        }
    }
    bail!("no interface in this network namespace carries the node's InternalIP {ip}")
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
}

/// A VXLAN link's (VNI, port, local address, underlay ifindex, learning).
type VxlanSettings = (u32, u16, Option<Ipv4Addr>, Option<u32>, Option<bool>);

/// The VXLAN settings a link has, to tell whether the existing device is the wanted one.
fn vxlan_settings(l: &LinkMessage) -> Option<VxlanSettings> {
    let infos = l.attributes.iter().find_map(|a| if let LinkAttribute::LinkInfo(i) = a { Some(i) } else { None })?;
    if !infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))) {
        return None;
    }
    let data = infos.iter().find_map(|i| if let LinkInfo::Data(InfoData::Vxlan(d)) = i { Some(d) } else { None })?;
    let (mut vni, mut port, mut local, mut link, mut learning) = (0, 0, None, None, None);
    for d in data {
        match d {
            InfoVxlan::Id(v) => vni = *v,
            InfoVxlan::Port(p) => port = *p,
            InfoVxlan::Local(b) if b.len() == 4 => local = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            InfoVxlan::Link(i) => link = Some(*i),
            InfoVxlan::Learning(x) => learning = Some(*x),
            _ => {}
        }
    }
    Some((vni, port, local, link, learning))
}

/// Creates (or keeps, or recreates when its settings differ) the VXLAN device with the
/// node's gateway address on it, up, with the given MTU and MAC. Returns its ifindex.
pub async fn ensure_device(
    h: &Handle,
    cfg: &OverlayConfig,
    node_ip: Ipv4Addr,
    underlay_index: u32,
    mtu: u32,
    mac: [u8; 6],
    range: Cidr,
) -> Result<u32> {
    let dev = &cfg.device;
    if let Some(l) = link_by_name(h, dev).await? {
        let want = (cfg.vni, cfg.port, Some(node_ip), Some(underlay_index), Some(false));
        if vxlan_settings(&l) != Some(want) {
            tracing::info!(device = %dev, have = ?vxlan_settings(&l), want = ?want, "overlay device differs; recreating it");
            h.link().del(l.header.index).execute().await.with_context(|| format!("deleting link {dev}"))?;
        }
    }
    let idx = match link_by_name(h, dev).await? {
        Some(l) => l.header.index,
        None => {
            h.link()
                .add()
                .vxlan(dev.clone(), cfg.vni)
                .link(underlay_index)
                .port(cfg.port)
                .local(node_ip)
                .learning(false)
                .execute()
                .await
                .with_context(|| {
                    format!("creating VXLAN device {dev} (VNI {}, port {}, local {node_ip})", cfg.vni, cfg.port)
                })?;
            link_by_name(h, dev)
                .await?
                .with_context(|| format!("link {dev} missing right after creating it"))?
                .header
                .index
        }
    };
    h.link()
        .set(idx)
        .mtu(mtu)
        .address(mac.to_vec())
        .up()
        .execute()
        .await
        .with_context(|| format!("setting MTU {mtu}, MAC and up on {dev}"))?;
    // The device's address: the node's gateway (/32, so it claims no on-link subnet).
    let gw = range.first();
    let mut have = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(idx).execute();
    while let Some(a) = addrs.try_next().await.with_context(|| format!("listing addresses of {dev}"))? {
        have.push(a);
    }
    let mut present = false;
    for a in have {
        let this = a.attributes.iter().any(|at| matches!(at, AddressAttribute::Local(IpAddr::V4(x)) if *x == gw));
        if this && a.header.prefix_len == 32 {
            present = true;
        } else if a.header.family == AddressFamily::Inet {
            // A gateway of an earlier range (the pod CIDR changed): it would answer for
            // an address another node may own now.
            h.address().del(a).execute().await.with_context(|| format!("removing a stale address from {dev}"))?;
        }
    }
    if !present {
        h.address().add(idx, IpAddr::V4(gw), 32).execute().await.with_context(|| format!("adding {gw}/32 to {dev}"))?;
    }
    Ok(idx)
}

/// The routes, permanent neighbours and FDB entries the device has now.
pub async fn read(h: &Handle, idx: u32) -> Result<Forwarding> {
    let mut f = Forwarding::default();
    let mut routes = h.route().get(IpVersion::V4).execute();
    while let Some(r) = routes.try_next().await.context("listing routes")? {
        if !r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == idx)) {
            continue;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        let gw = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        });
        if let (Some(d), Some(g)) = (dst, gw) {
            f.routes.insert(Cidr { addr: d, len: r.header.destination_prefix_length }, g);
        }
    }
    let mut neigh = h.neighbours().get().set_family(IpVersion::V4).execute();
    while let Some(n) = neigh.try_next().await.context("listing neighbours")? {
        if n.header.ifindex != idx || n.header.state != NeighbourState::Permanent {
            continue;
        }
        if let (Some(IpAddr::V4(d)), Some(mac)) = (neigh_dst(&n), neigh_lla(&n)) {
            f.neighbours.insert(d, mac);
        }
    }
    let mut req = h.neighbours().get();
    req.message_mut().header.family = AddressFamily::Bridge;
    let mut fdb = req.execute();
    while let Some(n) = fdb.try_next().await.context("listing FDB entries")? {
        if n.header.ifindex != idx {
            continue;
        }
        if let (Some(IpAddr::V4(d)), Some(mac)) = (neigh_dst(&n), neigh_lla(&n)) {
            f.fdb.insert(mac, d);
        }
    }
    Ok(f)
}

fn neigh_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => Some(IpAddr::V4(*v)),
        // In an AF_BRIDGE (FDB) message the parser cannot tell the family of NDA_DST
        // from the header, and leaves the bytes raw.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
            Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        }
        _ => None,
    })
}

fn neigh_lla(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => b.as_slice().try_into().ok(),
        _ => None,
    })
}

fn mac_str(m: &[u8; 6]) -> String {
    super::fmt_mac(m)
}

/// Sets (create or replace) every entry of `f` on the device.
pub async fn set(h: &Handle, idx: u32, f: &Forwarding) -> Result<()> {
    // FDB and neighbour before the route: the route makes traffic flow, and the
    // entries it needs must already be there.
    for (mac, ip) in &f.fdb {
        let mut req = h.neighbours().add_bridge(idx, mac).replace();
        // NDA_DST: the remote VTEP (see the module comment); NTF_SELF: the entry is the
        // VXLAN device's own table, not a bridge's.
        req.message_mut().attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
        req.message_mut().header.flags = vec![NeighbourFlag::Own];
        req.execute().await.with_context(|| format!("FDB {} dst {ip}", mac_str(mac)))?;
    }
    for (ip, mac) in &f.neighbours {
        h.neighbours()
            .add(idx, IpAddr::V4(*ip))
            .link_local_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("neighbour {ip} lladdr {}", mac_str(mac)))?;
    }
    for (range, gw) in &f.routes {
        let mut req = h.route().add().v4().destination_prefix(range.addr, range.len).gateway(*gw).output_interface(idx);
        // onlink: the gateway is not in any subnet of the device (it carries a /32).
        req.message_mut().header.flags.push(RouteFlag::Onlink);
        req.replace().execute().await.with_context(|| format!("route {range} via {gw} onlink"))?;
    }
    Ok(())
}

/// Deletes every entry of `f` from the device; entries already gone are fine.
pub async fn delete(h: &Handle, idx: u32, f: &Forwarding) -> Result<()> {
    fn gone(e: &rtnetlink::Error) -> bool {
        matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH)
    }
    for (range, gw) in &f.routes {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = range.len;
        m.header.table = 254; // main
        m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(range.addr)));
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(*gw)));
        m.attributes.push(RouteAttribute::Oif(idx));
        if let Err(e) = h.route().del(m).execute().await {
            if !gone(&e) {
                return Err(anyhow!(e)).with_context(|| format!("deleting route {range} via {gw}"));
            }
        }
    }
    for ip in f.neighbours.keys() {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = idx;
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
        if let Err(e) = h.neighbours().del(m).execute().await {
            if !gone(&e) {
                return Err(anyhow!(e)).with_context(|| format!("deleting neighbour {ip}"));
            }
        }
    }
    for (mac, ip) in &f.fdb {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = idx;
        m.header.flags = vec![NeighbourFlag::Own];
        m.attributes.push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
        if let Err(e) = h.neighbours().del(m).execute().await {
            if !gone(&e) {
                return Err(anyhow!(e)).with_context(|| format!("deleting FDB {} dst {ip}", mac_str(mac)));
            }
        }
    }
    Ok(())
}
