#!/usr/bin/env python3
"""Bulk and long-lived TCP for the forwarder tests.

serve PORT             on 0.0.0.0 and ::, per connection the first line picks:
                       "up"      read to EOF, answer "<sha256> <bytes>" (needs half-close)
                       "down N"  send N bytes of the pattern, then close
                       "echo"    echo every line until EOF
up HOST PORT N         send N bytes, half-close, check the digest   -> "OK up N <secs>"
down HOST PORT N       receive N bytes, check them                  -> "OK down N <secs>"
hold HOST PORT FILE    echo one line, wait until FILE exists, echo another -> "OK hold"
trickle HOST PORT N MS echo N lines, MS milliseconds apart    -> "OK trickle N"
many HOST PORT K       open K connections at once, then echo on each -> "OK many K"
flood HOST PORT N      UDP: one datagram to each of N ports from PORT up -> "OK flood N"
Errors print "ERR <reason>".
"""
import hashlib
import os
import socket
import sys
import threading
import time

BLOCK = hashlib.sha256(b"cgtproxy").digest() * 32768  # 1 MiB pattern


def pattern(n):
    while n > 0:
        chunk = BLOCK[: min(n, len(BLOCK))]
        n -= len(chunk)
        yield chunk


def digest(n):
    h = hashlib.sha256()
    for c in pattern(n):
        h.update(c)
    return h.hexdigest()


def readline(s):
    b = b""
    while not b.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        b += c
    return b.decode().strip()


def drain(s):
    """Reads s to its end: (sha256 hex digest, byte count)."""
    h, n = hashlib.sha256(), 0
    while True:
        d = s.recv(1 << 16)
        if not d:
            return h.hexdigest(), n
        h.update(d)
        n += len(d)


def handle(c):
    try:
        cmd = readline(c).split()
        if not cmd:
            return
        if cmd[0] == "up":
            hexdigest, n = drain(c)
            c.sendall(f"{hexdigest} {n}\n".encode())
        elif cmd[0] == "down":
            for chunk in pattern(int(cmd[1])):
                c.sendall(chunk)
        elif cmd[0] == "echo":
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()


def serve(port):
    socks = []
    for fam, a in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((a, port))
        s.listen(4096)
        socks.append(s)

    def loop(s):
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    for s in socks[1:]:
        threading.Thread(target=loop, args=(s,), daemon=True).start()
    print("ready", flush=True)
    loop(socks[0])


def connect(host, port, timeout=10):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def main():
    mode = sys.argv[1]
    if mode == "serve":
        return serve(int(sys.argv[2]))
    host, port = sys.argv[2], int(sys.argv[3])
    t0 = time.monotonic()
    if mode == "up":
        n = int(sys.argv[4])
        s = connect(host, port)
        s.sendall(b"up\n")
        for c in pattern(n):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        got = readline(s)
        want = f"{digest(n)} {n}"
        if got != want:
            return print(f"ERR got {got!r} want {want!r}")
        print(f"OK up {n} {time.monotonic() - t0:.2f}")
    elif mode == "down":
        n = int(sys.argv[4])
        s = connect(host, port)
        s.sendall(f"down {n}\n".encode())
        hexdigest, got = drain(s)
        if got != n or hexdigest != digest(n):
            return print(f"ERR got {got} bytes, digest match {hexdigest == digest(n)}")
        print(f"OK down {n} {time.monotonic() - t0:.2f}")
    elif mode == "hold":
        f = sys.argv[4]
        s = connect(host, port, timeout=30)
        s.sendall(b"echo\nfirst\n")
        if readline(s) != "first":
            return print("ERR first echo")
        print("held", flush=True)
        while not os.path.exists(f):
            time.sleep(0.02)
        s.sendall(b"second\n")
        got = readline(s)
        if got != "second":
            return print(f"ERR second echo {got!r}")
        print("OK hold")
    elif mode == "trickle":
        n, pause = int(sys.argv[4]), int(sys.argv[5]) / 1000
        s = connect(host, port)
        s.sendall(b"echo\n")
        for i in range(n):
            time.sleep(pause)
            s.sendall(f"line {i}\n".encode())
            got = readline(s)
            if got != f"line {i}":
                return print(f"ERR line {i}: {got!r}")
        print(f"OK trickle {n}")
    elif mode == "many":
        k = int(sys.argv[4])
        conns = [connect(host, port, timeout=30) for _ in range(k)]
        for i, s in enumerate(conns):
            s.sendall(f"echo\nline {i}\n".encode())
        for i, s in enumerate(conns):
            got = readline(s)
            if got != f"line {i}":
                return print(f"ERR connection {i}: {got!r}")
        print(f"OK many {k} {time.monotonic() - t0:.2f}")
    elif mode == "flood":
        n = int(sys.argv[4])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        u = socket.socket(fam, socket.SOCK_DGRAM)
        for i in range(n):
            u.sendto(b"flood", (host, port + i))
            if i % 50 == 49:
                time.sleep(0.002)  # stay within the listener's receive buffer
        print(f"OK flood {n} {time.monotonic() - t0:.2f}")


try:
    main()
except OSError as e:
    print("ERR", type(e).__name__, e.errno, e)
