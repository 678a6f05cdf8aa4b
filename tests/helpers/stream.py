#!/usr/bin/env python3
"""A steady stream of UDP datagrams and TCP connections to one destination, for
leak tests: counts the answers by their first word (the listener answers "proxy",
the destination's server "peer") and failures. Prints one JSON line at the end.
Usage: stream.py HOST PORT SECONDS UDP_PER_S TCP_PER_S"""
import json
import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
seconds, udp_rate, tcp_rate = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
counts = {"udp_sent": 0, "tcp_tried": 0}


def count(key):
    counts[key] = counts.get(key, 0) + 1


udp = socket.socket(fam, socket.SOCK_DGRAM)
udp.setblocking(False)
start = time.monotonic()
next_udp = next_tcp = start
while time.monotonic() - start < seconds:
    now = time.monotonic()
    if now >= next_udp:
        try:
            udp.sendto(b"x", (host, port))
            counts["udp_sent"] += 1
        except OSError:
            count("udp_send_error")
        next_udp += 1 / udp_rate
    if now >= next_tcp:
        counts["tcp_tried"] += 1
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                count("tcp_" + s.recv(64).decode().split(" ")[0])
        except OSError:
            count("tcp_failed")
        next_tcp += 1 / tcp_rate
    try:
        while True:
            data = udp.recv(64)
            count("udp_" + data.decode().split(" ")[0])
    except BlockingIOError:
        pass
    time.sleep(0.0005)
# Answers still on their way.
udp.settimeout(0.3)
try:
    while True:
        count("udp_" + udp.recv(64).decode().split(" ")[0])
except OSError:
    pass
print(json.dumps(counts), flush=True)
