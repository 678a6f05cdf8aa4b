#!/usr/bin/env python3
"""A plain TCP+UDP server on every address (v4 and v6) of its network namespace:
answers "<label> <client-ip>". Usage: server.py PORT LABEL [ADDR...]"""
import select
import socket
import sys

port, label = int(sys.argv[1]), sys.argv[2]
addrs = sys.argv[3:] or ["0.0.0.0", "::"]
socks = {}
for a in addrs:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(fam, typ)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((a, port))
        if typ == socket.SOCK_STREAM:
            s.listen(128)
        socks[s] = typ
print("ready", flush=True)
while True:
    readable, _, _ = select.select(list(socks), [], [])
    for s in readable:
        if socks[s] == socket.SOCK_STREAM:
            c, peer = s.accept()
            try:
                c.sendall(f"{label} {peer[0]}\n".encode())
            finally:
                c.close()
        else:
            data, peer = s.recvfrom(2048)
            s.sendto(f"{label} {peer[0]}\n".encode(), peer)
