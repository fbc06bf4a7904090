"""Swarm training: DORPO rows/s with 1 and 2 trainer peers, and bytes sent per trained row by mode.

Prints ONE JSON object to stdout; progress lines go to stderr (none with ``--json-only``).

What is measured, and why:

- **scaling**: the point of training together is that two peers train about twice as many rows per
  second as one. Real trainer workers (``python -m garden.collab.worker``, ``--max-threads 1``
  each, on one machine) train the same student on the same rows in ``sync`` mode; the rate is counted
  from the workers' status files over a window that starts once every peer has passed its first epoch
  (start-up, model load and the first matchmaking left out) and lasts ``--window`` seconds. The two peers
  hold the parameter round every ``--average-state-every`` epochs (the mission's ``average_state_every``, 4
  here), and once more every epoch (``speedup_2_over_1_state_every_epoch``: missions that do not set it).
  Target: ``speedup_2_over_1`` >= 1.8. ``cpu_s_per_row`` splits each run's CPU into the workers' training
  and their children's (averagers, DHT, ``p2pd``); ``cpu_bound_2_over_1`` is what two peers could reach on
  this machine's cores were no one ever waiting: the cores over the CPU a row costs with two peers.
- **bytes per row**: what averaging costs the network, from each worker's ``bytes_sent`` (every
  averaging message its averagers sent: parts to reducers, averaged parts back, state to late joiners),
  summed over both peers and divided by the rows both trained over whole epochs (8 for the two sync
  configurations, whose epochs are one step long; 1 for local), in three configurations:
  ``naive`` (``sync``, fp32, gradients averaged after every step: ``target_batch_size`` = one step of
  each peer, plain data-parallel training), ``sync_8bit`` (the same with 8-bit compression) and
  ``local_8bit`` (``local`` mode, 8-bit, parameters averaged every ``--local-steps`` steps of each peer:
  DiLoCo-style). Target: ``local_8bit`` <= 1/500 of ``naive``, per row of each round's target (``naive`` is plain
  data-parallel training, a round per step of each peer: hivemind's epochs of 4 rows carry up to 8 when the
  steps are quicker than the progress reports, so ``local_8bit_over_naive_per_trained_row`` is printed too).

The rows are shaken once from the built-in teacher (``--prompts`` demo prompts); the student is
``--student`` (default: the built-in model pruned to 4 layers), its embeddings and output head frozen as
``garden train`` and missions with ``freeze_embeddings`` keep them (``--train-embeddings``: trained and
averaged too). Everything runs on 127.0.0.1, bootstrapped from one garden daemon. ``machine.load_average_1m``
(before, after) shows whether other work shared the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from harness.daemons import DaemonFactory  # noqa: E402
from harness.machine import MachineReport  # noqa: E402
from harness.processes import cpu_seconds, process_tree  # noqa: E402
from harness.trainers import MISSION, WorkerFactory  # noqa: E402

TARGET_SPEEDUP = 1.8
TARGET_BYTES_RATIO = 1 / 500
quiet = False


def log(message: str) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def shake_rows(path: Path, prompts: int) -> int:
    from garden.data import demo_prompts
    from garden.models.loading import load_model
    from garden.store import Store
    from garden.distill.judges import ReferenceJudge
    from garden.distill.shaker import ShakeConfig, shake

    teacher = load_model("builtin:smollm2-135m")
    rows = shake(teacher, demo_prompts()[:prompts], ReferenceJudge(), ShakeConfig(candidates=2, max_new_tokens=16)).rows
    store = Store(path)
    try:
        store.add_rows(rows, mission_id=MISSION)
    finally:
        store.close()
    return len(rows)


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a worker's own process (its training, in one torch thread) and of its children
    (hivemind's averagers, its DHT, ``p2pd``: what averaging costs the machine)."""
    worker, *children = process_tree(pid)
    return cpu_seconds([worker]), cpu_seconds(children)


def run_configuration(
    name: str, peers: int, base: Path, student: str, store: Path, bootstrap: list[str], window: float | None = None,
    epochs: int | None = None, **collab: Any,
) -> dict[str, Any]:
    """Start ``peers`` workers, wait until all passed epoch 1, then count rows and bytes over ``window``
    seconds, or over ``epochs`` whole epochs (from the start of epoch 1 on every peer to the start of epoch
    1 + ``epochs`` on every peer: each averaging round inside it counted once)."""
    from garden.models.student import parse_student_ref

    spec = parse_student_ref(student)
    factory = WorkerFactory(base / name, spec.base, store, keep_layers=spec.keep_layers)
    settings = {"max_epochs": 1_000_000, "matchmaking_time": 2.0, "averaging_timeout": 30.0} | collab
    try:
        # no checkpoints inside the window: writing one is not training
        workers = [factory.start(bootstrap, worker={"checkpoint_every": 1_000_000}, **settings) for _ in range(peers)]
        deadline = time.monotonic() + 600
        while min(w.status().get("epoch", 0) for w in workers) < 1:
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in workers):
                raise RuntimeError(f"{name}: workers did not pass epoch 1:\n" + workers[0].log()[-3000:])
            time.sleep(1.0)
        start = [w.status() for w in workers]
        cpu_start = [cpu_split(w.proc.pid) for w in workers]
        t0 = time.monotonic()
        if epochs is not None:
            goal = 1 + epochs
            while min(w.status().get("epoch", 0) for w in workers) < goal:
                if time.monotonic() > deadline or any(w.proc.poll() is not None for w in workers):
                    raise RuntimeError(f"{name}: workers did not reach epoch {goal}")
                time.sleep(0.5)
        else:
            time.sleep(window or 60.0)
        end = [w.status() for w in workers]
        elapsed = time.monotonic() - t0
        cpu_end = [cpu_split(w.proc.pid) for w in workers]
    finally:
        orphans = factory.close()
    rows = sum(e["samples"] - s["samples"] for s, e in zip(start, end, strict=True))
    sent = sum(e["bytes_sent"] - s["bytes_sent"] for s, e in zip(start, end, strict=True))
    epochs = min(e["epoch"] - s["epoch"] for s, e in zip(start, end, strict=True))
    training, others = (sum(e[i] - s[i] for s, e in zip(cpu_start, cpu_end, strict=True)) for i in (0, 1))
    result = {
        "name": name, "peers": peers, "settings": collab, "window_s": round(elapsed, 1), "rows": rows,
        "rows_per_s": round(rows / elapsed, 3), "epochs_in_window": epochs, "bytes_sent": sent,
        "bytes_per_row": round(sent / rows, 1) if rows else None,
        # what a round costs each row it is meant for: an epoch of sync or local training is target_batch_size rows,
        # but peers whose steps are quicker than their progress reports travel overshoot it (each takes a second
        # step before it sees the other's first), so a round can carry more rows than its target
        "rows_per_epoch": round(rows / epochs, 1) if epochs else None,
        "bytes_per_target_row": round(sent / (epochs * collab["target_batch_size"]), 1) if epochs else None,
        "cpu_s_per_row": {"training": round(training / rows, 4), "averaging": round(others / rows, 4)}
        if rows else None,
        "orphans": orphans,
    }  # fmt: skip
    log(f"{name}: {json.dumps(result)}")
    return result


def scaling(args: argparse.Namespace, tmp: Path, bootstrap: list[str], common: dict[str, Any]) -> dict[str, Any]:
    """One peer alone, then two with the parameter round every ``--average-state-every`` epochs (the figure) and
    two with it every epoch (hivemind's default, as missions that do not set it train). One peer never
    averages, so one run of it serves both."""
    def run(name: str, peers: int, state_every: int) -> dict[str, Any]:
        return run_configuration(
            name, peers, tmp, args.student, tmp / "garden.sqlite3", bootstrap, args.window,
            target_batch_size=args.target_batch_size, average_state_every=state_every, **common,
        )  # fmt: skip

    runs = [run("scaling_1", 1, args.average_state_every), run("scaling_2", 2, args.average_state_every)]
    if args.average_state_every != 1:
        runs.append(run("scaling_2_state_every_epoch", 2, 1))
    one = runs[0]["rows_per_s"]
    report: dict[str, Any] = {
        "scaling": runs, "speedup_2_over_1": round(runs[1]["rows_per_s"] / one, 3) if one else None,
        "target_speedup": TARGET_SPEEDUP,
    }  # fmt: skip
    if len(runs) > 2:
        report["speedup_2_over_1_state_every_epoch"] = round(runs[2]["rows_per_s"] / one, 3) if one else None
    # the most two peers on this machine's cores could reach, were their rounds free of waiting: the cores' seconds
    # over the CPU seconds a row costs with two peers (training, and the averaging that shares those cores)
    two = runs[1]["cpu_s_per_row"]
    if one and two and runs[0]["cpu_s_per_row"]:
        cores = min(2, os.cpu_count() or 1)
        report["cpu_bound_2_over_1"] = round(cores / (two["training"] + two["averaging"]) / one, 3)
    return report


def main() -> int:
    global quiet
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="prune:builtin:smollm2-135m:layers=4")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--target-batch-size", type=int, default=32, help="for the scaling runs")
    parser.add_argument("--average-state-every", type=int, default=4,
                        help="the scaling runs: sync mode's parameter round at every this many epochs")
    parser.add_argument("--local-steps", type=int, default=64, help="local mode: steps per peer between averagings")
    parser.add_argument("--window", type=float, default=60.0, help="seconds counted per configuration")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train and average the student's embeddings too (missions without freeze_embeddings)")
    parser.add_argument("--skip-bytes", action="store_true", help="only the scaling runs")
    parser.add_argument("--skip-scaling", action="store_true", help="only the bytes runs")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    quiet = args.json_only
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    report: dict[str, Any] = {
        "student": args.student, "batch_size": args.batch_size, "window_s": args.window,
        "freeze_embeddings": not args.train_embeddings,
    }  # fmt: skip
    machine = MachineReport().start()
    with tempfile.TemporaryDirectory(prefix="garden-collab-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        log(f"shaking {args.prompts} prompts for rows")
        report["rows_held"] = shake_rows(tmp / "garden.sqlite3", args.prompts)
        (tmp / "daemons").mkdir()
        daemons = DaemonFactory(tmp / "daemons")
        try:
            bootstrap = [daemons.start("--roles", "trainer").join_addr]
            common = {"batch_size": args.batch_size, "lr": 1e-4, "freeze_embeddings": not args.train_embeddings}
            if not args.skip_scaling:
                report |= scaling(args, tmp, bootstrap, common)
            if not args.skip_bytes:
                step = 2 * args.batch_size  # one step of each of the two peers
                configs = {
                    "naive": {"mode": "sync", "compression": "none", "target_batch_size": step},
                    "sync_8bit": {"mode": "sync", "compression": "8bit", "target_batch_size": step},
                    "local_8bit": {"mode": "local", "compression": "8bit",
                                   "target_batch_size": step * args.local_steps},
                }  # fmt: skip
                rounds = {"naive": 8, "sync_8bit": 8, "local_8bit": 1}
                bytes_runs = {
                    name: run_configuration(
                        name, 2, tmp, args.student, tmp / "garden.sqlite3", bootstrap, epochs=rounds[name],
                        **common, **cfg,
                    )
                    for name, cfg in configs.items()
                }
                report["bytes"] = bytes_runs
                naive, local = (bytes_runs[name]["bytes_per_target_row"] for name in ("naive", "local_8bit"))
                report["local_8bit_over_naive"] = round(local / naive, 6) if naive and local is not None else None
                naive, local = (bytes_runs[name]["bytes_per_row"] for name in ("naive", "local_8bit"))
                report["local_8bit_over_naive_per_trained_row"] = (
                    round(local / naive, 6) if naive and local is not None else None
                )
                report["target_bytes_ratio"] = TARGET_BYTES_RATIO
        finally:
            orphans = daemons.close()
            report["daemon_orphans"] = orphans
    report["machine"] = machine.finish()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
