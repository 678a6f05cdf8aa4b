#!/usr/bin/env python3
"""Network actors of the cgtproxy VM test (runs inside the guest).

  vmnet.py peer PORT ADDR...    plain server on ADDRs (run inside the netns);
                                answers "PEER <local ip> <port>"
  vmnet.py whoami PORT ADDR...  the same, but answers "FROM <client ip>": who
                                reached it (the host, or a proxy's address)
  vmnet.py probe tcp|udp|sendto HOST PORT [TIMEOUT]
                                one request (udp: on a connected socket;
                                sendto: unconnected); prints the answer, exit
                                0 on an answer, 1 (with "ERROR ...") otherwise

The answer tells the test who was reached. The TPROXY listener is
tests/helpers/listener.py, the one all tests use.
"""
import os
import selectors
import socket
import sys

def sd_notify(msg):
    """Tell systemd we are ready (Type=notify), so callers need not poll."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), path)


def log(*args):
    print(*args, flush=True)


def open_sockets(port, addrs):
    """TCP and UDP sockets on each (family, address)."""
    socks = []
    for family, addr in addrs:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(family, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            socks.append(s)
    return socks


def serve(port, addrs, whoami=False):
    tag = "PEER"

    def answer(local, peer):
        if whoami:
            return f"FROM {peer[0]}\n".encode()
        return f"{tag} {local[0]} {local[1]}\n".encode()

    sel = selectors.DefaultSelector()
    for s in open_sockets(port, addrs):
        sel.register(s, selectors.EVENT_READ)
    sd_notify("READY=1")
    log(f"{tag} serving port {port} on {addrs}")
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                if s.type == socket.SOCK_STREAM:
                    conn, peer = s.accept()
                    with conn:
                        ip, p = conn.getsockname()[:2]
                        conn.sendall(answer((ip, p), peer))
                        log(f"tcp from {peer[0]}:{peer[1]} to {ip}:{p}")
                else:
                    data, peer = s.recvfrom(2048)
                    ip, p = s.getsockname()[:2]
                    s.sendto(answer((ip, p), peer), peer)
                    log(f"udp from {peer[0]}:{peer[1]} to {ip}:{p}")
            except OSError as e:
                log(f"error: {e!r}")


def probe(proto, host, port, timeout):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(family, kind) as s:
            s.settimeout(timeout)
            if proto == "sendto":
                s.sendto(b"ping\n", (host, port))
            else:
                s.connect((host, port))
                if kind == socket.SOCK_DGRAM:
                    s.send(b"ping\n")
            answer = s.recv(256).decode().strip()
    except OSError as e:
        print(f"ERROR {type(e).__name__}: {e}")
        return 1
    if not answer:
        print("ERROR empty answer")
        return 1
    print(answer)
    return 0


def main(argv):
    if len(argv) >= 3 and argv[0] in ("peer", "whoami"):
        addrs = [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in argv[2:]]
        serve(int(argv[1]), addrs, whoami=argv[0] == "whoami")
    elif len(argv) in (4, 5) and argv[0] == "probe" and argv[1] in ("tcp", "udp", "sendto"):
        timeout = float(argv[4]) if len(argv) == 5 else 3.0
        return probe(argv[1], argv[2], int(argv[3]), timeout)
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
