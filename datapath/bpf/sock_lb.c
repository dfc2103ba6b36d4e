// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Socket-level load balancing for ClusterIP services.
//
// The translation happens when a socket names its peer (connect, sendmsg), so every
// packet of the connection already carries the backend address: no per-packet NAT,
// no conntrack entry, and the cost of a lookup does not depend on how many services
// exist (one hash lookup for the service, one for the chosen backend slot).
//
// IPv4 services are also served to IPv6 sockets that use v4-mapped addresses
// (::ffff:a.b.c.d), which is how dual-stack runtimes such as the JVM reach IPv4 peers.
// (On 6.18 an unconnected sendto() to a mapped address is handed to the IPv4 UDP code
// before the sendmsg6 hook, so sendmsg4 sees it; sendmsg6 is kept for kernels that differ.)
// Native IPv6 services are not implemented yet.
//
// All addresses and ports are kept in network byte order, exactly as the kernel hands
// them to us in struct bpf_sock_addr, so the loader and the programs never disagree
// about endianness. The layouts below are mirrored in src/raw.rs.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ECONNREFUSED 111

// Stamped into every flow event so a reader can tell which program build emitted it,
// e.g. across an in-place upgrade (the tests build a second variant with another id).
#ifndef KS_BUILD_ID
#define KS_BUILD_ID 1
#endif

#define SVC_F_AFFINITY_CLIENTIP 0x1

// ks_config flags. Zero (the array's initial value) is the default behaviour.
#define CFG_F_NO_FLOW_EVENTS 0x1

#define VERDICT_FORWARDED 1
#define VERDICT_REFUSED_NO_BACKENDS 2

#define HOOK_CONNECT 1
#define HOOK_SENDMSG 2

struct svc_key {
	__u32 vip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_val {
	__u32 svc_id;
	// Backends of a service live at slots [slot_base, slot_base + count). The loader
	// writes a new backend set into the other half and then flips slot_base and count
	// in this one value, so a reader sees either the old set or the new one, never a mix.
	__u32 slot_base;
	__u16 count;
	__u8 flags;
	__u8 pad;
	__u32 affinity_timeout_s;
};

struct backend_key {
	__u32 svc_id;
	__u32 slot;
};

struct backend {
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct affinity_key {
	// The client's network namespace cookie: at connect() time an unbound socket has
	// no source address yet, but every socket of a pod shares its netns, so the netns
	// identifies the client just as kube-proxy's source-IP match does.
	__u64 client;
	__u32 svc_id;
	__u32 pad;
};

struct affinity_val {
	__u64 last_used_ns;
	struct backend backend;
	// Relative slot: lets us check in O(1) that the backend is still part of the
	// service, instead of trusting a stale entry after an endpoint was removed.
	__u32 slot;
	__u32 pad;
};

struct revnat_key {
	__u64 cookie;
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct revnat_val {
	__u32 vip;
	__u16 port;
	__u16 pad;
	__u32 svc_id;
	__u32 pad2;
};

struct flow_event {
	__u64 ts_ns;
	__u64 cookie;
	__u64 netns_cookie;
	__u32 src_ip;
	__u32 dst_ip;
	__u32 backend_ip;
	__u32 svc_id;
	__u16 src_port;
	__u16 dst_port;
	__u16 backend_port;
	__u8 proto;
	__u8 verdict;
	__u8 hook;
	__u8 v4mapped; // 1 when the socket is IPv6 and used a v4-mapped address
	__u8 build;    // KS_BUILD_ID
	__u8 pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct backend_key);
	__type(value, struct backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ks_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct affinity_key);
	__type(value, struct affinity_val);
} ks_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct revnat_key);
	__type(value, struct revnat_val);
} ks_revnat SEC(".maps");

struct ks_config {
	__u32 flags;
};

// Run-time switches the agent flips without reloading anything.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ks_config);
} ks_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} ks_flows SEC(".maps");

static __always_inline void emit(struct bpf_sock_addr *ctx, __u8 hook, __u8 v6,
				 __u8 verdict, __u32 svc_id, __u32 vip, __u16 vport,
				 __u32 bip, __u16 bport, __u64 cookie)
{
	struct flow_event *ev;
	struct bpf_sock *sk;
	struct ks_config *cfg;
	__u32 zero = 0;

	// Off when the agent says nobody observes (measured cost < 0.1 us per connect, but a
	// full ring of unread events helps no one).
	cfg = bpf_map_lookup_elem(&ks_config, &zero);
	if (cfg && (cfg->flags & CFG_F_NO_FLOW_EVENTS))
		return;
	// A full ring means nobody is reading; dropping the event must never cost the
	// connection, so a failed reserve is silently ignored.
	ev = bpf_ringbuf_reserve(&ks_flows, sizeof(*ev), 0);
	if (!ev)
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cookie = cookie;
	ev->netns_cookie = bpf_get_netns_cookie(ctx);
	ev->src_ip = 0;
	ev->src_port = 0;
	sk = ctx->sk;
	if (sk) {
		// Zero until the socket is bound, which for connect() happens after us.
		ev->src_ip = sk->src_ip4;
		ev->src_port = bpf_htons((__u16)sk->src_port);
	}
	ev->dst_ip = vip;
	ev->dst_port = vport;
	ev->backend_ip = bip;
	ev->backend_port = bport;
	ev->svc_id = svc_id;
	ev->proto = (__u8)ctx->protocol;
	ev->verdict = verdict;
	ev->hook = hook;
	ev->v4mapped = v6;
	ev->build = KS_BUILD_ID;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline int pick_backend(struct bpf_sock_addr *ctx, struct svc_val *svc,
					struct backend *out)
{
	struct backend_key bk = { .svc_id = svc->svc_id };
	struct affinity_key ak = {};
	struct affinity_val *av;
	struct affinity_val nav = {};
	struct backend *b;
	__u64 now = 0;
	__u32 slot;
	__u16 count = svc->count;
	__u32 base = svc->slot_base;

	if (svc->flags & SVC_F_AFFINITY_CLIENTIP) {
		ak.client = bpf_get_netns_cookie(ctx);
		ak.svc_id = svc->svc_id;
		now = bpf_ktime_get_ns();
		av = bpf_map_lookup_elem(&ks_affinity, &ak);
		if (av && av->slot < count &&
		    now - av->last_used_ns <= (__u64)svc->affinity_timeout_s * 1000000000ULL) {
			bk.slot = base + av->slot;
			b = bpf_map_lookup_elem(&ks_backends, &bk);
			if (b && b->ip == av->backend.ip && b->port == av->backend.port) {
				// Like kube-proxy's `recent --set`, every use restarts the timeout.
				av->last_used_ns = now;
				*out = *b;
				return 0;
			}
		}
	}

	slot = bpf_get_prandom_u32() % count;
	bk.slot = base + slot;
	b = bpf_map_lookup_elem(&ks_backends, &bk);
	if (!b)
		return -1;
	*out = *b;

	if (svc->flags & SVC_F_AFFINITY_CLIENTIP) {
		nav.last_used_ns = now;
		nav.backend = *b;
		nav.slot = slot;
		bpf_map_update_elem(&ks_affinity, &ak, &nav, BPF_ANY);
	}
	return 0;
}

// ::ffff:0:0/96. The v6 programs only ever look at these; anything else is native IPv6.
static __always_inline int is_v4mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

// `v6` is a constant at every call site: after inlining, the IPv4 programs never touch
// user_ip6 and the IPv6 ones never touch user_ip4, which the verifier insists on.
static __always_inline __u32 get_ip(struct bpf_sock_addr *ctx, int v6)
{
	return v6 ? ctx->user_ip6[3] : ctx->user_ip4;
}

static __always_inline void set_ip(struct bpf_sock_addr *ctx, int v6, __u32 ip)
{
	if (v6)
		ctx->user_ip6[3] = ip;
	else
		ctx->user_ip4 = ip;
}

// Shared by connect and sendmsg: look up the service, pick a backend, rewrite the
// destination and remember the mapping so replies and getpeername can be translated back.
static __always_inline int translate(struct bpf_sock_addr *ctx, __u8 hook, int v6)
{
	struct svc_key key = {};
	struct svc_val *svc;
	struct backend b;
	struct revnat_key rk = {};
	struct revnat_val rv = {};
	__u32 proto = ctx->protocol;
	__u32 vip;
	__u16 vport = (__u16)ctx->user_port;
	__u64 cookie;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	if (v6 && !is_v4mapped(ctx))
		return 1;
	vip = get_ip(ctx, v6);

	key.vip = vip;
	key.port = vport;
	key.proto = (__u8)proto;
	svc = bpf_map_lookup_elem(&ks_services, &key);
	if (!svc)
		return 1;

	cookie = bpf_get_socket_cookie(ctx);

	if (svc->count == 0) {
		emit(ctx, hook, v6, VERDICT_REFUSED_NO_BACKENDS, svc->svc_id, vip, vport, 0,
		     0, cookie);
		// Returning 0 alone makes the syscall fail with EPERM. Setting the return
		// value first turns it into the same ECONNREFUSED that kube-proxy's REJECT
		// rule produces, which is what clients and their retry logic expect.
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}

	if (pick_backend(ctx, svc, &b) < 0) {
		// The loader deletes a service's old slot range right after flipping the
		// service entry to the new one; a lookup that read the entry just before the
		// flip can find its slot gone. The entry it finds now points at the new,
		// complete range, so one retry is enough.
		svc = bpf_map_lookup_elem(&ks_services, &key);
		if (!svc || svc->count == 0 || pick_backend(ctx, svc, &b) < 0)
			return 1;
	}

	set_ip(ctx, v6, b.ip);
	ctx->user_port = b.port;

	rk.cookie = cookie;
	rk.ip = b.ip;
	rk.port = b.port;
	rv.vip = vip;
	rv.port = vport;
	rv.svc_id = svc->svc_id;
	bpf_map_update_elem(&ks_revnat, &rk, &rv, BPF_ANY);

	emit(ctx, hook, v6, VERDICT_FORWARDED, svc->svc_id, vip, vport, b.ip, b.port, cookie);
	return 1;
}

// The reverse direction: the kernel is about to tell the application who its peer is
// (recvmsg source, getpeername); if that peer is a backend we chose for this socket,
// show the service address instead.
static __always_inline int reverse(struct bpf_sock_addr *ctx, int v6)
{
	struct revnat_key rk = {};
	struct revnat_val *rv;

	if (v6 && !is_v4mapped(ctx))
		return 1;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip = get_ip(ctx, v6);
	rk.port = (__u16)ctx->user_port;
	rv = bpf_map_lookup_elem(&ks_revnat, &rk);
	if (!rv)
		return 1;
	set_ip(ctx, v6, rv->vip);
	ctx->user_port = rv->port;
	return 1;
}

SEC("cgroup/connect4")
int ks_connect4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, HOOK_CONNECT, 0);
}

SEC("cgroup/connect6")
int ks_connect6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, HOOK_CONNECT, 1);
}

SEC("cgroup/sendmsg4")
int ks_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate(ctx, HOOK_SENDMSG, 0);
}

SEC("cgroup/sendmsg6")
int ks_sendmsg6(struct bpf_sock_addr *ctx)
{
	return translate(ctx, HOOK_SENDMSG, 1);
}

SEC("cgroup/recvmsg4")
int ks_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 0);
}

SEC("cgroup/recvmsg6")
int ks_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 1);
}

SEC("cgroup/getpeername4")
int ks_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 0);
}

SEC("cgroup/getpeername6")
int ks_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse(ctx, 1);
}

char _license[] SEC("license") = "Dual BSD/GPL";
