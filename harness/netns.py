"""A small internet inside the machine: Linux network namespaces, veth pairs and nftables NAT.

::

    home1 (192.168.1.2) -- router1 [masquerade] (10.99.1.2) --+
                                                               +-- public (10.99.1.1, 10.99.2.1): forwards
    home2 (192.168.2.2) -- router2 [masquerade] (10.99.2.2) --+

The public namespace holds the reachable peers; each home sits behind its own router, which masquerades what
leaves and forwards nothing that was not asked for. So a home peer dials the public peers, nobody dials a home
peer, and the two homes cannot dial each other: the world of a volunteer behind a NAT router. Nothing here has
a route to a real network; every address lives inside namespaces this module creates and deletes.

``NatWorld(internet=True)`` is closer to the real internet, for hole punching: libp2p punches only for peers
whose observed addresses are public (not 10/8, 192.168/16, ...), and only once four peers at different IPs saw
the same one, so the routers' WAN sides are 11.1.0.0/24 and 13.2.0.0/24, the public namespace has
:data:`INTERNET_IPS` on its loopback for its peers, and the routers drop what reaches them unasked (as home
routers do; answering with a reset, as a bare Linux router does, kills a punch's first packet). These
addresses too live only inside the namespaces.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables, installed by ``make install-dev``). :func:`missing` says
what is not there, so that tests fail with that reason in CI and are skipped elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

PUBLIC_IP = "10.99.1.1"
"""The public peers' address, as the first home's router reaches it."""
INTERNET_IPS = ("7.0.0.1", "7.1.0.1", "7.2.0.1", "7.3.0.1", "7.4.0.1")
"""With ``internet=True``: addresses of the public namespace, one per public peer (libp2p counts observers by IP)."""
CLONE_NEWNET = 0x40000000


def missing() -> str | None:
    """Why a namespace world cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (make install-dev installs nftables and iproute2)"
    probe = f"gprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@contextmanager
def world_for_test(internet: bool = False) -> Iterator[NatWorld]:
    """A :class:`NatWorld` for a test; where namespaces cannot be made, the test fails with the reason in CI (the
    world must be built there) and is skipped elsewhere."""
    import pytest

    reason = missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the namespace world cannot be built on this machine: {reason}")
        pytest.skip(reason)
    with NatWorld(internet=internet) as world:
        yield world


def _run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


class NatWorld:
    """The world of the module docstring; ``with NatWorld() as world:`` builds it and always deletes it.
    :meth:`ns` names a namespace (``public``, ``home1``, ``home2``) for ``ip netns exec``; :meth:`caller`
    runs a function in a thread that lives in it (for HTTP to a daemon's 127.0.0.1 port there)."""

    ROLES = ("public", "router1", "router2", "home1", "home2")

    def __init__(self, internet: bool = False) -> None:
        self.internet = internet
        self.prefix = f"g{secrets.token_hex(3)}"  # interface names stay under 15 characters
        self.made: list[str] = []
        self._callers: dict[str, ThreadPoolExecutor] = {}

    def ns(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def __enter__(self) -> NatWorld:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wan(self, i: int) -> tuple[str, str]:
        """Router ``i``'s WAN network: (the public side's address, the router's), without the /24."""
        return (f"{(11, 13)[i - 1]}.{i}.0.1", f"{(11, 13)[i - 1]}.{i}.0.2") if self.internet else (
            f"10.99.{i}.1", f"10.99.{i}.2")  # fmt: skip

    def _build(self) -> None:
        p = self.prefix
        for role in self.ROLES:
            _run("ip", "netns", "add", self.ns(role))
            self.made.append(self.ns(role))
            _run("ip", "-n", self.ns(role), "link", "set", "lo", "up")
        _run("ip", "netns", "exec", self.ns("public"), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ip in INTERNET_IPS if self.internet else ():
            _run("ip", "-n", self.ns("public"), "addr", "add", f"{ip}/32", "dev", "lo")
        for i in (1, 2):
            public_side, router_side = self.wan(i)
            wan, up = f"{p}w{i}", f"{p}u{i}"  # the router's WAN side, the public side of the same cable
            lan, home = f"{p}l{i}", f"{p}h{i}"
            router, house = self.ns(f"router{i}"), self.ns(f"home{i}")
            _run("ip", "link", "add", up, "type", "veth", "peer", "name", wan)
            _run("ip", "link", "set", up, "netns", self.ns("public"))
            _run("ip", "link", "set", wan, "netns", router)
            _run("ip", "-n", self.ns("public"), "addr", "add", f"{public_side}/24", "dev", up)
            _run("ip", "-n", self.ns("public"), "link", "set", up, "up")
            _run("ip", "-n", router, "addr", "add", f"{router_side}/24", "dev", wan)
            _run("ip", "-n", router, "link", "set", wan, "up")
            _run("ip", "link", "add", lan, "type", "veth", "peer", "name", home)
            _run("ip", "link", "set", lan, "netns", router)
            _run("ip", "link", "set", home, "netns", house)
            _run("ip", "-n", router, "addr", "add", f"192.168.{i}.1/24", "dev", lan)
            _run("ip", "-n", router, "link", "set", lan, "up")
            _run("ip", "-n", house, "addr", "add", f"192.168.{i}.2/24", "dev", home)
            _run("ip", "-n", house, "link", "set", home, "up")
            _run("ip", "-n", house, "route", "add", "default", "via", f"192.168.{i}.1")
            _run("ip", "-n", router, "route", "add", "default", "via", public_side)
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            unasked = f"""
  chain input {{
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "{lan}" accept
  }}""" if self.internet else ""
            rules = f"""
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname "{wan}" masquerade
  }}
}}
table ip filter {{
  chain forwarding {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{lan}" accept
  }}{unasked}
}}
"""
            _run("ip", "netns", "exec", router, "nft", "-f", "-", stdin=rules)

    def caller(self, role: str) -> Callable[..., Any]:
        """``call(fn, *args, **kwargs)``: ``fn`` run in a thread that entered ``role``'s network namespace (its
        sockets are made there); one thread per namespace, reused."""
        if role not in self._callers:
            self._callers[role] = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{role}", initializer=_enter,
                                                     initargs=(self.ns(role),))  # fmt: skip

        def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            return self._callers[role].submit(fn, *args, **kwargs).result()

        return call

    def close(self) -> None:
        for executor in self._callers.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._callers.clear()
        for name in reversed(self.made):  # deleting a namespace deletes its interfaces, and their peers
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()


def _enter(name: str) -> None:
    """Move this thread (only it: network namespaces are per thread) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)
