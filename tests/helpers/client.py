#!/usr/bin/env python3
"""One TCP or UDP exchange; prints the answer, or "ERR <reason>". UDP prints
the answer's source too ("ANSWER from IP"); udp-connected connects the socket
first and checks that getpeername() names the destination.
Usage: client.py tcp|udp|udp-connected HOST PORT [TIMEOUT-SECONDS, default 2]"""
import socket
import sys

proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 2
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((host, port))
        print(s.recv(256).decode().strip())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        if proto == "udp-connected":
            s.connect((host, port))
            peer = s.getpeername()
            if (socket.inet_pton(fam, peer[0]), peer[1]) != (socket.inet_pton(fam, host), port):
                print("ERR getpeername", peer)
                sys.exit()
            s.send(b"hello")
        else:
            s.sendto(b"hello", (host, port))
        data, src = s.recvfrom(256)
        print(data.decode().strip(), "from", src[0])
except OSError as e:
    print("ERR", type(e).__name__, e.errno)
