// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// NodePort and external-IP load balancing for traffic that arrives from outside the node
// (no local socket connect() to hook): tcx programs on the node's external interface.
//
// ingress: a packet to a frontend (node IP or external IP, port, protocol) is DNATed to a
//   backend chosen at random; a connection-tracking entry pins the connection to it.
//   - backend on this node: only the destination changes; the stack routes it to the pod,
//     which sees the real client address.
//   - backend on another node (externalTrafficPolicy Cluster): the source is also
//     rewritten to this node's IP and a free port, and the packet is sent out directly
//     with bpf_fib_lookup + bpf_redirect_neigh. Handing it to the stack would not work: a
//     forwarded packet whose source is one of our own addresses is dropped as martian.
//   - the backend's reply to that port comes back here; both translations are undone and
//     the packet is redirected straight to the client.
// egress: the reply of a pod on this node leaves through the external interface; its
//   source (pod IP and port) becomes the frontend again. Doing it here rather than on
//   each pod's interface keeps the datapath to one attachment point, and every reply to
//   an external client has to leave through it anyway.
//
// Addresses and ports are in network byte order everywhere, as on the wire. The layouts
// are mirrored in src/nodeport.rs (module raw).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

// Stamped into flow events so a reader can tell which build emitted them across an
// in-place upgrade (the tests build a second variant with another id).
#ifndef KS_BUILD_ID
#define KS_BUILD_ID 1
#endif

// Before linux 6.6 headers, TC_ACT_UNSPEC is what tcx calls TCX_NEXT: let the next
// program on the interface (a CNI's, a policy program) have its say.
#define NP_NEXT TC_ACT_UNSPEC

#define FE_F_LOCAL_ONLY 0x1 // externalTrafficPolicy: Local
#define BE_F_LOCAL 0x1      // the backend runs on this node

#define CT_FWD 1       // client -> frontend, as it arrives on ingress
#define CT_REV_LOCAL 2 // local backend -> client, as it leaves on egress
#define CT_REV_SNAT 3  // remote backend -> node IP:SNAT port, as it arrives on ingress

#define CT_F_SNAT 0x1
#define CT_F_CLOSING 0x2 // a FIN or RST was seen: the entry expires soon after it goes idle

#define CFG_F_NO_FLOW_EVENTS 0x1

#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2
#define VERDICT_REJECTED 3 // answered with ICMP port unreachable

#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_QUOTE 28 // the offending IP header (no options) and 8 bytes of it

#define REASON_NEW 0
#define REASON_NO_BACKENDS 1
#define REASON_NO_LOCAL_BACKENDS 2
#define REASON_NO_ROUTE 3
#define REASON_SNAT_EXHAUSTED 4
#define REASON_BACKEND_GONE 5 // an established connection's backend was removed: re-picked
#define REASON_TTL 6

#define FLOW_F_SNAT 0x1
#define FLOW_F_LOCAL 0x2

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define SEC_NS 1000000000ULL
// Idle lifetimes. They matter for reusing SNAT ports and for re-picking a backend; an
// entry the LRU has not evicted stays usable as long as it is not expired.
#define CT_TCP_LIFETIME (6ULL * 3600 * SEC_NS)
#define CT_TCP_CLOSING_LIFETIME (10ULL * SEC_NS)
#define CT_UDP_LIFETIME (60ULL * SEC_NS)

#define SNAT_TRIES 32

struct fe_key {
	__u32 ip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct fe_val {
	__u32 fe_id;
	// Backends at slots [slot_base, slot_base + count) of ks_np_backends; the loader
	// flips between two halves exactly like sock_lb's services.
	__u32 slot_base;
	__u16 count;
	__u8 flags;
	__u8 pad;
	// Slots the loader wrote. With externalTrafficPolicy Local the remote backends sit
	// after the `count` local ones, never picked, so a restarted loader still knows them.
	__u32 total;
};

struct be_key {
	__u32 fe_id;
	__u32 slot;
};

struct be_val {
	__u32 ip;
	__u16 port;
	__u8 flags;
	__u8 pad;
};

// (frontend, backend) pairs that are currently programmed: lets an established
// connection check in O(1) that its backend was not removed.
struct member_key {
	__u32 fe_id;
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct ct_val {
	__u64 last_seen_ns;
	__u32 fe_id;
	__u32 fe_ip;
	__u32 backend_ip;
	__u32 client_ip;
	__u32 snat_ip;
	__u16 fe_port;
	__u16 backend_port;
	__u16 client_port;
	__u16 snat_port;
	__u8 flags;
	__u8 pad[3];
};

struct np_config {
	__u32 node_ip;   // SNAT source; 0 = not attached yet, everything passes
	__u32 ifindex;   // the external interface, for the loader's bookkeeping
	__u16 snat_min;  // host byte order
	__u16 snat_max;  // host byte order, inclusive
	__u32 flags;
};

struct np_flow {
	__u64 ts_ns;
	__u32 saddr;      // client
	__u32 daddr;      // frontend
	__u32 backend_ip;
	__u32 snat_ip;
	__u16 sport;
	__u16 dport;
	__u16 backend_port;
	__u16 snat_port;
	__u32 fe_id;
	__u8 proto;
	__u8 verdict;
	__u8 reason;
	__u8 flags;
	__u8 build; // KS_BUILD_ID
	__u8 pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fe_key);
	__type(value, struct fe_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_np_frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct be_key);
	__type(value, struct be_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_np_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct member_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_np_members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
} ks_np_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct np_config);
} ks_np_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} ks_np_flows SEC(".maps");

struct pkt {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u16 tot_len;
	__u8 proto;
	__u8 tcp_flags;
	__u32 l4off;
};

// 0 when the packet is IPv4 TCP/UDP with its ports in the linear area we can read;
// fragments after the first carry no ports and are left alone.
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u8 *l4;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff))
		return -1;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;
	l4 = (__u8 *)ip + ihl;
	if ((void *)(l4 + 14) > data_end) {
		// A UDP header is 8 bytes; TCP needs its flags byte too.
		if (ip->protocol == IPPROTO_TCP || (void *)(l4 + 8) > data_end)
			return -1;
	}
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->tot_len = ip->tot_len;
	p->sport = *(__u16 *)l4;
	p->dport = *(__u16 *)(l4 + 2);
	p->tcp_flags = ip->protocol == IPPROTO_TCP ? l4[13] : 0;
	p->l4off = ETH_HLEN + ihl;
	return 0;
}

// Rewrites the source (src=1) or destination address and port, fixing the IP and L4
// checksums incrementally. The address is part of the L4 pseudo-header, hence
// BPF_F_PSEUDO_HDR; a UDP checksum of zero means "none" and must stay zero, which
// BPF_F_MARK_MANGLED_0 takes care of (and it turns a computed zero into 0xffff).
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, int src,
				   __u32 new_ip, __u16 new_port)
{
	__u32 old_ip = src ? p->saddr : p->daddr;
	__u16 old_port = src ? p->sport : p->dport;
	__u32 ip_off = ETH_HLEN + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 port_off = p->l4off + (src ? 0 : 2);
	__u32 csum_off;
	__u64 l4flags = 0;

	if (p->proto == IPPROTO_TCP) {
		csum_off = p->l4off + 16;
	} else {
		csum_off = p->l4off + 6;
		l4flags = BPF_F_MARK_MANGLED_0;
	}
	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					l4flags | BPF_F_PSEUDO_HDR | sizeof(new_ip)))
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_ip,
					new_ip, sizeof(new_ip)))
			return -1;
		if (bpf_skb_store_bytes(skb, ip_off, &new_ip, sizeof(new_ip), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					l4flags | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	if (src) {
		p->saddr = new_ip;
		p->sport = new_port;
	} else {
		p->daddr = new_ip;
		p->dport = new_port;
	}
	return 0;
}

// A redirected packet skips the stack's forwarding, so the hop's TTL decrement is ours.
static __always_inline int dec_ttl(struct __sk_buff *skb)
{
	__u8 ttl;
	__u16 old, new;
	__u32 off = ETH_HLEN + offsetof(struct iphdr, ttl);

	if (bpf_skb_load_bytes(skb, off, &ttl, 1))
		return -1;
	if (ttl <= 1)
		return -1;
	// ttl and protocol share one 16-bit word of the header checksum.
	old = bpf_htons((__u16)ttl << 8);
	new = bpf_htons((__u16)(ttl - 1) << 8);
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, new, 2))
		return -1;
	ttl--;
	return bpf_skb_store_bytes(skb, off, &ttl, 1, 0) ? -1 : 0;
}

static __always_inline __u64 lifetime(const struct ct_val *v, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return CT_UDP_LIFETIME;
	return (v->flags & CT_F_CLOSING) ? CT_TCP_CLOSING_LIFETIME : CT_TCP_LIFETIME;
}

static __always_inline int expired(const struct ct_val *v, __u8 proto, __u64 now)
{
	return now - v->last_seen_ns > lifetime(v, proto);
}

static __always_inline void touch(struct ct_val *v, struct pkt *p, __u64 now)
{
	v->last_seen_ns = now;
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		v->flags |= CT_F_CLOSING;
}

static __always_inline void mark_rev_snat_closing(const struct ct_val *v, __u8 proto)
{
	struct ct_key rk = {};
	struct ct_val *rv;

	rk.saddr = v->backend_ip;
	rk.sport = v->backend_port;
	rk.daddr = v->snat_ip;
	rk.dport = v->snat_port;
	rk.proto = proto;
	rk.dir = CT_REV_SNAT;
	rv = bpf_map_lookup_elem(&ks_np_ct, &rk);
	if (rv)
		rv->flags |= CT_F_CLOSING;
}

static __always_inline void emit(struct np_config *cfg, struct pkt *p, __u8 verdict,
				 __u8 reason, __u32 fe_id, __u32 bip, __u16 bport, __u32 sip,
				 __u16 sport, __u8 flags)
{
	struct np_flow *ev;

	if (cfg->flags & CFG_F_NO_FLOW_EVENTS)
		return;
	// A full ring means nobody reads; losing the event must never cost the packet.
	ev = bpf_ringbuf_reserve(&ks_np_flows, sizeof(*ev), 0);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->saddr = p->saddr;
	ev->daddr = p->daddr;
	ev->sport = p->sport;
	ev->dport = p->dport;
	ev->proto = p->proto;
	ev->backend_ip = bip;
	ev->backend_port = bport;
	ev->snat_ip = sip;
	ev->snat_port = sport;
	ev->fe_id = fe_id;
	ev->verdict = verdict;
	ev->reason = reason;
	ev->flags = flags;
	ev->build = KS_BUILD_ID;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	bpf_ringbuf_submit(ev, 0);
}

// Sends the (already rewritten) packet towards p->daddr without the stack. The lookup
// runs as for a packet forwarded from the interface it arrived on; tot_len 0 lets the
// kernel check the MTU against the skb itself, which copes with GSO packets.
static __always_inline int redirect_out(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	long rc;

	fib.family = AF_INET;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	// The lookup replaced ipv4_dst with the gateway when there is one; the neighbour
	// subsystem resolves (and if needed queues the packet while it ARPs for) that hop.
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

// Established connection towards a remote backend: DNAT + SNAT and out.
static __always_inline int forward_snat(struct __sk_buff *skb, struct pkt *p, struct ct_val *v)
{
	if (rewrite(skb, p, 0, v->backend_ip, v->backend_port) ||
	    rewrite(skb, p, 1, v->snat_ip, v->snat_port))
		return TC_ACT_SHOT;
	if (dec_ttl(skb))
		return TC_ACT_SHOT;
	return redirect_out(skb, p) == TC_ACT_REDIRECT ? TC_ACT_REDIRECT : TC_ACT_SHOT;
}

// Finds a port in the SNAT range whose reverse entry for this backend is free (or idle
// beyond its lifetime) and claims it with BPF_NOEXIST, so two CPUs never get the same.
static __always_inline int claim_snat_port(struct np_config *cfg, struct ct_key *rk,
					   struct ct_val *rv, __u64 now)
{
	__u32 range, start, i;

	if (cfg->snat_max < cfg->snat_min)
		return -1;
	range = (__u32)cfg->snat_max - cfg->snat_min + 1;
	start = bpf_get_prandom_u32();
	for (i = 0; i < SNAT_TRIES; i++) {
		__u16 port = cfg->snat_min + (start + i) % range;
		struct ct_val *old;

		rk->dport = bpf_htons(port);
		old = bpf_map_lookup_elem(&ks_np_ct, rk);
		if (old) {
			struct ct_key fk = {};

			if (!expired(old, rk->proto, now))
				continue;
			// The stale connection's forward entry would still lead its client to
			// this port, i.e. into the new connection: forget both.
			fk.saddr = old->client_ip;
			fk.daddr = old->fe_ip;
			fk.sport = old->client_port;
			fk.dport = old->fe_port;
			fk.proto = rk->proto;
			fk.dir = CT_FWD;
			bpf_map_delete_elem(&ks_np_ct, &fk);
			bpf_map_delete_elem(&ks_np_ct, rk);
		}
		rv->snat_port = rk->dport;
		if (bpf_map_update_elem(&ks_np_ct, rk, rv, BPF_NOEXIST) == 0)
			return 0;
	}
	return -1;
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u64 s = (__u64)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

struct icmp_reply {
	struct iphdr ip;
	__u8 type;
	__u8 code;
	__u16 check;
	__u32 unused;
	__u8 quote[ICMP_QUOTE];
};

// Turns the packet into the ICMP port unreachable that kube-proxy's REJECT rule would
// send (from the frontend address to the client) and bounces it out where it came in.
// The quoted header lets the client's kernel find the socket: connect() and a connected
// UDP socket fail with ECONNREFUSED at once instead of timing out. Packets with IP
// options are only dropped. Not rate-limited (the kernel's REJECT is); an answer is 70
// bytes, less than twice the smallest packet that can trigger it.
static __always_inline int reject(struct __sk_buff *skb, struct pkt *p)
{
	struct icmp_reply r = {};
	struct ethhdr eth;
	__u8 mac[ETH_ALEN];
	__s64 sum;
	__s32 diff;

	if (p->l4off != ETH_HLEN + sizeof(struct iphdr))
		return -1;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, r.quote, ICMP_QUOTE))
		return -1;
	// Make the packet exactly as long as the reply; every byte after the MAC header is
	// rewritten below. (Resizing behind the IP header rather than trimming the tail:
	// bpf_skb_change_tail refuses to cut a CHECKSUM_PARTIAL skb, which is what a
	// locally sent packet arriving over a veth is, short of its checksum field. Such a
	// packet keeps its stale offload mark; veths and the receiving stack treat it as
	// verified. Were a NIC to complete that stale checksum, the ICMP would arrive
	// corrupt and be ignored: the client times out as if dropped, nothing worse.)
	diff = (__s32)(ETH_HLEN + sizeof(r)) - (__s32)skb->len;
	if (diff && bpf_skb_adjust_room(skb, diff, BPF_ADJ_ROOM_NET, 0))
		return -1;
	r.type = ICMP_DEST_UNREACH;
	r.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.type, sizeof(r) - sizeof(r.ip), 0);
	if (sum < 0)
		return -1;
	r.check = csum_fold(sum);
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.saddr = p->daddr;
	r.ip.daddr = p->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	if (sum < 0)
		return -1;
	r.ip.check = csum_fold(sum);
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return -1;
	return bpf_redirect(skb->ifindex, 0) == TC_ACT_REDIRECT ? 0 : -1;
}

static __always_inline struct be_val *pick(struct fe_val *fe, struct be_key *bk)
{
	bk->fe_id = fe->fe_id;
	bk->slot = fe->slot_base + bpf_get_prandom_u32() % fe->count;
	return bpf_map_lookup_elem(&ks_np_backends, bk);
}

static __always_inline int new_connection(struct __sk_buff *skb, struct np_config *cfg,
					  struct pkt *p, __u8 reason, __u64 now)
{
	struct fe_key fk = {};
	struct fe_val *fe;
	struct be_key bk = {};
	struct be_val *b;
	struct ct_key key = {};
	struct ct_key rk = {};
	struct ct_val v = {};
	__u8 flow_flags;

	fk.ip = p->daddr;
	fk.port = p->dport;
	fk.proto = p->proto;
	fe = bpf_map_lookup_elem(&ks_np_frontends, &fk);
	if (!fe)
		return NP_NEXT;
	if (fe->count == 0) {
		__u32 fe_id = fe->fe_id;

		// externalTrafficPolicy Local without a local endpoint is dropped silently,
		// as kube-proxy's KUBE-XLB chain does (another node may serve the client).
		if (fe->flags & FE_F_LOCAL_ONLY) {
			emit(cfg, p, VERDICT_DROPPED, REASON_NO_LOCAL_BACKENDS, fe_id, 0, 0, 0, 0,
			     0);
			return TC_ACT_SHOT;
		}
		if (reject(skb, p) == 0) {
			emit(cfg, p, VERDICT_REJECTED, REASON_NO_BACKENDS, fe_id, 0, 0, 0, 0, 0);
			return TC_ACT_REDIRECT;
		}
		emit(cfg, p, VERDICT_DROPPED, REASON_NO_BACKENDS, fe_id, 0, 0, 0, 0, 0);
		return TC_ACT_SHOT;
	}
	b = pick(fe, &bk);
	if (!b) {
		// Raced the loader's flip between slot halves: the entry now points at the
		// new, complete half, so one more read is enough (as in sock_lb).
		fe = bpf_map_lookup_elem(&ks_np_frontends, &fk);
		if (!fe || fe->count == 0)
			return TC_ACT_SHOT;
		b = pick(fe, &bk);
		if (!b)
			return TC_ACT_SHOT;
	}

	v.last_seen_ns = now;
	v.fe_id = fe->fe_id;
	v.fe_ip = p->daddr;
	v.fe_port = p->dport;
	v.backend_ip = b->ip;
	v.backend_port = b->port;
	v.client_ip = p->saddr;
	v.client_port = p->sport;
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		v.flags |= CT_F_CLOSING;

	key.saddr = p->saddr;
	key.daddr = p->daddr;
	key.sport = p->sport;
	key.dport = p->dport;
	key.proto = p->proto;
	key.dir = CT_FWD;

	if (b->flags & BE_F_LOCAL) {
		flow_flags = FLOW_F_LOCAL;
		rk.saddr = b->ip;
		rk.sport = b->port;
		rk.daddr = p->saddr;
		rk.dport = p->sport;
		rk.proto = p->proto;
		rk.dir = CT_REV_LOCAL;
		if (bpf_map_update_elem(&ks_np_ct, &rk, &v, BPF_ANY) ||
		    bpf_map_update_elem(&ks_np_ct, &key, &v, BPF_ANY))
			return TC_ACT_SHOT;
		emit(cfg, p, VERDICT_FORWARDED, reason, v.fe_id, b->ip, b->port, 0, 0,
		     flow_flags);
		if (rewrite(skb, p, 0, v.backend_ip, v.backend_port))
			return TC_ACT_SHOT;
		// The stack forwards it to the pod, client address intact.
		return NP_NEXT;
	}

	v.flags |= CT_F_SNAT;
	v.snat_ip = cfg->node_ip;
	rk.saddr = b->ip;
	rk.sport = b->port;
	rk.daddr = cfg->node_ip;
	rk.proto = p->proto;
	rk.dir = CT_REV_SNAT;
	if (claim_snat_port(cfg, &rk, &v, now)) {
		emit(cfg, p, VERDICT_DROPPED, REASON_SNAT_EXHAUSTED, v.fe_id, v.backend_ip,
		     v.backend_port, v.snat_ip, 0, FLOW_F_SNAT);
		return TC_ACT_SHOT;
	}
	if (bpf_map_update_elem(&ks_np_ct, &key, &v, BPF_ANY)) {
		bpf_map_delete_elem(&ks_np_ct, &rk);
		return TC_ACT_SHOT;
	}
	emit(cfg, p, VERDICT_FORWARDED, reason, v.fe_id, v.backend_ip, v.backend_port,
	     v.snat_ip, v.snat_port, FLOW_F_SNAT);
	if (rewrite(skb, p, 0, v.backend_ip, v.backend_port) ||
	    rewrite(skb, p, 1, v.snat_ip, v.snat_port))
		return TC_ACT_SHOT;
	if (dec_ttl(skb)) {
		emit(cfg, p, VERDICT_DROPPED, REASON_TTL, v.fe_id, 0, 0, 0, 0, FLOW_F_SNAT);
		return TC_ACT_SHOT;
	}
	if (redirect_out(skb, p) != TC_ACT_REDIRECT) {
		emit(cfg, p, VERDICT_DROPPED, REASON_NO_ROUTE, v.fe_id, v.backend_ip,
		     v.backend_port, 0, 0, FLOW_F_SNAT);
		return TC_ACT_SHOT;
	}
	return TC_ACT_REDIRECT;
}

SEC("classifier")
int ks_np_ingress(struct __sk_buff *skb)
{
	struct np_config *cfg;
	struct pkt p = {};
	struct ct_key key = {};
	struct ct_val *v;
	__u32 zero = 0;
	__u64 now;
	__u8 reason = REASON_NEW;

	cfg = bpf_map_lookup_elem(&ks_np_config, &zero);
	if (!cfg || cfg->node_ip == 0)
		return NP_NEXT;
	if (parse(skb, &p))
		return NP_NEXT;
	now = bpf_ktime_get_ns();

	key.saddr = p.saddr;
	key.daddr = p.daddr;
	key.sport = p.sport;
	key.dport = p.dport;
	key.proto = p.proto;

	// A remote backend's reply to one of our SNAT ports.
	if (p.daddr == cfg->node_ip && bpf_ntohs(p.dport) >= cfg->snat_min &&
	    bpf_ntohs(p.dport) <= cfg->snat_max) {
		key.dir = CT_REV_SNAT;
		v = bpf_map_lookup_elem(&ks_np_ct, &key);
		if (v) {
			touch(v, &p, now);
			if (rewrite(skb, &p, 0, v->client_ip, v->client_port) ||
			    rewrite(skb, &p, 1, v->fe_ip, v->fe_port) || dec_ttl(skb))
				return TC_ACT_SHOT;
			return redirect_out(skb, &p) == TC_ACT_REDIRECT ? TC_ACT_REDIRECT
								: TC_ACT_SHOT;
		}
	}

	key.dir = CT_FWD;
	v = bpf_map_lookup_elem(&ks_np_ct, &key);
	if (v) {
		struct member_key mk = {};
		int reopen = (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN &&
			     (v->flags & CT_F_CLOSING);

		mk.fe_id = v->fe_id;
		mk.ip = v->backend_ip;
		mk.port = v->backend_port;
		if (!reopen && !expired(v, p.proto, now) &&
		    bpf_map_lookup_elem(&ks_np_members, &mk)) {
			touch(v, &p, now);
			if (v->flags & CT_F_SNAT) {
				// A client's FIN or RST also shortens the life of the reverse
				// entry, which holds the SNAT port: a client that aborts with RST
				// would otherwise keep its port for the full TCP lifetime.
				if (p.tcp_flags & (TCP_FIN | TCP_RST))
					mark_rev_snat_closing(v, p.proto);
				return forward_snat(skb, &p, v);
			}
			if (rewrite(skb, &p, 0, v->backend_ip, v->backend_port))
				return TC_ACT_SHOT;
			return NP_NEXT;
		}
		if (!reopen && !expired(v, p.proto, now))
			reason = REASON_BACKEND_GONE;
		// Over: drop its reverse entry so that a SNAT port is free again at once.
		{
			struct ct_key rk = {};

			rk.saddr = v->backend_ip;
			rk.sport = v->backend_port;
			rk.proto = p.proto;
			if (v->flags & CT_F_SNAT) {
				rk.daddr = v->snat_ip;
				rk.dport = v->snat_port;
				rk.dir = CT_REV_SNAT;
			} else {
				rk.daddr = v->client_ip;
				rk.dport = v->client_port;
				rk.dir = CT_REV_LOCAL;
			}
			bpf_map_delete_elem(&ks_np_ct, &rk);
		}
		bpf_map_delete_elem(&ks_np_ct, &key);
	}
	return new_connection(skb, cfg, &p, reason, now);
}

SEC("classifier")
int ks_np_egress(struct __sk_buff *skb)
{
	struct np_config *cfg;
	struct pkt p = {};
	struct ct_key key = {};
	struct ct_val *v;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&ks_np_config, &zero);
	if (!cfg || cfg->node_ip == 0)
		return NP_NEXT;
	if (parse(skb, &p))
		return NP_NEXT;
	key.saddr = p.saddr;
	key.daddr = p.daddr;
	key.sport = p.sport;
	key.dport = p.dport;
	key.proto = p.proto;
	key.dir = CT_REV_LOCAL;
	v = bpf_map_lookup_elem(&ks_np_ct, &key);
	if (!v)
		return NP_NEXT;
	touch(v, &p, bpf_ktime_get_ns());
	if (rewrite(skb, &p, 1, v->fe_ip, v->fe_port))
		return TC_ACT_SHOT;
	return NP_NEXT;
}

char _license[] SEC("license") = "Dual BSD/GPL";
