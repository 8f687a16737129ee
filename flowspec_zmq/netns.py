"""Emulated hosts in network namespaces: fs_h0..fs_h{N-1} at 10.78.0.(10+i) on a bridge.

Each host's link is shaped with tbf on both ends (netem is missing on these kernels, so delay comes
from the transport's user-space shaping instead). Needs root and `ip netns`.

    python -m flowspec_zmq.netns up 3 --rate 150mbit     # then: ip netns exec fs_h1 <command>
    python -m flowspec_zmq.netns down
"""

from __future__ import annotations

import argparse
import subprocess

SWITCH = "fs_sw"
PREFIX = "fs_h"


def host_name(i: int) -> str:
    return f"{PREFIX}{i}"


def host_address(i: int) -> str:
    return f"10.78.0.{10 + i}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _existing() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.split()]


def up(count: int, rate: str | None = "150mbit") -> list[str]:
    """Create `count` hosts; returns their addresses."""
    down()
    _ip("netns", "add", SWITCH)
    _ip("-n", SWITCH, "link", "add", "br0", "type", "bridge")
    _ip("-n", SWITCH, "link", "set", "br0", "up")
    for i in range(count):
        ns, inner, outer = host_name(i), f"fsv{i}", f"fsp{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "netns", SWITCH)
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{host_address(i)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", SWITCH, "link", "set", outer, "master", "br0")
        _ip("-n", SWITCH, "link", "set", outer, "up")
        if rate:
            for where, dev in ((ns, "eth0"), (SWITCH, outer)):
                subprocess.run(
                    ["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", rate, "burst", "32kb", "latency", "50ms"],
                    check=True, capture_output=True,
                )
    return [host_address(i) for i in range(count)]


def down() -> None:
    for ns in _existing():
        if ns == SWITCH or ns.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("up")
    make.add_argument("count", type=int)
    make.add_argument("--rate", default="150mbit", help="tbf rate per link, or 'none'")
    sub.add_parser("down")
    args = parser.parse_args(argv)
    if args.command == "up":
        for i, address in enumerate(up(args.count, None if args.rate == "none" else args.rate)):
            print(f"{host_name(i)} {address}")
    else:
        down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
