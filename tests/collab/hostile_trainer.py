"""A hostile swarm trainer, for tests: the same mission, student and optimizer as an honest worker, talking to
hivemind directly, without garden's checks, as a broken or malicious peer would. What it lies about (``--attack``):

- ``nan`` (default): every gradient it sends is NaN (and so, after its own updates, is every parameter it offers);
- ``huge``: every gradient it sends is finite but a million times the size of an honest one;
- ``weight``: its gradients are random, sent with an averaging weight of 1e30 (hivemind divides by the sum);
- ``reducer``: its gradients are zeros, sent with an honest weight (nothing to refuse in them), and it returns a
  million times the average of every part it reduces (``--lying-reducer`` is implied);
- ``epoch``: it claims epoch ``--claim`` (default 1000) in the progress record and as its state's priority and
  label, and offers parameters a thousand times too large (``--state nan``: NaN parameters); it takes no steps;
- ``mixed``: gradients a million times too large, sent with a weight of 1e30 in every other averaging round.

``--every-round`` (with ``weight``, ``reducer`` or ``huge``) takes no optimizer steps: it joins every gradient round
an honest trainer looks for a group for, until stopped. It watches hivemind's matchmaking key for the declaration of
a trainer that is in the progress record (the attackers take no steps, so none of them is), and looks for a group
then, expiring after it, so that it asks that trainer's group to take it in. (A trainer that steps joins one round
an epoch at most, and on two loaded cores its own timeouts made it miss all but one or two; striking at the
epoch's end as the progress record estimates it, the attackers came late, met each other, and sat out the next
epoch in that round's timeout: tests saw the weight attacker meet no honest round in 11 tries.) Its status counts
the ``rounds`` it tried; each line of its log says how one ended (a round with honest peers may end in an error
here: they refuse its part).

``--lying-reducer`` adds a million times the average of every part it reduces (its own part, sent with a weight of
1e30, gets the weight attacker banned from an honest peer's round at once, and its reductions reach that peer only
by chance: the ``reducer`` attack lies as a reducer alone); ``--robust`` installs garden's checks of others'
claims in it (so that another attacker's epoch claim does not derail it). ``--peers-file``: it
imports and builds its student, says ``{"state": "waiting for the swarm"}`` in its status, and joins the peers that
file lists once it exists.

Run as ``python tests/collab/hostile_trainer.py [--attack MODE] CONFIG.json`` with a worker's configuration; it
writes ``{"peer_id": ..., "steps": ..., "epoch": ...}`` to the status path and runs until SIGTERM or
``max_epochs``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def claim_epoch(opt: Any, params: list[Any], epoch: int, state: str = "large") -> None:
    """Claim ``epoch`` everywhere hivemind reads one: the progress record (with a sample, or hivemind's reporter
    stores nothing), the priority under which it offers its state, and the state's label; the state it offers
    holds parameters a thousand times too large, or NaN (``state="nan"``)."""
    import torch

    with torch.no_grad():
        served = [p for group in opt.state_averager.optimizer.param_groups for p in group["params"]]
        for p in {id(p): p for p in [*params, *served]}.values():  # hivemind may serve copies of the parameters
            if state == "nan":
                p.fill_(float("nan"))
            else:
                p.mul_(1000.0)
    opt.state_averager.local_epoch = epoch
    opt.state_averager.state_sharing_priority = epoch
    opt.tracker.report_local_progress(epoch, 1)


def honest_looking(opt: Any, dht: Any) -> float | None:
    """When the earliest gradient-round declaration still open on hivemind's matchmaking key, of a trainer in the
    progress record, expires (its all-reduce begins then, or earlier once its group is full); None while no such
    trainer looks for a group. The record names each trainer's peer id; the declarations are under peer ids."""
    from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

    progress = dht.get(opt.tracker.training_progress_key, latest=True)
    trainers = {
        entry.value.get("peer_id") for entry in (progress.value.values() if isinstance(progress, ValueWithExpiration)
                                                 and isinstance(progress.value, dict) else [])
        if isinstance(getattr(entry, "value", None), dict)
    }  # fmt: skip
    # the key hivemind's matchmaking declares under (its group bits stay empty without a target group size); the
    # matchmaking object itself lives in the averager's own process
    declared = dht.get(f"{opt.grad_averager.prefix}.0b", latest=True)
    if not isinstance(declared, ValueWithExpiration) or not isinstance(declared.value, dict):
        return None
    now = get_dht_time()
    open_ = [entry.expiration_time for peer, entry in declared.value.items()
             if peer in trainers and entry.value is True and entry.expiration_time > now]  # fmt: skip
    return min(open_, default=None)


def main() -> int:
    import torch
    from hivemind import DHT
    from hivemind.utils.timed_storage import get_dht_time

    from garden.collab.hivemind_patches import refresh_progress
    from garden.collab.trainer import make_optimizer
    from garden.collab.worker import WorkerConfig
    from garden.distill.checkpoints import write_json_atomic
    from garden.models.student import StudentSpec, build_student

    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", choices=["nan", "huge", "weight", "reducer", "epoch", "mixed"], default="nan")
    parser.add_argument("--claim", type=int, default=1000, help="the epoch claimed by --attack epoch")
    parser.add_argument("--state", choices=["large", "nan"], default="large",
                        help="the parameters --attack epoch offers: a thousand times too large, or NaN")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between steps (an honest worker's pace)")
    parser.add_argument("--robust", action="store_true", help="install garden's checks of the others' claims")
    parser.add_argument("--lying-reducer", action="store_true", help="return 10^6 x the average of what it reduces")
    parser.add_argument("--every-round", action="store_true",
                        help="with --attack weight, reducer or huge: no steps, every honest gradient round joined")
    parser.add_argument("--after-trainers", type=int, default=0,
                        help="take no step and claim nothing before this many trainers are in the swarm")
    parser.add_argument("--peers-file", type=Path, default=None,
                        help="join the peers listed in this file (one address a line), once it exists: started "
                             "before the swarm is, it does its imports and builds its student meanwhile")
    parser.add_argument("config", type=Path)
    args = parser.parse_args()
    config = WorkerConfig.model_validate_json(args.config.read_text())

    def leave(*_: object) -> None:
        # no orderly goodbye: it may be stuck in a round that its NaN spoiled; take its children along
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    stop = threading.Event()
    torch.set_num_threads(1)
    collab = config.collab
    if args.robust:
        from garden.collab import hivemind_patches

        hivemind_patches.install()
    if args.lying_reducer or args.attack == "reducer":
        from hivemind.averaging.partition import TensorPartReducer

        robust_accumulate = TensorPartReducer.accumulate_part

        async def lying_accumulate(self: Any, *step_args: Any, **kwargs: Any) -> Any:
            return 1e6 * await robust_accumulate(self, *step_args, **kwargs)

        TensorPartReducer.accumulate_part = lying_accumulate  # before its averagers fork: they inherit it
    student = build_student(StudentSpec(base=config.student.base))
    initial_peers = list(config.initial_peers)
    if args.peers_file is not None:
        write_json_atomic(config.status_path, {"state": "waiting for the swarm", "attack": args.attack})
        while not args.peers_file.exists():
            time.sleep(0.1)
        initial_peers = args.peers_file.read_text().split()
    dht = DHT(initial_peers=initial_peers, host_maddrs=config.host_maddrs, start=True)
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = make_optimizer(dht, config.mission_id, params, collab)
    steps = rounds = 0
    honest_step = opt.grad_averager.step
    if args.attack in ("weight", "mixed"):

        def heavy_step(*step_args: Any, **kwargs: Any) -> Any:
            nonlocal rounds
            rounds += 1
            heavy = {"weight": 1e30} if args.attack == "weight" or rounds % 2 == 1 else {}
            return honest_step(*step_args, **{**kwargs, **heavy})

        opt.grad_averager.step = heavy_step  # this instance only: the weight its gradients are sent with

    def report(epoch: int) -> None:
        status = {"peer_id": dht.peer_id.to_base58(), "steps": steps, "rounds": rounds, "epoch": epoch,
                  "attack": args.attack}  # fmt: skip
        write_json_atomic(config.status_path, status)  # the test reads it at any moment: never half a file

    try:
        while not stop.is_set() and opt.tracker.global_progress.num_peers < args.after_trainers:
            # started ahead (imports take seconds), it strikes once the others are training: it reads the record
            # now and then itself (hivemind's tracker reads it up to 10 s apart while no epoch is near)
            refresh_progress(opt.tracker)
            time.sleep(0.5)
        if args.attack == "epoch":
            claim_epoch(opt, params, args.claim, args.state)
            report(args.claim)
            while not stop.wait(5.0):
                opt.tracker.report_local_progress(args.claim, 1)  # keeps its entry fresh
                report(args.claim)
        struck = 0.0  # the expiration of the honest declaration this attacker last joined
        while args.every_round and args.attack in ("weight", "reducer", "huge") and not stop.is_set():
            # strike when an honest trainer looks for its gradient round's group, at no other moment: the attackers
            # would meet each other (CI saw it)
            honest = honest_looking(opt, dht)
            if honest is None or honest <= struck + 1.0:
                stop.wait(0.2)
                continue
            struck = honest
            for p in params:
                if args.attack == "weight":
                    p.grad = torch.randn_like(p)
                elif args.attack == "reducer":
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad = 1e6 * torch.randn_like(p)
            opt.grad_averager.accumulate_grads_(batch_size=1)
            rounds += 1
            heavy = {"weight": 1e30} if args.attack == "weight" else {}
            try:  # expiring after the honest trainer, it asks to join that trainer's group (or its leader's)
                honest_step(**heavy, scheduled_time=max(honest, get_dht_time()) + 0.5,
                            timeout=collab.matchmaking_time + collab.averaging_timeout)  # fmt: skip
                print(f"round {rounds}: averaged", flush=True)
            except Exception as e:  # no group, or a round whose honest peers refused its part: the next one
                print(f"round {rounds}: {e!r}", flush=True)
            report(opt.local_epoch)
        while not stop.is_set() and opt.local_epoch < collab.max_epochs:
            for p in params:
                if args.attack == "nan":
                    p.grad = torch.full_like(p, float("nan"))
                elif args.attack in ("huge", "mixed"):
                    p.grad = 1e6 * torch.randn_like(p)
                else:
                    p.grad = torch.randn_like(p)
            opt.step()
            opt.zero_grad()
            steps += 1
            report(opt.local_epoch)
            time.sleep(args.pace)
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
