#!/usr/bin/env python3
"""A transparent (TPROXY) listener standing in for a proxy core.

TCP: answers "proxy <original-destination-ip> <port>".
UDP: reads the original destination from IP(V6)_RECVORIGDSTADDR and answers from a
transparent socket bound to that destination, as real proxy cores do.
Bound to 127.0.0.1 and ::1, as the README tells proxy cores to be: the daemon's
tproxy statements deliver there, and the network cannot reach it.
Usage: listener.py PORT [LABEL]
"""
import select
import socket
import struct
import sys

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74

port = int(sys.argv[1])
label = sys.argv[2] if len(sys.argv) > 2 else "proxy"


def transparent(fam, typ):
    s = socket.socket(fam, typ)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    return s


socks = {}
for fam, any_addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    t = transparent(fam, socket.SOCK_STREAM)
    t.bind((any_addr, port))
    t.listen(128)
    socks[t] = ("tcp", fam)
    u = transparent(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET:
        u.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    else:
        u.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    u.bind((any_addr, port))
    socks[u] = ("udp", fam)

print("ready", flush=True)


def orig_dst(fam, cmsgs):
    for level, typ, data in cmsgs:
        if fam == socket.AF_INET and level == socket.SOL_IP and typ == IP_RECVORIGDSTADDR:
            p, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET, data[4:8]), p
        if fam == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and typ == IPV6_RECVORIGDSTADDR:
            p, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), p
    return None


while True:
    readable, _, _ = select.select(list(socks), [], [])
    for s in readable:
        kind, fam = socks[s]
        if kind == "tcp":
            c, _ = s.accept()
            ip, p = c.getsockname()[:2]
            try:
                c.sendall(f"{label} {ip} {p}\n".encode())
            finally:
                c.close()
        else:
            data, cmsgs, _, peer = s.recvmsg(2048, 1024)
            dst = orig_dst(fam, cmsgs)
            if dst is None:
                continue
            r = transparent(fam, socket.SOCK_DGRAM)
            try:
                r.bind(dst)
                r.sendto(f"{label} {dst[0]} {dst[1]}\n".encode(), peer)
            finally:
                r.close()
