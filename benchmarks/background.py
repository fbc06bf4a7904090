"""How the owner's own work fares beside a shaking peer: ``--max-cpu 50`` alone, and with ``--when idle``.

Prints ONE JSON object to stdout; progress lines go to stderr (none with ``--json-only``).

The owner's work is a CPU-bound stand-in: one process per core hashing in a loop, for ``--seconds``; its
throughput is hashes per second, summed. It runs three times in one run of this script:

- **alone**, no peer running: the reference;
- **beside a capped peer** (``--max-cpu 50``) shaking a real mission with the built-in teacher:
  ``owner_ratio_cap`` = its throughput then / alone (target >= 0.45);
- **beside an idle-only peer** (``--max-cpu 50 --when idle``): the peer holds its work within ~1 s of
  the owner's start and resumes after ``--idle-quiet`` seconds of quiet: ``owner_ratio_idle`` (target >= 0.9).

The peer's own throughput (rows shaken per second, from ``GET /missions/{id}``) is measured alone (no
owner, cap only) and during each run, and its tree's CPU share (psutil) beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from harness.daemons import Daemon, DaemonFactory, wait_until  # noqa: E402
from harness.machine import MachineReport  # noqa: E402
from harness.processes import cpu_seconds, process_tree  # noqa: E402

TEACHER = "builtin:smollm2-135m"
TARGET_CAP, TARGET_IDLE = 0.45, 0.9
quiet = False


def log(message: str) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _hash_for(seconds: float, out: Any) -> None:
    block, count, end = b"x" * 4096, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            block = hashlib.sha256(block).digest() * 128
        count += 100
    out.put(count)


def owner_work(seconds: float) -> float:
    """Hashes per second of one process per core over ``seconds``."""
    queue: Any = multiprocessing.get_context("spawn").Queue()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_hash_for, args=(seconds, queue))
        for _ in range(os.cpu_count() or 1)
    ]
    for proc in procs:
        proc.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def rows(daemon: Daemon, mission_id: str) -> int:
    return int(daemon.get(f"/missions/{mission_id}").json()["this_peer"]["rows_shaken"])


def tree_seconds(daemon: Daemon) -> float:
    return cpu_seconds(process_tree(daemon.proc.pid))


def mission_body(prompts: int) -> dict[str, Any]:
    from garden.data import demo_prompts

    return {
        "spec": {
            "name": "background-bench", "teachers": [TEACHER], "prompts": "prompts.jsonl", "shard_size": 2,
            "student": {"base": TEACHER, "keep_layers": 10},
            "sampling": {"candidates": 2, "max_new_tokens": 16, "top_k_logprobs": 4},
        },
        "prompts": [{"prompt": r.prompt, "reference": r.reference} for r in demo_prompts()[:prompts]],
    }  # fmt: skip


def beside(peer: Daemon, mission_id: str, seconds: float) -> dict[str, Any]:
    """The owner's work with ``peer`` running; the peer's rows and CPU over the same window."""
    rows_before, cpu_before, started = rows(peer, mission_id), tree_seconds(peer), time.monotonic()
    owner = owner_work(seconds)
    elapsed = time.monotonic() - started
    return {
        "owner_hashes_per_s": round(owner, 1),
        "peer_rows_per_s": round((rows(peer, mission_id) - rows_before) / elapsed, 3),
        "peer_cpu_share": round((tree_seconds(peer) - cpu_before) / elapsed / (os.cpu_count() or 1), 3),
    }


def peer_alone(peer: Daemon, mission_id: str, seconds: float) -> dict[str, Any]:
    rows_before, cpu_before, started = rows(peer, mission_id), tree_seconds(peer), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {
        "peer_rows_per_s": round((rows(peer, mission_id) - rows_before) / elapsed, 3),
        "peer_cpu_share": round((tree_seconds(peer) - cpu_before) / elapsed / (os.cpu_count() or 1), 3),
    }


def run_peer(factory: DaemonFactory, env: dict[str, str], prompts: int, *flags: str) -> tuple[Daemon, str]:
    peer = factory.start("--roles", "shaker", *flags, env=env)
    mission_id = peer.request("POST", "/missions", json=mission_body(prompts)).json()["id"]
    wait_until(lambda: rows(peer, mission_id) > 0, 300, 1.0, "the peer shook its first shard")
    return peer, mission_id


def main() -> int:
    global quiet
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measured window")
    parser.add_argument("--prompts", type=int, default=192, help="mission size (enough to stay busy)")
    parser.add_argument("--max-cpu", type=float, default=50.0)
    parser.add_argument("--idle-quiet", type=float, default=5.0, help="the idle-only peer's quiet period")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    quiet = args.json_only
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    report: dict[str, Any] = {"seconds": args.seconds, "max_cpu": args.max_cpu}
    machine = MachineReport().start()
    log("the owner's work alone")
    alone = owner_work(args.seconds)
    report["owner_alone_hashes_per_s"] = round(alone, 1)
    env = {"HF_HUB_OFFLINE": "1", **({"GARDEN_CACHE_DIR": os.environ["GARDEN_CACHE_DIR"]}
                                     if "GARDEN_CACHE_DIR" in os.environ else {})}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="garden-background-bench-") as tmp:
        factory = DaemonFactory(Path(tmp))
        try:
            cap = ("--max-cpu", str(args.max_cpu))
            log(f"a peer with --max-cpu {args.max_cpu:g}")
            peer, mission_id = run_peer(factory, env, args.prompts, *cap)
            report["peer_alone"] = peer_alone(peer, mission_id, args.seconds)
            log(f"peer alone: {report['peer_alone']}")
            report["cap"] = beside(peer, mission_id, args.seconds)
            log(f"beside the capped peer: {report['cap']}")
            assert peer.stop() == 0
            log(f"a peer with --max-cpu {args.max_cpu:g} --when idle (quiet {args.idle_quiet:g} s)")
            idle, idle_mission = run_peer(
                factory, env, args.prompts, *cap, "--when", "idle", "--idle-quiet", str(args.idle_quiet)
            )
            report["idle"] = beside(idle, idle_mission, args.seconds)
            log(f"beside the idle-only peer: {report['idle']}")
            resumed_at = time.monotonic()
            before = rows(idle, idle_mission)
            wait_until(lambda: rows(idle, idle_mission) > before, 120, 0.5, "the idle-only peer resumed")
            report["idle"]["resumed_rows_after_s"] = round(time.monotonic() - resumed_at, 1)
        finally:
            report["orphans"] = factory.close()
    report["owner_ratio_cap"] = round(report["cap"]["owner_hashes_per_s"] / alone, 3)
    report["owner_ratio_idle"] = round(report["idle"]["owner_hashes_per_s"] / alone, 3)
    report["targets"] = {"owner_ratio_cap": TARGET_CAP, "owner_ratio_idle": TARGET_IDLE}
    report["machine"] = machine.finish()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
