#!/usr/bin/env python3
"""A hostile upstream: a SOCKS5 or HTTP proxy that answers wrongly.

Usage: hostile.py MODE ADDR PORT; prints "ready" once listening. Every
connection gets the same treatment:

garbage        random bytes for every reply, then close
socks4         SOCKS version 4 in the method reply
method-cut     half a method reply, then close
atyp           method accepted, CONNECT reply with address type 9
reply-cut      method accepted, CONNECT reply cut inside the address
huge-name      method accepted, CONNECT reply naming a 255-byte host, cut
refused        method accepted, CONNECT refused (code 5)
silent         reads, never answers
trickle        method accepted, then a CONNECT reply one byte every 300 ms
               that never ends (a name of 255 bytes)
http-garbage   a reply that is not HTTP, then close
http-endless   "HTTP/1.1 200" and header lines that never end (1 MiB)
http-trickle   "HTTP/1.1 200 OK\\r\\n" one byte every 300 ms, never ending
http-cut       "HTTP/1.1 200 Conn" then close
udp-junk       a working SOCKS5 UDP ASSOCIATE whose relay answers each
               datagram with malformed ones (short, fragment, bad address
               type, wrong source) and then one good one, "good <dst-ip>"
"""
import os
import socket
import struct
import sys
import threading
import time

mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET


def recv_some(c):
    try:
        return c.recv(4096)
    except OSError:
        return b""


def method(c):
    recv_some(c)
    c.sendall(b"\x05\x00")


def request(c):
    """Reads a SOCKS5 request; returns (cmd, packed address incl. type, port)."""
    d = recv_some(c)
    if len(d) < 4:
        return None
    return d[1], d[3:]


def udp_junk(c):
    method(c)
    req = request(c)
    if req is None:
        return
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((addr, 0))
    host, uport = u.getsockname()[:2]
    packed = socket.inet_pton(fam, host)
    atyp = b"\x01" if fam == socket.AF_INET else b"\x04"
    c.sendall(b"\x05\x00\x00" + atyp + packed + struct.pack("!H", uport))

    def relay():
        while True:
            d, peer = u.recvfrom(65535)
            if len(d) < 10 or d[3] != 1:
                continue
            dst = d[4:8]
            dport = d[8:10]
            head = b"\x00\x00\x00\x01" + dst + dport
            wrong = b"\x00\x00\x00\x01" + bytes([203, 0, 113, 9]) + dport
            for junk in [
                b"",
                b"\x00",
                b"\x00\x00\x00",
                b"\x00\x00\x01\x01" + dst + dport + b"fragment",
                b"\x00\x00\x00\x09" + dst + dport + b"bad type",
                b"\x00\x00\x00\x03\x04name" + dport + b"a name",
                b"\x00\x00\x00\x04" + b"\x00" * 10,
                b"\x00\x00\x00\x01" + dst,
                wrong + b"wrong source",
                os.urandom(40),
            ]:
                u.sendto(junk, peer)
            u.sendto(head + b"good " + socket.inet_ntop(socket.AF_INET, dst).encode(), peer)

    threading.Thread(target=relay, daemon=True).start()
    while recv_some(c):
        pass


def serve(c):
    try:
        if mode == "garbage":
            for _ in range(3):
                if not recv_some(c):
                    break
                c.sendall(os.urandom(23))
        elif mode == "socks4":
            recv_some(c)
            c.sendall(b"\x04\x00")
        elif mode == "method-cut":
            recv_some(c)
            c.sendall(b"\x05")
        elif mode == "atyp":
            method(c)
            request(c)
            c.sendall(b"\x05\x00\x00\x09" + b"\x00" * 6)
        elif mode == "reply-cut":
            method(c)
            request(c)
            c.sendall(b"\x05\x00\x00\x04\xfd\x00")
        elif mode == "huge-name":
            method(c)
            request(c)
            c.sendall(b"\x05\x00\x00\x03\xff" + b"a" * 100)
        elif mode == "refused":
            method(c)
            request(c)
            c.sendall(b"\x05\x05\x00\x01" + b"\x00" * 6)
        elif mode == "silent":
            while recv_some(c):
                pass
        elif mode == "trickle":
            method(c)
            request(c)
            for b in b"\x05\x00\x00\x03\xff" + b"a" * 255:
                c.sendall(bytes([b]))
                time.sleep(0.3)
        elif mode == "http-garbage":
            recv_some(c)
            c.sendall(b"SSH-2.0-not-a-proxy\r\n\r\n")
        elif mode == "http-endless":
            recv_some(c)
            c.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(1 << 14):
                c.sendall(b"X-Padding: " + b"a" * 53 + b"\r\n")
        elif mode == "http-trickle":
            recv_some(c)
            while True:
                for b in b"HTTP/1.1 200 OK\r\nX: y\r\n":
                    c.sendall(bytes([b]))
                    time.sleep(0.3)
        elif mode == "http-cut":
            recv_some(c)
            c.sendall(b"HTTP/1.1 200 Conn")
        elif mode == "udp-junk":
            udp_junk(c)
        else:
            raise SystemExit("unknown mode " + mode)
    except OSError:
        pass
    finally:
        c.close()


s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
