// SPDX-License-Identifier: MIT OR GPL-2.0
//
// The eBPF datapath: cgroup socket hooks attached at the cgroup2 root. A socket
// follows the nearest classified ancestor-or-self of the cgroup of the task that
// connects or sends (map `cgroups`: cgroup id -> class, as the nft level maps).
//
// - DIRECT and unclassified: untouched.
// - DROP: connect() and sendmsg() fail with EPERM.
// - a target: TCP connect() is redirected to the target's loopback listener
//   (127.0.0.1 or ::1, the target's port). The original destination is filed
//   under the client's local port (`by_port`; an unbound client is bound to a
//   random free port first, which the kernel would otherwise choose only
//   after this program) and handed to the listener by getsockopt
//   SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the accepted socket, as a NAT
//   REDIRECT would; getpeername() names the original destination again (by
//   socket cookie, `by_cookie`). No sockops program: it would run about nine
//   times for every TCP connection of the host.
// - a target's UDP: each datagram is sent to the same loopback listener. The
//   original destination is kept by the app socket's local port (`udp`) and
//   handed to the forwarder by getsockopt SO_ORIGINAL_DST on a UDP socket it
//   connects to the app's address; the forwarder answers from its listener,
//   and recvmsg() names the original destination as the answer's source. A
//   UDP socket talks to one destination: sending to a second one (or
//   connecting it elsewhere) fails with EPERM, as it would be mistaken for
//   the first. A connected socket is bound by the program (a random free
//   port) so that its port is known from connect() on.
//   Except unconnected IPv4 sockets without a bound address: each of their
//   (socket, destination) flows sends from an address of its own in
//   127.128.0.0/10 (`flows`), so one socket may talk to any number of
//   destinations; the forwarder answers those from the destination's
//   address (a transparent socket), which needs no rewrite.
// - bypass destinations (LPM tries), non-TCP/UDP sockets and the built-in
//   forwarder's own upstream sockets (marked) are untouched.
//
// The userspace side (src/kernel/bpf/mod.rs) owns the map layouts below: keep
// the two in step. Every map's name starts with cgtp_: `cgtproxy status` finds
// our programs by their maps (the kernel keeps no program name when the loader
// cannot probe for names, as under the unit's capabilities).

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share 80. */
#define SO_ORIGINAL_DST 80

/* Classes, as src/config.rs's DIRECT_CLASS and DROP_CLASS; a target's class is
 * its mark. */
#define DIRECT_CLASS 0x63677401
#define DROP_CLASS 0x63677402

/* The built-in forwarder's upstream sockets carry this mark (src/config.rs's
 * FORWARD_MARK): never captured again, whatever cgroup they are in. */
#define FORWARD_MARK 0x63677466

/* Levels looked at, from 1 (the root, level 0, is never classified): a
 * cgroup deeper than 31 follows its classified ancestors down to level 31.
 * The loop over them is unrolled: without CAP_PERFMON, older verifiers
 * explore the mispredicted side of a loop's exit branch (Spectre v1) and
 * never see the loop end (Linux 6.12: "the sequence of 8193 jumps is too
 * complex"; 6.18 accepts the loop). */
#define MAX_LEVELS 32

#define ALLOW 1
#define DENY 0

struct target {
	__u16 port; /* host order */
	__u8 no_udp;
	__u8 no_ipv6;
};

/* An original destination: the family says which address is set. */
struct orig {
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u16 port;    /* network order */
	__u16 family;
};

/* A UDP socket's original destination, by its local port and the family
 * of its datagrams (`udp`). */
struct udp_key {
	__u16 port; /* host order */
	__u16 family;
};

struct udp_orig {
	struct orig o;
	__u64 cookie; /* the socket's: a stale entry of a closed socket is not it */
	__u16 via;    /* the listener's port, host order */
	__u16 pad;
	__u32 pad2;
};

struct lpm4 {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm6 {
	__u32 prefixlen;
	__u32 addr[4];
};

/* Sizes: the kernel allocates a hash map's buckets for all its entries up
 * front, and an LRU hash's elements too, charged to the daemon's cgroup.
 * Classified cgroups: 2^18 (4 MiB of buckets); the LRU maps hold what is in
 * flight (sockets, flows, cgroups that connect) and evict the least recently
 * used: 16384 each (about 1.6 MiB each). */
#define MAX_CLASSIFIED (1 << 18)
#define MAX_IN_FLIGHT 16384

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CLASSIFIED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} cgtp_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct target);
} cgtp_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4);
	__type(value, __u8);
} cgtp_bypass4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6);
	__type(value, __u8);
} cgtp_bypass6 SEC(".maps");

/* getpeername(): original destination by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, __u64);
	__type(value, struct orig);
} cgtp_by_cookie SEC(".maps");

/* connect() -> the listener's getsockopt: by the client's local port (every
 * redirected client talks to a loopback listener, so its port is unique
 * while it lives). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, __u32);
	__type(value, struct orig);
} cgtp_by_port SEC(".maps");

/* Per-flow source addresses of unconnected IPv4 UDP: 127.128.0.0/10, the
 * host's own (all of 127/8 is), never .0 of it. */
#define FLOW_NET 0x7f800000
#define FLOW_HOSTS 0x003fffff
/* Attempts at drawing a free flow address. */
#define FLOW_ATTEMPTS 4

struct flow_key {
	__u64 cookie;
	struct orig o;
	__u32 pad;
};

/* (socket, destination) -> its flow address (host order). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, struct flow_key);
	__type(value, __u32);
} cgtp_flow_of SEC(".maps");

/* Flow address (host order) -> the original destination, for the
 * forwarder's getsockopt. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, __u32);
	__type(value, struct orig);
} cgtp_flows SEC(".maps");

/* UDP of a target: the original destination by the app's local port. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, struct udp_key);
	__type(value, struct udp_orig);
} cgtp_udp SEC(".maps");

/* The generation of `cgroups`: the daemon bumps it after every change to
 * it, which makes every entry of `class_cache` stale. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} cgtp_generation SEC(".maps");

struct cached_class {
	__u64 generation;
	__u32 class;
	__u32 pad;
};

/* A task's cgroup id -> its class, as of a generation of `cgroups`: one
 * lookup instead of one per level for every connect() and sendto(). A
 * cgroup's ancestors never change, so only `cgroups` can make it stale. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_IN_FLIGHT);
	__type(key, __u64);
	__type(value, struct cached_class);
} cgtp_class_cache SEC(".maps");

/* The class of the calling task's cgroup: its nearest classified
 * ancestor-or-self, 0 when there is none. Level 0 (the root) is never
 * classified. */
static __always_inline __u32 walk_ancestors(void)
{
	__u32 class = 0;

#pragma clang loop unroll(full)
	for (int level = 1; level < MAX_LEVELS; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		__u32 *c;

		if (!id)
			break;
		c = bpf_map_lookup_elem(&cgtp_cgroups, &id);
		if (c)
			class = *c;
	}
	return class;
}

/* walk_ancestors(), remembered per cgroup until `cgroups` changes. The
 * generation is read before the walk: a walk that raced with a change is
 * filed under the older generation, so it is never taken for the newer. */
static __always_inline __u32 class_of_task(void)
{
	__u32 zero = 0;
	__u64 id = bpf_get_current_cgroup_id();
	__u64 *g = bpf_map_lookup_elem(&cgtp_generation, &zero);
	struct cached_class *found, fresh = {};

	if (!g)
		return walk_ancestors();
	fresh.generation = *g;
	found = bpf_map_lookup_elem(&cgtp_class_cache, &id);
	if (found) {
		struct cached_class c;

		__builtin_memcpy(&c, found, sizeof(c));
		asm volatile("" ::: "memory");
		if (c.generation == fresh.generation)
			return c.class;
	}
	fresh.class = walk_ancestors();
	bpf_map_update_elem(&cgtp_class_cache, &id, &fresh, BPF_ANY);
	return fresh.class;
}

static __always_inline int bypassed4(__u32 addr)
{
	struct lpm4 key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&cgtp_bypass4, &key) != 0;
}

static __always_inline int bypassed6(const __u32 addr[4])
{
	struct lpm6 key = { .prefixlen = 128 };

	key.addr[0] = addr[0];
	key.addr[1] = addr[1];
	key.addr[2] = addr[2];
	key.addr[3] = addr[3];
	return bpf_map_lookup_elem(&cgtp_bypass6, &key) != 0;
}

/* ::ffff:a.b.c.d, an IPv4 destination of an IPv6 socket. */
static __always_inline int v4_mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

/* What a classified socket's connect() or sendmsg() gets, before any rewrite:
 * ALLOW untouched, DENY, or REDIRECT to the target's listener on *port.
 * `dst` is the destination: IPv6 when `v6`, else IPv4 in dst[3] (a plain or
 * a v4-mapped one); the bypass tries are looked up only for a target's
 * sockets, not on every connect() of the host. */
#define REDIRECT 2

static __always_inline int decide(struct bpf_sock_addr *ctx, int v6,
				  const __u32 dst[4], __u16 *port)
{
	__u32 protocol = ctx->protocol;
	struct target *found, t;
	__u32 class;

	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		return ALLOW;
	if (ctx->sk->mark == FORWARD_MARK)
		return ALLOW;
	class = class_of_task();
	if (!class || class == DIRECT_CLASS)
		return ALLOW;
	if (class == DROP_CLASS)
		return DENY;
	found = bpf_map_lookup_elem(&cgtp_targets, &class);
	/* A class without its target: the maps are being rewritten. */
	if (!found)
		return DENY;
	/* Copied right here, before any branch: the 6.12 verifier without
	 * CAP_PERFMON loses a map-value pointer that clang tests for null
	 * again after two paths meet. */
	__builtin_memcpy(&t, found, sizeof(t));
	asm volatile("" ::: "memory");
	if (v6 ? bypassed6(dst) : bypassed4(dst[3]))
		return ALLOW;
	if (v6 && t.no_ipv6)
		return ALLOW;
	if (protocol == IPPROTO_UDP && t.no_udp)
		return ALLOW;
	*port = t.port;
	return REDIRECT;
}

/* An IPv6 socket's destination into dst; whether it is v4-mapped. */
static __always_inline int read_dst6(struct bpf_sock_addr *ctx, __u32 dst[4])
{
	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	return v4_mapped(dst);
}

/* The original destination `dst` (as read for decide()) on `user_port`:
 * IPv4 in dst[3] when `v4`, else IPv6. */
static __always_inline void orig_of(struct orig *o, int v4, const __u32 dst[4],
				    __u32 user_port)
{
	o->port = (__u16)user_port;
	if (v4) {
		o->family = AF_INET;
		o->addr[0] = dst[3];
	} else {
		o->family = AF_INET6;
		o->addr[0] = dst[0];
		o->addr[1] = dst[1];
		o->addr[2] = dst[2];
		o->addr[3] = dst[3];
	}
}

static __always_inline void remember(struct bpf_sock_addr *ctx,
				     const struct orig *o)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&cgtp_by_cookie, &cookie, o, BPF_ANY);
}

static __always_inline int same_orig(const struct orig *a, const struct orig *b)
{
	return a->family == b->family && a->port == b->port &&
	       a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] &&
	       a->addr[2] == b->addr[2] && a->addr[3] == b->addr[3];
}

/* Files a UDP socket's original destination under its local port `lport`
 * (host order) for datagrams of `family`, to the listener on `via`. DENY
 * when the socket already talks to another destination: the forwarder and
 * recvmsg() could not tell the two apart. */
static __always_inline int file_udp(struct bpf_sock_addr *ctx, __u16 family,
				    __u16 lport, const struct orig *o, __u16 via)
{
	struct udp_key key = { .port = lport, .family = family };
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct udp_orig *found, cur, next = {};

	if (!lport)
		return DENY;
	found = bpf_map_lookup_elem(&cgtp_udp, &key);
	if (found) {
		__builtin_memcpy(&cur, found, sizeof(cur));
		asm volatile("" ::: "memory");
		if (cur.cookie == cookie)
			return same_orig(&cur.o, o) ? ALLOW : DENY;
	}
	__builtin_memcpy(&next.o, o, sizeof(next.o));
	next.cookie = cookie;
	next.via = via;
	if (bpf_map_update_elem(&cgtp_udp, &key, &next, BPF_ANY))
		return DENY;
	return ALLOW;
}

/* The flow address of this socket's datagrams to `o`: the one it has, or a
 * free one drawn at random (taken atomically: BPF_NOEXIST). 0 when none. */
static __always_inline __u32 flow_address(struct bpf_sock_addr *ctx,
					  const struct orig *o)
{
	struct flow_key key = { .cookie = bpf_get_socket_cookie(ctx) };
	__u32 *found, addr;

	__builtin_memcpy(&key.o, o, sizeof(key.o));
	found = bpf_map_lookup_elem(&cgtp_flow_of, &key);
	if (found) {
		struct orig *f;

		addr = *found;
		f = bpf_map_lookup_elem(&cgtp_flows, &addr);
		if (f) {
			struct orig cur;

			__builtin_memcpy(&cur, f, sizeof(cur));
			asm volatile("" ::: "memory");
			if (same_orig(&cur, o))
				return addr;
		}
	}
#pragma clang loop unroll(full)
	for (int i = 0; i < FLOW_ATTEMPTS; i++) {
		addr = FLOW_NET | (bpf_get_prandom_u32() % FLOW_HOSTS + 1);
		if (bpf_map_update_elem(&cgtp_flows, &addr, o, BPF_NOEXIST))
			continue;
		bpf_map_update_elem(&cgtp_flow_of, &key, &addr, BPF_ANY);
		return addr;
	}
	return 0;
}

/* Attempts at binding a connecting socket to a random free port. */
#define BIND_ATTEMPTS 4
/* The kernel's default ephemeral range, net.ipv4.ip_local_port_range. */
#define EPHEMERAL_FIRST 32768
#define EPHEMERAL_COUNT 28232

static __always_inline __u16 random_port(void)
{
	return EPHEMERAL_FIRST + bpf_get_prandom_u32() % EPHEMERAL_COUNT;
}

/* Binds a connecting socket to a random free port, trying BIND_ATTEMPTS
 * times: `sa` (`len` bytes) is its address, `port` the port field inside it
 * (sockaddr_in's or sockaddr_in6's). The port bound, or 0. */
static __always_inline __u16 bind_random(struct bpf_sock_addr *ctx,
					 struct sockaddr *sa, int len,
					 __be16 *port)
{
	__u16 lport;

#pragma clang loop unroll(full)
	for (int i = 0; i < BIND_ATTEMPTS; i++) {
		lport = random_port();
		*port = bpf_htons(lport);
		if (!bpf_bind(ctx, sa, len))
			return lport;
	}
	return 0;
}

/* The local port of a connecting socket, binding it first when it has
 * none: the kernel would choose one only after this program. 0 when no
 * attempt found a free port. */
static __always_inline __u16 local_port4(struct bpf_sock_addr *ctx)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	__u16 lport = ctx->sk->src_port;

	if (lport)
		return lport;
	sa.sin_addr.s_addr = ctx->sk->src_ip4;
	return bind_random(ctx, (struct sockaddr *)&sa, sizeof(sa), &sa.sin_port);
}

static __always_inline __u16 local_port6(struct bpf_sock_addr *ctx)
{
	struct sockaddr_in6 sa = { .sin6_family = AF_INET6 };
	__u16 lport = ctx->sk->src_port;

	if (lport)
		return lport;
	sa.sin6_addr.in6_u.u6_addr32[0] = ctx->sk->src_ip6[0];
	sa.sin6_addr.in6_u.u6_addr32[1] = ctx->sk->src_ip6[1];
	sa.sin6_addr.in6_u.u6_addr32[2] = ctx->sk->src_ip6[2];
	sa.sin6_addr.in6_u.u6_addr32[3] = ctx->sk->src_ip6[3];
	return bind_random(ctx, (struct sockaddr *)&sa, sizeof(sa), &sa.sin6_port);
}

/* Files a redirected connect()'s original destination under the socket's
 * local port `lport` (0: none could be had): for the listener (TCP) or the
 * forwarder (UDP), and by cookie for getpeername(). */
static __always_inline int file_connect(struct bpf_sock_addr *ctx, __u16 family,
					__u16 lport, const struct orig *o,
					__u16 via)
{
	__u32 key = lport;

	if (!lport)
		return DENY;
	if (ctx->protocol == IPPROTO_UDP) {
		if (file_udp(ctx, family, lport, o, via) != ALLOW)
			return DENY;
	} else if (bpf_map_update_elem(&cgtp_by_port, &key, o, BPF_ANY)) {
		return DENY;
	}
	remember(ctx, o);
	return ALLOW;
}

static __always_inline void to_loopback6(struct bpf_sock_addr *ctx, int mapped)
{
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	if (mapped) {
		/* The IPv4 listener, reached through the mapped address. */
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
}

SEC("cgroup/connect4")
int cgtproxy_conn4(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;
	__u32 dst[4] = { 0, 0, 0, ctx->user_ip4 };
	int verdict = decide(ctx, 0, dst, &port);
	struct orig o = {};

	if (verdict != REDIRECT)
		return verdict;
	orig_of(&o, 1, dst, ctx->user_port);
	if (file_connect(ctx, AF_INET, local_port4(ctx), &o, port) != ALLOW)
		return DENY;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

SEC("cgroup/connect6")
int cgtproxy_conn6(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;
	__u32 dst[4];
	struct orig o = {};
	int mapped = read_dst6(ctx, dst);
	int verdict = decide(ctx, !mapped, dst, &port);

	if (verdict != REDIRECT)
		return verdict;
	orig_of(&o, mapped, dst, ctx->user_port);
	if (file_connect(ctx, o.family, local_port6(ctx), &o, port) != ALLOW)
		return DENY;
	to_loopback6(ctx, mapped);
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

/* Unconnected UDP (sendto): a target's datagram goes to the listener. Its
 * destination is told by its flow address (a socket without a bound
 * address), else filed under the socket's port (bound by now: the kernel
 * binds an unbound socket before this program runs). An IPv6 socket's
 * datagram to a v4-mapped address meets sendmsg4, not sendmsg6. */
SEC("cgroup/sendmsg4")
int cgtproxy_send4(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;
	__u32 dst[4] = { 0, 0, 0, ctx->user_ip4 };
	int verdict = decide(ctx, 0, dst, &port);
	struct orig o = {};
	__u32 flow;

	if (verdict != REDIRECT)
		return verdict;
	orig_of(&o, 1, dst, ctx->user_port);
	/* An IPv6 socket bound to :: has src_ip4 0 too. */
	if (!ctx->sk->src_ip4) {
		flow = flow_address(ctx, &o);
		if (!flow)
			return DENY;
		ctx->msg_src_ip4 = bpf_htonl(flow);
	} else if (file_udp(ctx, AF_INET, ctx->sk->src_port, &o, port) !=
		   ALLOW) {
		return DENY;
	}
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

SEC("cgroup/sendmsg6")
int cgtproxy_send6(struct bpf_sock_addr *ctx)
{
	__u16 port = 0;
	__u32 dst[4];
	struct orig o = {};
	int mapped = read_dst6(ctx, dst);
	int verdict = decide(ctx, !mapped, dst, &port);

	/* A v4-mapped destination reaches sendmsg4 instead (the kernel refuses
	 * a rewrite to one here). */
	if (verdict != REDIRECT || mapped)
		return verdict == DENY ? DENY : ALLOW;
	orig_of(&o, 0, dst, ctx->user_port);
	if (file_udp(ctx, AF_INET6, ctx->sk->src_port, &o, port) != ALLOW)
		return DENY;
	to_loopback6(ctx, 0);
	ctx->user_port = bpf_htons(port);
	return ALLOW;
}

/* The UDP entry of the receiving socket for datagrams of `family`, when a
 * datagram from the listener on `from_port` (network order) is an answer to
 * it. */
static __always_inline int udp_answer(struct bpf_sock_addr *ctx, __u16 family,
				      __u32 from_port, struct orig *o)
{
	struct udp_key key = { .port = ctx->sk->src_port, .family = family };
	struct udp_orig *found = bpf_map_lookup_elem(&cgtp_udp, &key);
	struct udp_orig cur;

	if (!found)
		return 0;
	__builtin_memcpy(&cur, found, sizeof(cur));
	asm volatile("" ::: "memory");
	if (cur.cookie != bpf_get_socket_cookie(ctx) ||
	    from_port != bpf_htons(cur.via))
		return 0;
	__builtin_memcpy(o, &cur.o, sizeof(*o));
	return 1;
}

/* recvmsg() of a redirected UDP socket: the listener's answer names the
 * original destination as its source. */
SEC("cgroup/recvmsg4")
int cgtproxy_recv4(struct bpf_sock_addr *ctx)
{
	struct orig o;

	if (ctx->user_ip4 != bpf_htonl(0x7f000001) ||
	    !udp_answer(ctx, AF_INET, ctx->user_port, &o))
		return 1;
	ctx->user_ip4 = o.addr[0];
	ctx->user_port = o.port;
	return 1;
}

SEC("cgroup/recvmsg6")
int cgtproxy_recv6(struct bpf_sock_addr *ctx)
{
	__u32 src[4];
	struct orig o;
	int mapped = read_dst6(ctx, src);

	if (src[0] || src[1])
		return 1;
	if (mapped) {
		if (src[3] != bpf_htonl(0x7f000001) ||
		    !udp_answer(ctx, AF_INET, ctx->user_port, &o))
			return 1;
		ctx->user_ip6[3] = o.addr[0];
	} else {
		if (src[2] || src[3] != bpf_htonl(1) ||
		    !udp_answer(ctx, AF_INET6, ctx->user_port, &o))
			return 1;
		ctx->user_ip6[0] = o.addr[0];
		ctx->user_ip6[1] = o.addr[1];
		ctx->user_ip6[2] = o.addr[2];
		ctx->user_ip6[3] = o.addr[3];
	}
	ctx->user_port = o.port;
	return 1;
}

/* getpeername() of a redirected socket names the original destination, not
 * the listener, as it would through a transparent proxy. */
SEC("cgroup/getpeername4")
int cgtproxy_peer4(struct bpf_sock_addr *ctx)
{
	__u64 cookie;
	struct orig *o;

	/* The address first: a cookie is made on first use, and every other
	 * socket of the host would pay for it. */
	if (ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	o = bpf_map_lookup_elem(&cgtp_by_cookie, &cookie);
	if (!o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = o->addr[0];
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/getpeername6")
int cgtproxy_peer6(struct bpf_sock_addr *ctx)
{
	__u32 a0 = ctx->user_ip6[0];
	__u32 a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];
	__u64 cookie;
	struct orig *o;

	/* Only ::1 and ::ffff:127.0.0.1 can be ours (see getpeername4). */
	if (a0 || a1 || (a2 && a2 != bpf_htonl(0xffff)))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	o = bpf_map_lookup_elem(&cgtp_by_cookie, &cookie);
	if (!o)
		return 1;
	if (o->family == AF_INET) {
		/* Redirected through ::ffff:127.0.0.1: answer ::ffff:ORIG. */
		if (a2 != bpf_htonl(0xffff) || a3 != bpf_htonl(0x7f000001))
			return 1;
		ctx->user_ip6[3] = o->addr[0];
	} else {
		if (a2 || a3 != bpf_htonl(1))
			return 1;
		ctx->user_ip6[0] = o->addr[0];
		ctx->user_ip6[1] = o->addr[1];
		ctx->user_ip6[2] = o->addr[2];
		ctx->user_ip6[3] = o->addr[3];
	}
	ctx->user_port = o->port;
	return 1;
}

/* Whether the accepted socket's peer is a loopback address, as every
 * redirected client's is. */
static __always_inline int loopback_peer(struct bpf_sock *sk)
{
	/* Every field is read up front: the verifier refuses the pointer
	 * arithmetic clang makes of loads on separate branches. */
	__u32 family = sk->family;
	__u32 ip4 = sk->dst_ip4;
	__u32 a0 = sk->dst_ip6[0];
	__u32 a1 = sk->dst_ip6[1];
	__u32 a2 = sk->dst_ip6[2];
	__u32 a3 = sk->dst_ip6[3];

	if (family == AF_INET)
		return ip4 == bpf_htonl(0x7f000001);
	if (a0 || a1)
		return 0;
	if (a2 == bpf_htonl(0xffff))
		return a3 == bpf_htonl(0x7f000001);
	return !a2 && a3 == bpf_htonl(1);
}

/* SO_ORIGINAL_DST on a socket a loopback listener accepted from a redirected
 * client (TCP), or on a UDP socket connected to a redirected client's
 * address. The kernel's own answer (conntrack's, for NAT) stands when it has
 * one. */
SEC("cgroup/getsockopt")
int cgtproxy_getopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	void *end = ctx->optval_end;
	struct orig orig, *o, *found;
	__u32 port, protocol, peer4, mark;

	if (ctx->optname != SO_ORIGINAL_DST || ctx->retval == 0 || !sk)
		return 1;
	if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
		return 1;
	protocol = sk->protocol;
	peer4 = sk->dst_ip4;
	mark = sk->mark;
	/* A redirected TCP client is a loopback one; an app's UDP socket bound
	 * to another of the host's addresses sends from it. */
	if (protocol == IPPROTO_TCP ? !loopback_peer(sk) :
				      protocol != IPPROTO_UDP)
		return 1;
	port = bpf_ntohs(sk->dst_port);
	if (protocol == IPPROTO_TCP) {
		found = bpf_map_lookup_elem(&cgtp_by_port, &port);
		if (!found)
			return 1;
		__builtin_memcpy(&orig, found, sizeof(orig));
	} else {
		/* The forwarder asks on a socket connected to the app's
		 * address: a flow address tells the flow by itself. Only
		 * a marked socket (SO_MARK needs CAP_NET_ADMIN) is told:
		 * anyone may connect a UDP socket anywhere, and where an
		 * app sends is not every local user's to read. */
		struct udp_key key = {
			.port = port,
			.family = ctx->level == SOL_IP ? AF_INET : AF_INET6,
		};
		__u32 peer = bpf_ntohl(peer4);
		struct udp_orig *u;

		if (mark != FORWARD_MARK)
			return 1;

		if (ctx->level == SOL_IP && (peer & ~FLOW_HOSTS) == FLOW_NET) {
			found = bpf_map_lookup_elem(&cgtp_flows, &peer);
			if (!found)
				return 1;
			__builtin_memcpy(&orig, found, sizeof(orig));
		} else {
			u = bpf_map_lookup_elem(&cgtp_udp, &key);
			if (!u)
				return 1;
			__builtin_memcpy(&orig, &u->o, sizeof(orig));
		}
	}
	asm volatile("" ::: "memory");
	o = &orig;
	if (ctx->level == SOL_IP) {
		struct sockaddr_in *sa = ctx->optval;

		if (o->family != AF_INET || (void *)(sa + 1) > end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->sin_family = AF_INET;
		sa->sin_port = o->port;
		sa->sin_addr.s_addr = o->addr[0];
		/* The barriers keep clang from merging stores: the two
		 * branches' into one with a variable offset (refused without
		 * CAP_PERFMON, which the unit does not grant), and the two
		 * adjacent context fields into one 8-byte store (refused). */
		ctx->optlen = sizeof(*sa);
		asm volatile("" ::: "memory");
		ctx->retval = 0;
		asm volatile("" ::: "memory");
		return 1;
	}
	{
		struct sockaddr_in6 *sa = ctx->optval;

		if (o->family != AF_INET6 || (void *)(sa + 1) > end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->sin6_family = AF_INET6;
		sa->sin6_port = o->port;
		sa->sin6_addr.in6_u.u6_addr32[0] = o->addr[0];
		sa->sin6_addr.in6_u.u6_addr32[1] = o->addr[1];
		sa->sin6_addr.in6_u.u6_addr32[2] = o->addr[2];
		sa->sin6_addr.in6_u.u6_addr32[3] = o->addr[3];
		ctx->optlen = sizeof(*sa);
		asm volatile("" ::: "memory");
		ctx->retval = 0;
		return 1;
	}
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
