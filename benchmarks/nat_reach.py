"""Reach through relays, measured in a small internet of network namespaces (``harness/netns.py``: two homes
behind masquerading routers, a public side). Needs root, ``ip`` and ``nft``, as the NAT tests do.

Run: ``sudo .venv/bin/python benchmarks/nat_reach.py [--mb 32] [--tokens 32]``. Prints ONE JSON object.

- ``join_s``: from just before a peer's ``Popen`` until the bootstrap peer lists it in ``/peers``: a second
  public peer (``public``) and a home peer (``private``: its reach check, the relay reservation, the relayed
  announce), and ``private_over_public``.
- ``transfer``: ``--mb`` MiB fetched with garden's content transfer (the code row sets and checkpoints move
  with, hash-checked) by a fetcher on the public side, from a holder on the public side (``direct_mb_s``)
  and from one at home behind the relay (``relayed_mb_s``); ``relayed_over_direct``; the relay's p2pd CPU
  seconds per relayed MiB (``relay_cpu_s_per_mb``) and the bytes that entered the public side from the home's
  router per relayed MiB (``relay_bytes_per_mb``: the relay's framing and encryption overhead);
  ``fetches_cut_short``: fetches whose stream ended inside a message, tried again as the swarm's fetches are
  (then the per-MiB figures are left out: a fetch cut short moved an unknown part).
- ``pipeline``: tokens/s of greedy generations asked on the public peer that serves layers 0-15, with layers
  15-30 served by another public peer (``direct_tokens_s``) or by a home peer (``home_tokens_s``);
  ``home_over_direct``. The home peer joined through the asker, so the asker reaches it over the connection
  the home opened: a home needs no relay to talk to the public peers it dials.
- ``home_to_home``: tokens/s of generations asked by a peer in home 2, layers 0-15 on a public peer and 15-30
  on a peer in home 1, so the hop between the homes needs the relay: in the world above (``relayed``: private
  addresses, no hole punch possible), and in the internet-like world (``hole_punched``: public-looking
  addresses, four observers, routers that drop the unasked), where libp2p's DCUtR opens a direct connection;
  each says whether home 2 held a direct TCP connection to home 1's router (``home2_to_home1_direct``).
  ``punched_over_relayed``. On one machine the relay's extra hop costs little: the figure shows the path
  works, not what a punch saves across a real internet.
- ``relay_probe``: what each public peer's probe of its own relay found after it started (``relay_limits``:
  ``garden`` once its limits serve; ``relay_check``: the bytes read, the starts of its p2p daemon). The public
  join time includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.daemons import Daemon, DaemonFactory, wait_until  # noqa: E402
from harness.netns import INTERNET_IPS, PUBLIC_IP, NatWorld, missing  # noqa: E402

MODEL = "builtin:smollm2-135m"
PROMPT = "Write one sentence about rain."


def public_addr(daemon: Daemon, ip: str = PUBLIC_IP) -> str:
    return next(a for a in daemon.addresses if a.startswith(f"/ip4/{ip}/"))


def seen(daemon: Daemon) -> set[str]:
    return {p["peer_id"] for p in daemon.get("/peers").json()}


def start(
    factory: DaemonFactory, world: NatWorld, role: str, *args: str, host: str = "/ip4/0.0.0.0/tcp/0", **kwargs: Any
) -> Daemon:
    return factory.start(
        "--max-threads", "1", *args, host_maddr=host, netns=world.ns(role), via=world.caller(role),
        env={"HF_HUB_OFFLINE": "1"}, **kwargs,
    )  # fmt: skip


def joined_in(
    factory: DaemonFactory, world: NatWorld, bootstrap: Daemon, role: str, *args: str
) -> tuple[Daemon, float]:
    began = time.monotonic()
    daemon = start(factory, world, role, "--join", public_addr(bootstrap), *args)
    wait_until(lambda: daemon.peer_id in seen(bootstrap), 120, 0.1, f"{role} seen by the bootstrap peer")
    return daemon, time.monotonic() - began


def p2pd_of(daemon: Daemon) -> psutil.Process:
    return next(p for p in psutil.Process(daemon.proc.pid).children(recursive=True) if p.name() == "p2pd")


def rx_bytes(world: NatWorld, interface: str) -> int:
    path = f"/sys/class/net/{interface}/statistics/rx_bytes"  # the interface lives in the public namespace
    out = subprocess.run(["ip", "netns", "exec", world.ns("public"), "cat", path], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return int(out.stdout)


# --- the transfer's helper processes (run with ``ip netns exec``) --------------------------------------------
HOLDER = "holder"
FETCHER = "fetcher"


async def _holder(out: Path, mb: int, join: str, relay: bool) -> None:
    from hivemind.p2p import P2P

    from garden.net import p2pd_patch
    from garden.net.transfer import ContentTransfer, TransferLimits

    blob = os.urandom(mb << 20)
    options: dict[str, Any] = {"force_reachability": "public"}
    if relay:  # as a private peer's daemon starts its p2pd (garden.net.reach.plan)
        p2pd_patch.install({"relayDiscovery": False})
        options = {"use_auto_relay": True, "trusted_relays": [join], "force_reachability": "private",
                   "announce_maddrs": [join + "/p2p-circuit"]}  # fmt: skip
    p2p = await P2P.create(initial_peers=[join], host_maddrs=["/ip4/0.0.0.0/tcp/0"], **options)

    async def source(ref: Any) -> bytes:
        return blob

    transfer = ContentTransfer(p2p, source=source, limits=TransferLimits(), namespace="bench")
    await transfer.start()
    out.write_text(json.dumps({"peer_id": p2p.peer_id.to_base58(), "sha256": hashlib.sha256(blob).hexdigest()}))
    await asyncio.sleep(3600)


async def _fetcher(out: Path, join: str, holders: list[dict[str, str]]) -> None:
    from hivemind.p2p import P2P

    from garden.net.transfer import ContentTransfer, TransferError
    from garden.protocol.content import ContentRef

    p2p = await P2P.create(initial_peers=[join], host_maddrs=["/ip4/0.0.0.0/tcp/0"])
    transfer = ContentTransfer(p2p, namespace="bench")
    await transfer.start()
    timings = {}
    for holder in holders:
        ref = ContentRef(kind="rows", mission_id="ab" * 32, item="0:bench", sha256=holder["sha256"])
        failures = []
        for _ in range(8):  # a fetch cut short is tried again, as the swarm's fetches are (TRANSIENT)
            try:
                await transfer.fetch(holder["peer_id"], ref)  # the first one connects, finds the route: not timed
                began = time.monotonic()
                data = await transfer.fetch(holder["peer_id"], ref)
                break
            except TransferError as e:
                failures.append(e.reason)
                await asyncio.sleep(1.0)
        else:
            raise RuntimeError(f"every fetch from the {holder['name']} holder failed: {failures}")
        timings[holder["name"]] = {"seconds": time.monotonic() - began, "bytes": len(data), "failed": failures}
    out.write_text(json.dumps(timings))
    await p2p.shutdown()


def _helper(world: NatWorld, role: str, *args: str) -> subprocess.Popen:
    log = Path(args[1]).with_suffix(".log").open("wb")  # args[1]: the helper's output file; its log beside it
    return subprocess.Popen(["ip", "netns", "exec", world.ns(role), sys.executable, __file__, *args],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def transfer(world: NatWorld, relay: Daemon, mb: int, tmp: Path) -> dict[str, Any]:
    join = public_addr(relay)
    helpers: list[subprocess.Popen] = []
    try:
        holders = []
        for name, role, relayed in (("direct", "public", False), ("relayed", "home1", True)):
            out = tmp / f"{name}.json"
            helpers.append(_helper(world, role, HOLDER, str(out), str(mb), join, str(relayed)))
            wait_until(lambda out=out: out.exists(), 60, 0.2, f"the {name} holder")  # type: ignore[misc]
            holders.append({"name": name, **json.loads(out.read_text())})
        time.sleep(3.0)  # the relayed holder's reservation and announce
        relay_p2pd = p2pd_of(relay)
        cpu_before = sum(relay_p2pd.cpu_times()[:2])
        rx_before = rx_bytes(world, f"{world.prefix}u1")  # what came in from home 1's router
        result = tmp / "fetched.json"
        fetcher = _helper(world, "public", FETCHER, str(result), join, json.dumps(holders))
        helpers.append(fetcher)
        fetcher.wait(timeout=600)
        if not result.exists():
            raise RuntimeError(f"the fetcher failed: {result.with_suffix('.log').read_text()[-3000:]}")
        timings = json.loads(result.read_text())
        relay_cpu = sum(relay_p2pd.cpu_times()[:2]) - cpu_before
        rx = rx_bytes(world, f"{world.prefix}u1") - rx_before
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait(timeout=10)
    moved = {name: t["bytes"] / (1 << 20) / t["seconds"] for name, t in timings.items()}
    relayed_mb = 2 * timings["relayed"]["bytes"] / (1 << 20)  # two fetches went through the relay
    cut = timings["relayed"]["failed"]  # fetches cut short moved an unknown part: no per-MiB figures then
    return {
        "mb": mb, "direct_mb_s": round(moved["direct"], 2), "relayed_mb_s": round(moved["relayed"], 2),
        "relayed_over_direct": round(moved["relayed"] / moved["direct"], 3),
        "relay_cpu_s_per_mb": None if cut else round(relay_cpu / relayed_mb, 4),
        "relay_bytes_per_mb": None if cut else round(rx / relayed_mb),
        "fetches_cut_short": {name: t["failed"] for name, t in timings.items()},
    }  # fmt: skip


def tokens_per_s(asker: Daemon, tokens: int, runs: int = 3) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "min_tokens": tokens}  # fmt: skip
    rates = []
    for _ in range(runs):
        began = time.monotonic()
        answer = asker.request("POST", "/v1/chat/completions", json=body, timeout=300)
        answer.raise_for_status()
        rates.append(answer.json()["usage"]["completion_tokens"] / (time.monotonic() - began))
    return statistics.median(rates)


def served(daemon: Daemon) -> bool:
    return all(s["layers"] for s in daemon.get("/status").json()["serving"])


def connections(world: NatWorld, role: str, ip: str) -> list[str]:
    """The TCP connections from ``role``'s namespace to ``ip`` (``ss``)."""
    found = subprocess.run(["ip", "netns", "exec", world.ns(role), "ss", "-tnH", "state", "established", "dst", ip],
                           capture_output=True, text=True, check=False)  # fmt: skip
    return found.stdout.split("\n") if found.stdout.strip() else []


def home_to_home(internet: bool, tokens: int, tmp: Path) -> dict[str, Any]:
    """Tokens/s of generations asked by a peer in home 2, with layers 0-15 on a public peer and 15-30 on a peer
    in home 1: two homes, so the hop between them goes through the relay, or, in the internet-like world
    (``NatWorld(internet=True)``: public-looking addresses, four observers, routers that drop the unasked),
    over the direct connection libp2p's hole punch opens. Whether it is direct is read from home 2's
    sockets (a TCP connection to home 1's router)."""
    tmp.mkdir(parents=True, exist_ok=True)
    with NatWorld(internet=internet) as world:
        factory = DaemonFactory(tmp)
        observers: list[subprocess.Popen[bytes]] = []
        ips = INTERNET_IPS if internet else (PUBLIC_IP,) * 4
        try:
            a = start(factory, world, "public", "--reachability", "public", "--roles", "server", "--serve",
                      f"{MODEL}:0-15", host=f"/ip4/{ips[0]}/tcp/0")  # fmt: skip
            join = [public_addr(a, ips[0])]
            if internet:  # three more peers at three more IPs: libp2p takes an address four of them saw
                b = start(factory, world, "public", "--reachability", "public", "--roles", "trainer",
                          "--join", join[0], host=f"/ip4/{ips[1]}/tcp/0")  # fmt: skip
                join.append(public_addr(b, ips[1]))
                for i, ip in enumerate(ips[2:4]):
                    observers.append(subprocess.Popen(
                        ["ip", "netns", "exec", world.ns("public"), sys.executable, "-m", "harness.p2p_peer",
                         f"observer{i}", str(tmp), json.dumps({"host": [f"/ip4/{ip}/tcp/4001"], "reach": "public"})],
                        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    ))  # fmt: skip
                    ready = tmp / f"observer{i}.json"
                    wait_until(ready.exists, 60, 0.2, f"observer {i} up")
                    join.append(f"/ip4/{ip}/tcp/4001/p2p/{json.loads(ready.read_text())['id']}")
            joins = [x for j in join for x in ("--join", j)]
            home1 = start(factory, world, "home1", *joins, "--roles", "server", "--serve", f"{MODEL}:15-30")
            home2 = start(factory, world, "home2", *joins, "--roles", "trainer")
            wait_until(lambda: all(served(d) for d in (a, home1)), 300, 0.5, "layers loaded")
            wait_until(lambda: MODEL in [m["id"] for m in home2.get("/v1/models").json()["data"]], 60, 0.5,
                       "the model covered, seen from home 2")  # fmt: skip
            rate = tokens_per_s(home2, tokens)
            router1 = world.wan(1)[1]
            return {"tokens_s": round(rate, 2), "home2_to_home1_direct": bool(connections(world, "home2", router1)),
                    "home2_reachability": home2.get("/status").json()["network"]["reachability"]}  # fmt: skip
        finally:
            for i in range(len(observers)):
                (tmp / f"observer{i}.stop").touch()  # harness.p2p_peer stops its p2pd and exits
            for proc in observers:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            orphans = factory.close()
            if orphans:
                raise RuntimeError(f"processes left behind: {orphans}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    reason = missing()
    if reason:
        raise SystemExit(f"nat_reach: {reason}")
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="garden-nat-") as tmp, NatWorld() as world:
        factory = DaemonFactory(Path(tmp))
        try:
            a = start(factory, world, "public", "--reachability", "public", "--roles", "server",
                      "--serve", f"{MODEL}:0-15")  # fmt: skip
            b, public_s = joined_in(factory, world, a, "public", "--roles", "server", "--serve", f"{MODEL}:15-30")
            home, private_s = joined_in(factory, world, a, "home1", "--roles", "server", "--serve", f"{MODEL}:15-30")
            report["join_s"] = {"public": round(public_s, 2), "private": round(private_s, 2),
                                "private_over_public": round(private_s / public_s, 2)}  # fmt: skip
            # each public peer's probe of its own relay (part of its join time): which limits serve, after how many
            # starts of its p2p daemon (garden.net.relay_probe)
            report["relay_probe"] = {
                name: {key: d.get("/status").json()["network"][key] for key in ("relay_limits", "relay_check")}
                for name, d in (("a", a), ("b", b))
            }
            wait_until(lambda: all(served(d) for d in (a, b, home)), 300, 0.5, "layers loaded")
            wait_until(lambda: MODEL in [m["id"] for m in a.get("/v1/models").json()["data"]], 60, 0.5, "covered")
            # the asker routes to the faster server of 15-30; one at a time: stop the other for each measure
            assert home.stop() == 0
            direct = tokens_per_s(a, args.tokens)
            assert b.stop() == 0
            home = start(factory, world, "home1", "--join", public_addr(a), "--roles", "server", "--serve",
                         f"{MODEL}:15-30", data_dir=home.data_dir)  # fmt: skip
            wait_until(lambda: served(home), 300, 0.5, "home layers loaded")
            time.sleep(7.0)  # a few announce periods: its record reaches the asker's routing
            relayed = tokens_per_s(a, args.tokens)
            report["pipeline"] = {"tokens": args.tokens, "direct_tokens_s": round(direct, 2),
                                  "home_tokens_s": round(relayed, 2),
                                  "home_over_direct": round(relayed / direct, 3)}  # fmt: skip
            assert home.stop() == 0
            try:
                report["transfer"] = transfer(world, a, args.mb, Path(tmp))
            except RuntimeError as e:  # reported, and the rest is still measured
                report["transfer"] = {"error": str(e)[-1000:]}
        finally:
            orphans = factory.close()
    report["orphans"] = orphans
    with tempfile.TemporaryDirectory(prefix="garden-nat-") as tmp:
        relayed = home_to_home(False, args.tokens, Path(tmp) / "relayed")
    with tempfile.TemporaryDirectory(prefix="garden-nat-") as tmp:
        punched = home_to_home(True, args.tokens, Path(tmp) / "punched")
    report["home_to_home"] = {"relayed": relayed, "hole_punched": punched,
                              "punched_over_relayed": round(punched["tokens_s"] / relayed["tokens_s"], 3)}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == HOLDER:
        asyncio.run(_holder(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "True"))
    elif len(sys.argv) > 1 and sys.argv[1] == FETCHER:
        asyncio.run(_fetcher(Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])))
    else:
        main()
