"""A transparent (TPROXY) listener for the NixOS VM tests.

usage: tproxy-listener.py PORT LOGFILE

TCP (IPv4 and IPv6): answers any HTTP request with `proxied <original destination>`.
UDP (IPv4 and IPv6): appends `udp <original destination> <payload>` to LOGFILE.
The original destination is what the kernel's TPROXY keeps: the accepted socket's
local address (TCP) or IP(V6)_ORIGDSTADDR (UDP). Needs CAP_NET_ADMIN.
"""
import selectors
import socket
import struct
import sys

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75


def endpoint(family, addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def make(family, kind, port):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        if kind == socket.SOCK_DGRAM:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        s.bind(("::", port))
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        if kind == socket.SOCK_DGRAM:
            s.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        s.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    s.setblocking(False)
    return s


def original_destination(family, ancdata):
    for level, kind, data in ancdata:
        if family == socket.AF_INET and (level, kind) == (socket.IPPROTO_IP, IP_RECVORIGDSTADDR):
            port, addr = struct.unpack_from("!2xH4s", data)
            return endpoint(family, (socket.inet_ntop(socket.AF_INET, addr), port))
        if family == socket.AF_INET6 and (level, kind) == (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR):
            port, addr = struct.unpack_from("!2xH4x16s", data)
            return endpoint(family, (socket.inet_ntop(socket.AF_INET6, addr), port))
    return "unknown"


def serve_tcp(listener, log):
    conn, peer = listener.accept()
    with conn:
        conn.settimeout(5)
        dst = endpoint(listener.family, conn.getsockname())
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
        except OSError:
            pass
        body = f"proxied {dst}\n".encode()
        conn.sendall(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    log.write(f"tcp {dst} from {endpoint(listener.family, peer)}\n")
    log.flush()


def serve_udp(sock, log):
    data, ancdata, _flags, _peer = sock.recvmsg(65535, 1024)
    dst = original_destination(sock.family, ancdata)
    log.write(f"udp {dst} {data.decode(errors='replace').strip()}\n")
    log.flush()


def main():
    port, logfile = int(sys.argv[1]), sys.argv[2]
    sel = selectors.DefaultSelector()
    for family in (socket.AF_INET, socket.AF_INET6):
        sel.register(make(family, socket.SOCK_STREAM, port), selectors.EVENT_READ, serve_tcp)
        sel.register(make(family, socket.SOCK_DGRAM, port), selectors.EVENT_READ, serve_udp)
    with open(logfile, "a", encoding="utf-8") as log:
        print(f"tproxy-listener: ready on port {port}", flush=True)
        while True:
            for key, _mask in sel.select():
                try:
                    key.data(key.fileobj, log)
                except OSError as e:
                    print(f"tproxy-listener: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
