"""Swarm shaking throughput: rows/s of one mission shaken by 1 peer and by 2 peers on one machine.

Run: ``.venv/bin/python benchmarks/swarm_shaking.py [--prompts 48] [--peers 1,2] [--max-threads 1]``.
Prints ONE JSON object to stdout; progress lines go to stderr (none with ``--json-only``).

What is measured, and why: the point of a swarm is that a mission finishes faster with more peers, so
the same mission (the first ``--prompts`` built-in demo prompts with their references, the reference
judge, the built-in teacher ``builtin:smollm2-135m``) is shaken by K fresh ``garden run`` daemons on
127.0.0.1 (own data dirs, ``--max-threads`` torch threads each, ``--announce-period 5``,
``--lease-seconds 60``), for each K in ``--peers``. With one thread per peer and at least as many cores
as peers, 2 peers should shake nearly twice as many rows per second as one: the target is
``speedup_2_over_1`` >= 1.8. Everything is observed from outside, through the HTTP port, as a user would.

Per configuration:

- ``seconds_total``: from just before ``POST /missions`` on peer 1 until ``GET /missions`` says every shard
  is done (the mission's state is ``training`` or later; polled every second): includes the other peers'
  discovery of the mission and its prompts.
- ``seconds_shaking``: from the first poll that sees a shard leased or done until then;
  ``rows_per_s`` = rows / ``seconds_shaking``. ``rows_per_s_steady`` counts only the window in which
  every peer is working (from the first poll with K shards leased at once to the first with no shard left
  open), leaving out each peer's start (finding the mission, fetching its prompts, loading the teacher)
  and the tail (the last shards, when some peers have nothing left to take): the rate a long mission
  runs at. ``speedup_2_over_1_steady`` compares those. Each peer loads the teacher from the conversion
  cache before its first claim (``warmup.model_load_s`` is about what that costs; the GGUF conversion
  itself is done once before any timing, by the warm-up).
- ``bytes_sent`` / ``bytes_received``: ``garden_transfer_bytes_total`` summed over all the daemons
  (prompts and row sets moved between peers); ``bytes_per_row`` = ``bytes_sent`` / rows.
- ``replicated``: for K >= 2, whether every shard's row set is held by at least 2 peers at the end, read
  from each peer's store once it has stopped (a row set with the same sha256 in two stores);
  ``row_sets_announced`` is what each peer announces holding, from ``GET /missions/{id}``.
  ``shards_with_one_copy_or_none`` lists the shards that fall short.
- ``per_peer``: each daemon's own account (shards and rows it shook, seconds it spent shaking, and the rows of
  others' row sets it had checked against the teacher by then: a peer checks the row sets it holds of others
  between its own shards, so a check that ran during the run slowed it).
- ``stop_problems``: daemons that did not exit 0 within 15 s of SIGTERM (then their process group is
  killed) or left processes behind. Every daemon is stopped on any error, Ctrl+C or SIGTERM too; on a
  failure the tail of each daemon's log is printed, and ``--log-dir`` keeps all their logs.

``recovery`` (skip with ``--no-recovery``): two peers at the daemon's defaults for leases and announces (no
``--lease-seconds``, no ``--announce-period``), the same mission; once peer 2 holds a lease it is killed
(``kill -9``, its p2pd too), and ``seconds_to_lease_again`` is the time until peer 1 leased
each of its shards (or holds their row sets): the target is <= 60 s (``recovery_target_met``). Before leases
were short and a departed peer's lease void, it was the lease's length, 300 s.

``machine.load_average_1m`` (before, after) shows whether other work shared the CPU: the numbers mean
little on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from garden.daemon.datadir import DataDir  # noqa: E402
from garden.data import demo_prompts  # noqa: E402
from garden.models.loading import CACHE_ENV, cache_dir  # noqa: E402
from harness.daemons import Daemon, DaemonFactory  # noqa: E402
from harness.machine import MachineReport  # noqa: E402

TEACHER = "builtin:smollm2-135m"
TARGET_SPEEDUP = 1.8
TARGET_RECOVERY_S = 60.0
SHAKEN = ("training", "trained", "published")
"""A mission's states in ``GET /missions`` once every shard is done (its life goes on to training)."""
POLL = 1.0
STOP_TIMEOUT = 15.0
REPLICATION_WAIT = 15.0
TRANSFER = re.compile(r'^garden_transfer_bytes_total\{way="(sent|received)"\}\s+(\S+)', re.MULTILINE)

quiet = False


def log(message: str) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def warm_up(env: dict[str, str]) -> dict[str, Any]:
    """Convert (once, into the cache the daemons use) and load the teacher in a fresh interpreter."""
    code = (
        "import json, time\n"
        "from garden.models.loading import load_model\n"
        "started = time.perf_counter()\n"
        f"load_model({TEACHER!r})\n"
        "print(json.dumps({'model_load_s': round(time.perf_counter() - started, 2)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"warm-up failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def mission_body(prompts: int, shard_size: int, candidates: int, max_new_tokens: int) -> dict[str, Any]:
    rows = demo_prompts("train")
    if prompts > len(rows):
        rows = demo_prompts("all")
    if not 1 <= prompts <= len(rows):
        raise SystemExit(f"--prompts must be between 1 and {len(rows)}")
    spec = {
        "name": "bench",
        "teachers": [TEACHER],
        "prompts": "bench.jsonl",
        "shard_size": shard_size,
        "student": {"base": TEACHER},
        "sampling": {"candidates": candidates, "max_new_tokens": max_new_tokens},
    }
    return {"spec": spec, "prompts": [{"prompt": r.prompt, "reference": r.reference} for r in rows[:prompts]]}


def wait_for(what: str, predicate: Any, timeout: float, daemons: list[Daemon], interval: float = POLL) -> Any:
    """Poll ``predicate`` until truthy; fail with the daemons' log tails after ``timeout`` or if one exits."""
    deadline = time.monotonic() + timeout
    while True:
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"a daemon exited with {daemon.proc.returncode} while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {timeout:.0f} s")
        time.sleep(interval)


def transfer_bytes(daemon: Daemon) -> dict[str, float]:
    response = daemon.get("/metrics")
    response.raise_for_status()
    found = {way: float(value) for way, value in TRANSFER.findall(response.text)}
    return {"sent": found.get("sent", 0.0), "received": found.get("received", 0.0)}


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl+C and SIGTERM wait until the block is over (a second Ctrl+C must not cut a cleanup short)."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_all(daemons: list[Daemon]) -> list[str]:
    """SIGTERM every daemon, wait, then SIGKILL the process group (and recorded descendants) of any
    that did not stop. Returns a line per daemon that needed killing or left processes behind."""
    with uninterrupted():
        return _stop_all(daemons)


def _stop_all(daemons: list[Daemon]) -> list[str]:
    problems = []
    reported = {d.data_dir.name for d in daemons if d.proc.returncode is not None}  # stopped before
    for daemon in daemons:
        with contextlib.suppress(ProcessLookupError):
            daemon.send(signal.SIGTERM)  # also records its descendants, by PID and create time
    deadline = time.monotonic() + STOP_TIMEOUT
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            problems.append(f"{daemon.data_dir.name}: no exit {STOP_TIMEOUT:.0f} s after SIGTERM; killed")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.proc.wait(timeout=10)
    for daemon in daemons:
        code = daemon.proc.returncode
        if code not in (0, None) and daemon.data_dir.name not in reported:
            reported.add(daemon.data_dir.name)
            problems.append(f"{daemon.data_dir.name}: exited with {code} after SIGTERM")
        for proc in daemon.wait_children_gone(timeout=5.0):
            with contextlib.suppress(psutil.Error):
                problems.append(f"{daemon.data_dir.name}: orphan {proc.pid} {' '.join(proc.cmdline())[:100]}")
                proc.kill()
    return problems


def stored_row_sets(daemon: Daemon, mission_id: str) -> list[tuple[int, str]]:
    """(shard, sha256) of the row sets a stopped daemon's store holds for the mission."""
    path = DataDir(daemon.data_dir).store
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = db.execute("SELECT shard, sha256 FROM row_sets WHERE mission_id = ?", (mission_id,)).fetchall()
    finally:
        db.close()
    return [(int(shard), str(sha)) for shard, sha in found]


def replication(daemons: list[Daemon], mission_id: str, shards: int) -> dict[str, Any]:
    """Per shard, the most peers holding one same row set (by sha256): every shard should have >= 2."""
    holders: dict[tuple[int, str], int] = defaultdict(int)
    for daemon in daemons:
        for key in set(stored_row_sets(daemon, mission_id)):
            holders[key] += 1
    copies = {shard: 0 for shard in range(shards)}
    for (shard, _), count in holders.items():
        copies[shard] = max(copies.get(shard, 0), count)
    under = sorted(shard for shard, count in copies.items() if count < 2)
    return {"replicated": not under, "shards_with_one_copy_or_none": under}


def run_configuration(
    k: int,
    body: dict[str, Any],
    base: Path,
    env: dict[str, str],
    max_threads: int,
    timeout: float,
    announce_period: float,
) -> dict[str, Any]:
    factory = DaemonFactory(base)
    base.mkdir(parents=True)
    # shakers only: a trainer worker would start on the first rows and compete for the CPU being measured
    args = ["--max-threads", str(max_threads), "--lease-seconds", "60", "--roles", "shaker"]
    result: dict[str, Any] = {"peers": k}
    stop_problems: list[str] = []
    try:
        first = factory.start(*args, env=env, announce_period=announce_period)
        for _ in range(k - 1):
            factory.start(*args, "--join", first.join_addr, env=env, wait=False, announce_period=announce_period)
        daemons = factory.daemons
        for daemon in daemons[1:]:
            factory.wait_ready(daemon)
        for daemon in daemons:
            wait_for(f"{k} peers seen", lambda d=daemon: len(d.get("/peers").json()) == k, 120, daemons)
        log(f"{k} peer(s) up and seeing each other; creating the mission")

        started = time.monotonic()
        response = first.request("POST", "/missions", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /missions: {response.status_code} {response.text[:2000]}")
        mission_id = response.json()["id"]
        first_leased: float | None = None
        steady_start: tuple[float, int] | None = None  # (time, shards done) when k shards were first leased
        steady_end: tuple[float, int] | None = None  # ... when no shard was left open
        last_log = 0.0
        while True:
            if any(d.proc.poll() is not None for d in daemons):
                raise RuntimeError("a daemon exited during the mission")
            try:
                # the list, not the detail: it reads the shards only, so polling costs the peers little
                view = next(m for m in first.get("/missions").json() if m["id"] == mission_id)
            except (httpx.HTTPError, StopIteration):
                view = None
            now = time.monotonic()
            if view is not None:
                shards = view["shards"]
                if first_leased is None and shards["leased"] + shards["done"] > 0:
                    first_leased = now
                if steady_start is None and shards["leased"] >= min(k, shards["total"]):
                    steady_start = (now, shards["done"])
                if steady_start is not None and steady_end is None and shards["open"] == 0:
                    steady_end = (now, shards["done"])
                if view["state"] in SHAKEN:
                    break
                if now - last_log >= 10:
                    last_log = now
                    log(f"  {now - started:5.1f} s: shards {shards['done']}/{shards['total']} done, "
                        f"{shards['leased']} leased, {view['rows']} rows")  # fmt: skip
            if now - started > timeout:
                raise RuntimeError(f"mission not done in {timeout:.0f} s")
            time.sleep(POLL)
        done_at = time.monotonic()
        first_leased = first_leased if first_leased is not None else started
        rows = int(view["rows"])
        seconds_shaking = done_at - first_leased
        total_shards = int(view["shards"]["total"])
        log(f"{k} peer(s): {rows} rows in {done_at - started:.1f} s ({seconds_shaking:.1f} s shaking)")

        # row sets are offered and pulled before a shard is marked done; give the announcements time to
        # show them (they are re-announced periodically), without counting it in the timings
        def announced() -> dict[str, int]:
            detail = first.get(f"/missions/{mission_id}").json()
            return {p["peer_id"]: int(p["row_sets"]) for p in detail["peers"]}

        if k >= 2:
            with contextlib.suppress(RuntimeError):
                wait_for(
                    "row sets announced by every peer",
                    lambda: sum(n >= total_shards for n in announced().values()) >= min(k, 2),
                    REPLICATION_WAIT, daemons,
                )  # fmt: skip
        row_sets_announced = announced()
        per_peer = []
        sent = received = 0.0
        for index, daemon in enumerate(daemons, start=1):
            moved = transfer_bytes(daemon)
            sent, received = sent + moved["sent"], received + moved["received"]
            detail = daemon.get(f"/missions/{mission_id}").json()
            here = detail["this_peer"]
            per_peer.append(
                {"peer": index, "peer_id": daemon.peer_id, "shards_shaken": here["shards_shaken"],
                 "rows_shaken": here["rows_shaken"], "shards_lost": here["shards_lost"],
                 "seconds_shaking": here["seconds_shaking"], "bytes_sent": int(moved["sent"]),
                 "bytes_received": int(moved["received"]),
                 "row_sets_announced": row_sets_announced.get(daemon.peer_id, 0),
                 "rows_checked": detail["verification"]["rows_checked"]}
            )  # fmt: skip
        steady: float | None = None
        if steady_start is not None and steady_end is not None and steady_end[0] > steady_start[0]:
            shards_in_window = steady_end[1] - steady_start[1]
            steady = shards_in_window * rows / total_shards / (steady_end[0] - steady_start[0])
        result.update(
            rows=rows,
            shards=total_shards,
            rows_per_s_steady=round(steady, 3) if steady is not None else None,
            steady_window_s=round(steady_end[0] - steady_start[0], 2) if steady_start and steady_end else None,
            seconds_total=round(done_at - started, 2),
            seconds_shaking=round(seconds_shaking, 2),
            rows_per_s=round(rows / seconds_shaking, 3) if seconds_shaking > 0 else None,
            bytes_sent=int(sent),
            bytes_received=int(received),
            bytes_per_row=round(sent / rows, 1) if rows else None,
        )
        stop_problems = stop_all(factory.daemons)
        if k >= 2:
            result.update(replication(factory.daemons, mission_id, total_shards))
        result["per_peer"] = per_peer
    finally:
        stop_problems += stop_all(factory.daemons)  # a no-op for daemons already stopped
        for problem in stop_problems:
            log(f"stopping: {problem}")
    result["stop_problems"] = stop_problems
    return result


def measure_recovery(body: dict[str, Any], base: Path, env: dict[str, str], max_threads: int) -> dict[str, Any]:
    """Kill peer 2 of two while it holds a lease; seconds until peer 1 leased (or finished) its shards."""
    factory = DaemonFactory(base)
    base.mkdir(parents=True)
    args = ["--max-threads", str(max_threads), "--roles", "shaker"]  # the defaults for leases and announces
    result: dict[str, Any] = {}
    try:
        first = factory.start(*args, env=env, announce_period=None)
        second = factory.start(*args, "--join", first.join_addr, env=env, announce_period=None)
        daemons = factory.daemons
        wait_for("2 peers seen", lambda: all(len(d.get("/peers").json()) == 2 for d in daemons), 120, daemons)
        response = first.request("POST", "/missions", json=body)
        if response.status_code != 201:
            raise RuntimeError(f"POST /missions: {response.status_code} {response.text[:2000]}")
        mission_id = response.json()["id"]

        def peers() -> list[dict[str, Any]]:
            return list(first.get(f"/missions/{mission_id}").json().get("peers", []))

        def held_by_second() -> list[int]:
            return next((p["leased"] for p in peers() if p["peer_id"] == second.peer_id and p["leased"]), [])

        shards = wait_for("peer 2 holding a lease", held_by_second, 300, daemons, interval=0.2)
        second.kill_all()
        killed = time.monotonic()
        log(f"recovery: killed peer 2 holding shards {shards}; waiting for peer 1 to take them")

        def taken() -> bool:
            mine = {s for p in peers() if p["peer_id"] == first.peer_id for s in p["leased"]}
            done = {shard for shard, _ in stored_row_sets(first, mission_id)}
            return all(s in mine or s in done for s in shards)

        wait_for("peer 1 leasing the killed peer's shards", taken, 600, [first], interval=0.5)
        seconds = time.monotonic() - killed
        log(f"recovery: leased again {seconds:.1f} s after the kill")
        result.update(shards=shards, seconds_to_lease_again=round(seconds, 1), target_s=TARGET_RECOVERY_S,
                      recovery_target_met=seconds <= TARGET_RECOVERY_S)  # fmt: skip
    finally:
        for problem in stop_all(factory.daemons):
            log(f"stopping: {problem}")
    return result


def log_tails(base: Path, lines: int = 30) -> None:
    for path in sorted(base.rglob("peer*.err")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"[bench] --- {path.relative_to(base)} (last {len(tail)} lines) ---", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr, flush=True)


def raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    global quiet
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--peers", default="1,2", help="comma-separated peer counts to run, e.g. 1,2")
    parser.add_argument("--max-threads", type=int, default=1, help="torch threads of each daemon")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"model cache (default: {cache_dir()})")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one configuration may take")
    parser.add_argument("--log-dir", type=Path, default=None, help="copy the daemons' stdout/stderr here")
    parser.add_argument(
        "--announce-period", type=float, default=5.0, help="the daemons' --announce-period (also their mission period)"
    )
    parser.add_argument("--no-recovery", action="store_true", help="skip the kill -9 recovery measurement")
    parser.add_argument("--json-only", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    quiet = args.json_only
    try:
        peer_counts = [int(p) for p in args.peers.split(",") if p.strip()]
    except ValueError:
        parser.error("--peers: comma-separated integers, e.g. 1,2")
    if not peer_counts or min(peer_counts) < 1:
        parser.error("--peers: at least one configuration, each of at least 1 peer")

    body = mission_body(args.prompts, args.shard_size, args.candidates, args.max_new_tokens)
    cache = (args.cache_dir or cache_dir()).expanduser().resolve()
    env = {CACHE_ENV: str(cache)}
    # Ctrl+C reaches this process only (the daemons have sessions of their own); SIGTERM too: both end
    # up in the finally blocks that stop the daemons
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)

    report: dict[str, Any] = {
        "prompts": args.prompts,
        "shard_size": args.shard_size,
        "candidates": args.candidates,
        "max_new_tokens": args.max_new_tokens,
        "max_threads": args.max_threads,
        "teacher": TEACHER,
    }
    tmp = Path(tempfile.mkdtemp(prefix="garden-swarm-bench-"))
    ok = False
    try:
        log(f"warming up {TEACHER} (cache {cache})")
        factory_env = DaemonFactory(tmp / "warmup").env(env)
        warmup = warm_up(factory_env)
        log(f"teacher loads in {warmup['model_load_s']} s from the cache")
        machine = MachineReport().start()
        configurations = []
        for k in peer_counts:
            log(f"configuration: {k} peer(s)")
            configurations.append(
                run_configuration(k, body, tmp / f"peers{k}", env, args.max_threads, args.timeout, args.announce_period)
            )
        report["configurations"] = configurations
        rate: dict[int, float | None] = {c["peers"]: c["rows_per_s"] for c in configurations}
        one, two = rate.get(1), rate.get(2)
        speedup = two / one if one and two else None
        report["speedup_2_over_1"] = round(speedup, 3) if speedup is not None else None
        steady_rate = {c["peers"]: c["rows_per_s_steady"] for c in configurations}
        s1, s2 = steady_rate.get(1), steady_rate.get(2)
        report["speedup_2_over_1_steady"] = round(s2 / s1, 3) if s1 and s2 else None
        report["target_speedup"] = TARGET_SPEEDUP
        report["target_met"] = speedup is not None and speedup >= TARGET_SPEEDUP
        if not args.no_recovery:
            log("recovery: 2 peers at the default lease and announce periods, peer 2 killed mid-shard")
            report["recovery"] = measure_recovery(body, tmp / "recovery", env, args.max_threads)
        report["warmup"] = {"model_load_s": warmup["model_load_s"]}
        report["machine"] = machine.finish(daemon_torch_threads=args.max_threads)
        ok = True
    except KeyboardInterrupt:
        log("interrupted: the daemons were stopped")
        return 130
    finally:
        if not ok:
            log_tails(tmp)
        if args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            for path in tmp.rglob("peer*.*"):
                if path.is_file():
                    shutil.copy(path, args.log_dir / f"{path.parent.name}-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
