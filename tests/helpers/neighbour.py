#!/usr/bin/env python3
"""A neighbour on the LAN trying the host's listener ports.

probe PORTS HOST...          TCP connect and UDP send to each HOST:PORT (PORTS
                             comma-separated); one line each:
                             "tcp HOST PORT refused|timeout|open <first bytes>"
                             "udp HOST PORT refused|silent|answered <bytes>"
flood SECONDS PORTS HOST...  TCP connects and UDP datagrams to every HOST:PORT,
                             as fast as they go, for SECONDS -> "OK flood <tries>"
"""
import socket
import sys
import time


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp(host, port):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"
    try:
        s.settimeout(0.5)
        return "open " + repr(s.recv(64))
    except OSError:
        return "open"
    finally:
        s.close()


def udp(host, port):
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    s.settimeout(0.5)
    try:
        s.connect((host, port))
        s.send(b"hello")
        return "answered " + repr(s.recv(256))
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"
    finally:
        s.close()


def main():
    mode = sys.argv[1]
    if mode == "probe":
        ports = [int(p) for p in sys.argv[2].split(",")]
        for host in sys.argv[3:]:
            for port in ports:
                print("tcp", host, port, tcp(host, port), flush=True)
                print("udp", host, port, udp(host, port), flush=True)
    elif mode == "flood":
        until = time.monotonic() + float(sys.argv[2])
        ports = [int(p) for p in sys.argv[3].split(",")]
        hosts = sys.argv[4:]
        tries = 0
        while time.monotonic() < until:
            for host in hosts:
                for port in ports:
                    s = socket.socket(fam(host), socket.SOCK_STREAM)
                    s.setblocking(False)
                    try:
                        s.connect((host, port))
                    except OSError:
                        pass
                    s.close()
                    u = socket.socket(fam(host), socket.SOCK_DGRAM)
                    try:
                        u.sendto(b"flood", (host, port))
                    except OSError:
                        pass
                    u.close()
                    tries += 1
        print("OK flood", tries, flush=True)


main()
