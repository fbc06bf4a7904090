"""Real trainer worker processes (``python -m garden.collab.worker``) for tests, bootstrapped from a
real daemon on 127.0.0.1, with a tiny random Llama student (built from a config, the built-in tokenizer)
and real DORPO rows shaken from the built-in teacher.

Every worker a test starts is stopped at teardown, with its descendants (its DHT process, ``p2pd``,
hivemind's averagers) recorded by PID and killed if they outlive it.

:func:`average_round` runs one round of hivemind's all-reduce between peers of one process, without matchmaking
(tests and ``benchmarks/robust_averaging.py`` measure what the reducers compute).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.daemons import TrackedProcess

MISSION = "c011ab" + "0" * 57 + "6"
"""The mission of the rows in :func:`make_rows_store`: of the first 8 demo prompts it holds out the 4th
(:func:`garden.protocol.rows.held_out`), which a worker never trains on."""


def make_tiny_student(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama with the built-in model's tokenizer (so the teacher's top-k applies), saved to ``path``.
    Its weights are mostly the embedding: ~6 MB at the default ``hidden_size``, 100 MB at 512."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from garden.models.loading import load_model

    tokenizer = load_model("builtin:smollm2-135m").tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_rows_store(path: Path, prompts: int = 8) -> Path:
    """A garden store holding real rows of ``MISSION``, shaken from the built-in teacher."""
    from garden.data import demo_prompts
    from garden.models.loading import load_model
    from garden.store import Store
    from garden.distill.judges import ReferenceJudge
    from garden.distill.shaker import ShakeConfig, shake

    teacher = load_model("builtin:smollm2-135m")
    config = ShakeConfig(candidates=2, max_new_tokens=8, seed=1)
    rows = shake(teacher, demo_prompts()[:prompts], ReferenceJudge(), config).rows
    store = Store(path)
    try:
        store.add_rows(rows, mission_id=MISSION)
    finally:
        store.close()
    return path


@dataclass
class Worker(TrackedProcess):
    name: str
    proc: subprocess.Popen
    dir: Path
    descendants: dict[int, float] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        self.record_descendants()  # its DHT process and averagers start in its first seconds
        try:
            return dict(json.loads((self.dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        return (self.dir / "worker.log").read_text(errors="replace")

    def kill(self) -> None:
        """``kill -9`` the worker alone: its children must notice and go by themselves."""
        self.record_descendants()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def probe(self) -> Any:
        """The worker's parameter probe at its last epoch change, as a tensor (see ``params_probe``)."""
        import torch

        return torch.tensor(self.status()["params_probe"], dtype=torch.float64)

    def probes(self) -> dict[int, Any]:
        """The worker's probe at each of its last epochs (epoch -> tensor)."""
        import torch

        recorded = self.status().get("probes", {})
        return {int(e): torch.tensor(p, dtype=torch.float64) for e, p in recorded.items()}

    def checkpoint_params(self) -> Any:
        """The tensors of the last checkpoint this worker wrote (name -> tensor), or None."""
        from safetensors.torch import load_file

        last = self.status().get("last_checkpoint")
        return None if not last else load_file(str(Path(last["path"]) / "model" / "model.safetensors"))


class WorkerFactory:
    """:param student: the student's base (a directory, or any model reference), pruned to ``keep_layers``"""

    def __init__(self, base_dir: Path, student: Path | str, store: Path, keep_layers: int | None = None):
        self.base_dir, self.student, self.store, self.keep_layers = base_dir, student, store, keep_layers
        self.workers: list[Worker] = []

    def start(
        self, initial_peers: list[str], executable: list[str] | None = None, worker: dict[str, Any] | None = None,
        **collab: Any,
    ) -> Worker:
        """A worker with ``collab`` settings (``CollabConfig``) and ``worker`` ones (``WorkerConfig``)."""
        name = f"worker{len(self.workers) + 1}"
        wdir = self.base_dir / name
        wdir.mkdir(parents=True)
        shutil.copy(self.store, wdir / "garden.sqlite3")  # each peer has a store of its own
        settings = {
            "target_batch_size": 256, "max_epochs": 4, "batch_size": 2, "lr": 1e-2,
            "matchmaking_time": 2.0, "averaging_timeout": 10.0, "load_state_timeout": 30.0,
        } | collab  # fmt: skip
        config = {
            "mission_id": MISSION,
            "student": {"base": str(self.student), "keep_layers": self.keep_layers},
            "collab": settings,
            "initial_peers": initial_peers,
            "store_path": str(wdir / "garden.sqlite3"),
            "status_path": str(wdir / "status.json"),
            "out_dir": str(wdir / "out"),
            "max_threads": 1,
            "row_poll_s": 2.0,
            "linger_s": 8.0,
        } | (worker or {})
        (wdir / "config.json").write_text(json.dumps(config))
        argv = executable or [sys.executable, "-m", "garden.collab.worker"]
        with open(wdir / "worker.log", "wb") as log:
            proc = subprocess.Popen(
                [*argv, str(wdir / "config.json")], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        started = Worker(name=name, proc=proc, dir=wdir)
        self.workers.append(started)
        return started

    def close(self) -> list[str]:
        """Stop every worker (SIGTERM, then SIGKILL); return the descendants that outlived them."""
        for worker in self.workers:
            worker.record_descendants()
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=10)
        orphans = []
        deadline = time.time() + 10
        for worker in self.workers:
            while worker.alive_descendants() and time.time() < deadline:
                time.sleep(0.2)
            for proc in worker.alive_descendants():
                orphans.append(f"{worker.name}: {proc.pid} {' '.join(proc.cmdline())[:100]}")
                proc.kill()
        return orphans


def _note_troubles(runner: Any, peers: list[Any], notes: list[str]) -> None:
    """Wrap ``runner``'s (one instance's) exchange with each reducer and its ban of a sender, to write in ``notes``
    which peer failed it or was banned by it, and why (the stack's last frame for a ban: which path of hivemind's)."""
    import traceback

    communicate, ban = runner._communicate_with_peer, runner._ban_sender

    async def communicate_noted(peer_id: Any) -> Any:
        try:
            return await communicate(peer_id)
        except BaseException as e:
            notes.append(f"reducer {peers.index(peer_id)} failed it: {e!r}")
            raise

    async def ban_noted(peer_id: Any) -> Any:
        if peer_id not in runner.banned_senders:
            caller = traceback.extract_stack(limit=2)[0]
            notes.append(f"banned sender {peers.index(peer_id)} (from {caller.name}:{caller.lineno})")
        return await ban(peer_id)

    runner._communicate_with_peer, runner._ban_sender = communicate_noted, ban_noted


async def average_round(
    p2ps: list[Any],
    tensors: list[list[Any]],
    weights: list[float],
    reducers: list[bool] | None = None,
    part_size_bytes: int = 2**19,
    timeout: float = 10.0,
    lying_reducers: tuple[int, ...] = (),
    kept_own: list[int] | None = None,
    troubles: list[list[str]] | None = None,
    shares: list[int] | None = None,
) -> list[list[Any] | BaseException]:
    """One all-reduce round of hivemind's ``AllReduceRunner`` (what a ``DecentralizedAverager`` runs once its group
    is formed) between ``p2ps`` (``hivemind.p2p.P2P`` instances of this process): peer ``i`` sends ``tensors[i]``
    (copies) with weight ``weights[i]``, and reduces an equal share of the parts unless ``reducers[i]`` is False
    (a client-mode sender). Returns, for each peer, its tensors after the round, or the exception its round raised
    (a sender refused by the others). A peer waits ``timeout`` seconds at most for a sender's or a reducer's next
    part (as an averager's ``next_chunk_timeout``). garden's patches apply if installed in this process. The
    peers in ``lying_reducers`` return a million times the average of every part they reduce. ``kept_own``, if
    given, is filled with how many values each peer kept as they were because a reducer failed it (hivemind's
    fallback, which logs it at debug level only): a part lost in transport, not an average. ``troubles``, if given,
    is filled with what went wrong for each peer, in its words: a reducer that failed it (and why), a sender it
    banned (and why): what hivemind logs at debug level only, without saying which peer saw it. ``shares``, if
    given, is filled with how many values each peer reduces.

    A reducer's reply can be lost in transport on a loaded machine (1 scenario in about 13 runs beside the inference
    tests): the reducer averaged the sender's part and banned no one, yet the sender read an end of stream with no
    reply, just after the p2p daemons logged stream resets; ``troubles`` says "sent 0 parts, but we expected 1",
    and ``kept_own`` holds that reducer's share. Most likely go-libp2p-daemon's pipe, which resets a stream when
    either direction of its copy fails, and yamux, which drops on a reset what the receiving daemon had not read."""
    from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode

    reducers = reducers or [True] * len(p2ps)
    namespace = f"round-{os.urandom(6).hex()}"
    group_id = os.urandom(20)
    peers = [p2p.peer_id for p2p in p2ps]
    modes = [AveragingMode.NODE if r else AveragingMode.CLIENT for r in reducers]
    runners = []
    for p2p, mine, weight in zip(p2ps, tensors, weights, strict=True):
        runner = AllReduceRunner(
            p2p=p2p, servicer_type=AllReduceRunner, prefix=namespace, group_id=group_id,
            tensors=[t.clone() for t in mine], ordered_peer_ids=peers,
            peer_fractions=tuple(1.0 if m == AveragingMode.NODE else 0.0 for m in modes), modes=modes,
            weight=weight, part_size_bytes=part_size_bytes, sender_timeout=timeout / 2, reducer_timeout=timeout,
        )  # fmt: skip
        await runner.add_p2p_handlers(p2p, namespace=namespace)
        if len(runners) in lying_reducers:
            honest_accumulate = runner.tensor_part_reducer.accumulate_part

            async def lying_accumulate(*args: Any, _honest: Any = honest_accumulate, **kwargs: Any) -> Any:
                return 1e6 * await _honest(*args, **kwargs)

            runner.tensor_part_reducer.accumulate_part = lying_accumulate  # this runner only
        runners.append(runner)
    seen: list[list[str]] = [[] for _ in runners]
    if shares is not None:  # before the round, which takes the parts out as it sends them
        container = runners[0].tensor_part_container
        shares[:] = [sum(part.numel() for part, _ in parts) for parts in container._input_parts_by_peer]
    for index, runner in enumerate(runners):
        _note_troubles(runner, peers, seen[index])

    async def run(runner: Any) -> list[Any]:
        index = 0
        async for delta in runner:
            runner.tensor_part_container.local_tensors[index].add_(delta)
            index += 1
        return list(runner.tensor_part_container.local_tensors)

    async def bounded(runner: Any) -> list[Any]:
        try:  # a peer whose own part was refused waits for itself: an averager's round timeout ends that
            return await asyncio.wait_for(run(runner), 3 * timeout)
        finally:
            runner.finalize(cancel=True)  # nothing if it finished

    try:
        tasks = [asyncio.create_task(bounded(runner)) for runner in runners]
        # a lying reducer waits for parts the others refused to send it, until its time limit: not the others'
        await asyncio.wait([t for i, t in enumerate(tasks) if i not in lying_reducers] or tasks)
        for index in lying_reducers:
            tasks[index].cancel()
        results = list(await asyncio.gather(*tasks, return_exceptions=True))
        if kept_own is not None:
            kept_own[:] = [runner.tensor_part_container.failed_size for runner in runners]
        if troubles is not None:
            troubles[:] = seen
        return results
    finally:
        for runner, p2p in zip(runners, p2ps, strict=True):
            await runner.remove_p2p_handlers(p2p, namespace=namespace)
