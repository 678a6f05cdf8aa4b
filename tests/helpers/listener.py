#!/usr/bin/env python3
"""The transparent (TPROXY) listener standing in for a proxy core, in every
test: the kernel tests, the Debian VM test and the NixOS VM tests.

TCP: answers "LABEL <original-destination-ip> <port>"; with --http, an HTTP/1.0
response to the request, whose body is "LABEL <original destination>" (as
1.2.3.4:80 or [::1]:80).
UDP: reads the original destination from IP(V6)_ORIGDSTADDR and answers
"LABEL <ip> <port>" from a transparent socket bound to that destination, as
real proxy cores do.
With --log FILE, every flow is appended to FILE: "tcp DST from SRC" and
"udp DST PAYLOAD".
Bound to 127.0.0.1 and ::1, as the README tells proxy cores to be: the daemon's
tproxy statements deliver there, and the network cannot reach it.
With --redirect, a REDIRECT-style listener instead (as redsocks, or the eBPF
datapath's listeners): not transparent, the original destination read with
getsockopt SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6): on the
accepted socket (TCP), or on a marked UDP socket connected to the datagram's
source (UDP, as the eBPF datapath answers it); UDP answers come from the
listener itself, or, to one of the datapath's per-flow addresses
(127.128.0.0/10), from the destination's address.
Ready: prints "ready", and tells systemd (READY=1) when run as Type=notify.
Usage: listener.py PORT [LABEL] [--http] [--redirect] [--log FILE]
"""
import argparse
import os
import select
import socket
import struct

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74
SO_ORIGINAL_DST = 80  # IP6T_SO_ORIGINAL_DST is 80 too
SO_MARK = 36
FORWARD_MARK = 0x63677466  # the built-in forwarder's: the datapath leaves it be

args = argparse.ArgumentParser()
args.add_argument("port", type=int)
args.add_argument("label", nargs="?", default="proxy")
args.add_argument("--http", action="store_true")
args.add_argument("--redirect", action="store_true")
args.add_argument("--log")
args = args.parse_args()
log = open(args.log, "a", encoding="utf-8") if args.log else None


def note(line):
    if log:
        log.write(line + "\n")
        log.flush()


def endpoint(fam, ip, p):
    return f"[{ip}]:{p}" if fam == socket.AF_INET6 else f"{ip}:{p}"


def transparent(fam, typ, foreign=None):
    """A socket for a listener (transparent but with --redirect), or, with
    foreign, a transparent one to be bound to a foreign destination."""
    s = socket.socket(fam, typ)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if foreign or not args.redirect:
        if fam == socket.AF_INET:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    return s


socks = {}
for fam, loopback in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    t = transparent(fam, socket.SOCK_STREAM)
    t.bind((loopback, args.port))
    t.listen(128)
    socks[t] = ("tcp", fam)
    u = transparent(fam, socket.SOCK_DGRAM)
    if args.redirect:
        pass
    elif fam == socket.AF_INET:
        u.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    else:
        u.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    u.bind((loopback, args.port))
    socks[u] = ("udp", fam)

print("ready", flush=True)
if os.environ.get("NOTIFY_SOCKET"):
    path = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.sendto(b"READY=1", "\0" + path[1:] if path.startswith("@") else path)


def orig_dst(fam, cmsgs):
    for level, typ, data in cmsgs:
        if fam == socket.AF_INET and level == socket.SOL_IP and typ == IP_RECVORIGDSTADDR:
            (p,) = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET, data[4:8]), p
        if fam == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and typ == IPV6_RECVORIGDSTADDR:
            (p,) = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), p
    return None


def original_dst(c, fam):
    """SO_ORIGINAL_DST of an accepted socket, as (ip, port)."""
    if fam == socket.AF_INET:
        raw = c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(fam, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    raw = c.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return socket.inet_ntop(fam, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]


def redirected_udp_dst(fam, peer):
    """The original destination of a datagram from peer, asked on a marked
    socket connected to it."""
    with socket.socket(fam, socket.SOCK_DGRAM) as q:
        q.setsockopt(socket.SOL_SOCKET, SO_MARK, FORWARD_MARK)
        q.connect(peer)
        return original_dst(q, fam)


def flow_address(fam, ip):
    """One of the eBPF datapath's per-flow source addresses, 127.128.0.0/10:
    answered from the destination's address, as TPROXY flows are."""
    if fam != socket.AF_INET:
        return False
    (a,) = struct.unpack("!I", socket.inet_aton(ip))
    return a & 0xFFC00000 == 0x7F800000


def answer_tcp(c, fam):
    """One connection; the accepted socket's local address is the original
    destination (TPROXY), or SO_ORIGINAL_DST tells it (--redirect)."""
    ip, p = original_dst(c, fam) if args.redirect else c.getsockname()[:2]
    peer = c.getpeername()
    if args.http:
        c.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = c.recv(4096)
            if not chunk:
                break
            request += chunk
        body = f"{args.label} {endpoint(fam, ip, p)}\n".encode()
        c.sendall(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    else:
        c.sendall(f"{args.label} {ip} {p}\n".encode())
    note(f"tcp {endpoint(fam, ip, p)} from {endpoint(fam, peer[0], peer[1])}")


while True:
    readable, _, _ = select.select(list(socks), [], [])
    for s in readable:
        kind, fam = socks[s]
        try:
            if kind == "tcp":
                c, _ = s.accept()
                with c:
                    answer_tcp(c, fam)
                continue
            data, cmsgs, _, peer = s.recvmsg(2048, 1024)
            if args.redirect:
                dst = redirected_udp_dst(fam, peer)
                note(f"udp {endpoint(fam, *dst)} {data.decode(errors='replace').strip()}")
                if not flow_address(fam, peer[0]):
                    s.sendto(f"{args.label} {dst[0]} {dst[1]}\n".encode(), peer)
                    continue
            else:
                dst = orig_dst(fam, cmsgs)
                if dst is None:
                    continue
                note(f"udp {endpoint(fam, *dst)} {data.decode(errors='replace').strip()}")
            with transparent(fam, socket.SOCK_DGRAM, foreign=True) as r:
                r.bind(dst)
                r.sendto(f"{args.label} {dst[0]} {dst[1]}\n".encode(), peer)
        except OSError:
            # A peer that went away, or an answer nobody takes: the next flow
            # is served all the same.
            continue
