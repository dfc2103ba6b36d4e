// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// NetworkPolicy enforcement on a pod's host-side interface (tcx).
//
// tcx ingress of the host-side veth sees what the pod sends (the pod's egress policy),
// tcx egress sees what is delivered to the pod (its ingress policy). The local pod is
// whoever owns the pod end of the interface: the source address on ks_pol_egress, the
// destination on ks_pol_ingress. Both ends get their identity from the LPM ipcache.
//
// Layouts of ks_ipcache, ks_isolation and ks_policy are the ones documented on
// `policy::model::Compiled`; the Rust mirrors are in src/policy/loader.rs.
//
// Connection tracking (ks_pol_ct) exists only so replies of allowed connections pass.
// Entries are per interface and per direction: the entry a sender's egress check creates
// does not open the receiver's ingress check on the same node. A packet is a reply when
// its reversed tuple has an entry of the other direction on the same interface.
// Entries carry the policy generation they were checked against (ks_pol_config.gen,
// bumped by the loader after every change): an entry of an older generation is checked
// again, so a policy change applies to flows that are already established, and a
// reused 5-tuple never inherits a stale verdict.
//
// Decisions for traffic the model does not describe:
// - ARP passes (neighbour resolution is not policy).
// - IPv6: the policy model is IPv4-only, so an IPv6 packet cannot be given an identity.
//   Neighbour discovery (ICMPv6 133-137) passes; everything else IPv6 is dropped
//   (reason KS_DROP_L3), because passing it would let an isolated pod bypass its
//   policy over any IPv6 address. Other ethertypes are dropped the same way.
// - IPv4 fragments: the first fragment carries the ports and is checked like any packet;
//   if it passes, its (addresses, protocol, IP id) are remembered in ks_pol_frags with its
//   ports, and later fragments of the same datagram are checked with those ports.
//   A non-first fragment that arrives before its first fragment is checked with port 0,
//   i.e. only rules that allow every port of the protocol (or every protocol) let it
//   through (the datagram would not be reassembled without its head anyway).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// tcx verdicts (linux/bpf.h of the build machine may predate tcx).
#define KS_TCX_NEXT -1
#define KS_TCX_DROP 2

#define DIR_INGRESS 1
#define DIR_EGRESS 2

#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2

#define KS_DROP_NONE 0
#define KS_DROP_POLICY_INGRESS 1
#define KS_DROP_POLICY_EGRESS 2
#define KS_DROP_L3 3
#define KS_DROP_MALFORMED 4

#define CT_NEW 1
#define CT_ESTABLISHED 2
#define CT_REPLY 3

#define POLICY_F_ALLOW 0x1
#define CFG_F_NO_FLOW_EVENTS 0x1

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define ETH_P_ARP_ 0x0806
#define ETH_P_IPV6_ 0x86DD
#define IPPROTO_ICMPV6_ 58

struct ipcache_key {
	__u32 prefixlen;
	__u32 addr; // network order
};

struct ipcache_val {
	__u32 identity;
	__u32 flags;
};

struct isolation_val {
	__u8 ingress;
	__u8 egress;
	__u16 pad;
};

struct policy_key {
	__u32 prefixlen; // 72 = any protocol/port, 80 = any port of proto, 96 - k = 2^k ports
	__u32 local_id;
	__u32 peer_id;
	__u8 direction;
	__u8 proto;
	__u16 port; // network order, so port blocks are bit prefixes
};

struct policy_val {
	__u32 flags;
};

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 direction; // the check that created the entry
	__u16 pad;
	__u32 ifindex;
};

struct ct_val {
	__u64 created_ns;
	__u32 gen;
	__u32 pad;
};

struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 direction;
	__u32 ifindex;
};

struct frag_val {
	__u16 sport;
	__u16 dport;
};

struct pol_config {
	__u32 flags;
	__u32 gen;
};

struct pol_flow {
	__u64 ts_ns;
	__u32 saddr;
	__u32 daddr;
	__u32 src_id;
	__u32 dst_id;
	__u32 ifindex;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 verdict;
	__u8 reason;
	__u8 direction; // the pod's point of view: 1 ingress (to it), 2 egress (from it)
	__u8 ct_state;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct isolation_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_isolation SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__type(key, struct policy_key);
	__type(value, struct policy_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
} ks_pol_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_val);
} ks_pol_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pol_config);
} ks_pol_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} ks_pol_flows SEC(".maps");

struct pkt {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
};

static __always_inline __u32 identity_of(__u32 addr)
{
	struct ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_val *v = bpf_map_lookup_elem(&ks_ipcache, &k);
	// No entry at all only before the loader's first apply: nothing is isolated then.
	return v ? v->identity : 0;
}

static __always_inline int policy_allows(__u32 local_id, __u32 peer_id, __u8 dir, __u8 proto,
					 __u16 port)
{
	struct isolation_val *iso = bpf_map_lookup_elem(&ks_isolation, &local_id);
	if (!iso)
		return 1;
	if (!(dir == DIR_INGRESS ? iso->ingress : iso->egress))
		return 1;
	struct policy_key k = {
		.prefixlen = 96,
		.local_id = local_id,
		.peer_id = peer_id,
		.direction = dir,
		.proto = proto,
		.port = port,
	};
	struct policy_val *v = bpf_map_lookup_elem(&ks_policy, &k);
	if (v && (v->flags & POLICY_F_ALLOW))
		return 1;
	k.peer_id = 0; // ANY_PEER
	v = bpf_map_lookup_elem(&ks_policy, &k);
	return v && (v->flags & POLICY_F_ALLOW);
}

static __always_inline void emit(struct __sk_buff *skb, struct pol_config *cfg,
				 const struct pkt *p, __u32 src_id, __u32 dst_id, __u8 dir,
				 __u8 verdict, __u8 reason, __u8 ct_state)
{
	if (cfg->flags & CFG_F_NO_FLOW_EVENTS)
		return;
	struct pol_flow *e = bpf_ringbuf_reserve(&ks_pol_flows, sizeof(*e), 0);
	if (!e)
		return; // a full ring loses events, never packets
	e->ts_ns = bpf_ktime_get_ns();
	e->saddr = p->saddr;
	e->daddr = p->daddr;
	e->src_id = src_id;
	e->dst_id = dst_id;
	e->ifindex = skb->ifindex;
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = dir;
	e->ct_state = ct_state;
	e->pad[0] = 0;
	e->pad[1] = 0;
	e->pad[2] = 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int drop_unparsed(struct __sk_buff *skb, struct pol_config *cfg, __u8 dir,
					 __u8 reason)
{
	struct pkt p = {};
	emit(skb, cfg, &p, 0, 0, dir, VERDICT_DROPPED, reason, 0);
	return KS_TCX_DROP;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 zero = 0;
	struct pol_config *cfg = bpf_map_lookup_elem(&ks_pol_config, &zero);
	if (!cfg)
		return KS_TCX_NEXT;

	__u16 h_proto;
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &h_proto, 2) < 0)
		return drop_unparsed(skb, cfg, dir, KS_DROP_MALFORMED);
	h_proto = bpf_ntohs(h_proto);
	if (h_proto == ETH_P_ARP_)
		return KS_TCX_NEXT;
	if (h_proto == ETH_P_IPV6_) {
		// Fixed IPv6 header: next header at 6, ICMPv6 type right after the 40 bytes.
		__u8 nexthdr, type;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &nexthdr, 1) == 0 &&
		    nexthdr == IPPROTO_ICMPV6_ &&
		    bpf_skb_load_bytes(skb, ETH_HLEN + 40, &type, 1) == 0 && type >= 133 &&
		    type <= 137)
			return KS_TCX_NEXT;
		return drop_unparsed(skb, cfg, dir, KS_DROP_L3);
	}
	if (h_proto != ETH_P_IP)
		return drop_unparsed(skb, cfg, dir, KS_DROP_L3);

	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
		return drop_unparsed(skb, cfg, dir, KS_DROP_MALFORMED);

	struct pkt p = {
		.saddr = ip.saddr,
		.daddr = ip.daddr,
		.proto = ip.protocol,
	};
	__u16 frag = bpf_ntohs(ip.frag_off);
	int has_ports = p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP;
	struct frag_key fk = {
		.saddr = ip.saddr,
		.daddr = ip.daddr,
		.id = ip.id,
		.proto = ip.protocol,
		.direction = dir,
		.ifindex = skb->ifindex,
	};
	if (has_ports) {
		if (frag & IP_OFFSET) {
			struct frag_val *fv = bpf_map_lookup_elem(&ks_pol_frags, &fk);
			if (fv) {
				p.sport = fv->sport;
				p.dport = fv->dport;
			}
		} else {
			__u16 ports[2];
			if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, ports, 4) < 0)
				return drop_unparsed(skb, cfg, dir, KS_DROP_MALFORMED);
			p.sport = ports[0];
			p.dport = ports[1];
		}
	}

	__u32 now_gen = cfg->gen;
	struct ct_key fwd = {
		.saddr = p.saddr,
		.daddr = p.daddr,
		.sport = p.sport,
		.dport = p.dport,
		.proto = p.proto,
		.direction = dir,
		.ifindex = skb->ifindex,
	};
	struct ct_key rev = {
		.saddr = p.daddr,
		.daddr = p.saddr,
		.sport = p.dport,
		.dport = p.sport,
		.proto = p.proto,
		.direction = dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS,
		.ifindex = skb->ifindex,
	};
	struct ct_val *fv = bpf_map_lookup_elem(&ks_pol_ct, &fwd);
	struct ct_val *rv = NULL;
	if (fv && fv->gen == now_gen)
		goto pass;
	rv = bpf_map_lookup_elem(&ks_pol_ct, &rev);
	if (rv && rv->gen == now_gen)
		goto pass;

	__u32 src_id = identity_of(p.saddr);
	__u32 dst_id = identity_of(p.daddr);
	__u32 local_id = dir == DIR_EGRESS ? src_id : dst_id;
	__u32 peer_id = dir == DIR_EGRESS ? dst_id : src_id;

	if (rv) {
		// A reply of a flow checked under an older policy: still a reply if the
		// original direction is allowed now (its destination port is our source).
		if (policy_allows(local_id, peer_id, rev.direction, p.proto, p.sport)) {
			rv->gen = now_gen;
			goto pass;
		}
		bpf_map_delete_elem(&ks_pol_ct, &rev);
	}

	if (!policy_allows(local_id, peer_id, dir, p.proto, p.dport)) {
		if (fv)
			bpf_map_delete_elem(&ks_pol_ct, &fwd);
		emit(skb, cfg, &p, src_id, dst_id, dir, VERDICT_DROPPED,
		     dir == DIR_INGRESS ? KS_DROP_POLICY_INGRESS : KS_DROP_POLICY_EGRESS,
		     fv ? CT_ESTABLISHED : CT_NEW);
		return KS_TCX_DROP;
	}
	if (fv) {
		fv->gen = now_gen;
	} else {
		struct ct_val nv = { .created_ns = bpf_ktime_get_ns(), .gen = now_gen };
		bpf_map_update_elem(&ks_pol_ct, &fwd, &nv, BPF_ANY);
		emit(skb, cfg, &p, src_id, dst_id, dir, VERDICT_FORWARDED, KS_DROP_NONE, CT_NEW);
	}

pass:
	if (has_ports && (frag & IP_MF) && !(frag & IP_OFFSET)) {
		struct frag_val v = { .sport = p.sport, .dport = p.dport };
		bpf_map_update_elem(&ks_pol_frags, &fk, &v, BPF_ANY);
	}
	return KS_TCX_NEXT;
}

// tcx ingress of the host-side interface: packets the pod sends.
SEC("classifier/ks_pol_egress")
int ks_pol_egress(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

// tcx egress of the host-side interface: packets delivered to the pod.
SEC("classifier/ks_pol_ingress")
int ks_pol_ingress(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
