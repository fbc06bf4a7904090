"""Real hivemind averaging with a lying peer, in a process of its own with garden's patches installed (they patch
hivemind's classes for the whole process, and the test process must stay unpatched): run by
``tests/collab/test_robust.py`` as ``python tests/collab/robust_rounds.py rounds|states``; prints one JSON object.

``rounds``: four hivemind P2P peers in this process run ``AllReduceRunner`` rounds (what an averager runs once its
group is formed): honest ones send noisy copies of one vector, a liar sends a huge part, a weight of 1e30, a NaN or
a negative weight. Reported per scenario: each peer's distance from the honest peers' weighted mean, in units of
the honest spread (the mean distance of the honest parts from that mean), how far apart the honest peers ended,
and what a plain weighted mean (hivemind's own reducer) would have given.

``states``: three ``TrainingStateAverager`` peers offer a state (two honest at epoch 5, a liar) and a fourth loads
one, several times: the liar claims epoch 1000, or the honest epoch with parameters a thousand times too large.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SIZES = (200_000, 50_000, 21)  # three tensors: several parts of 2**19 bytes, and a small one


def honest_tensors(seed: int, count: int) -> list[list[Any]]:
    """``count`` peers' tensors: one shared signal plus independent noise of the same size (as gradients)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    signal = [torch.randn(n, generator=generator) for n in SIZES]
    return [[s + torch.randn(s.shape, generator=generator) for s in signal] for _ in range(count)]


WEIGHT_LIMIT = 1000.0
"""The largest weight a sender may claim here (a trainer sets a few epochs' samples of its swarm)."""


def flat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


async def rounds() -> dict[str, Any]:
    import torch
    from hivemind.p2p import P2P

    from harness.trainers import average_round

    first = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    maddrs = await first.get_visible_maddrs()
    p2ps = [first] + list(
        await asyncio.gather(
            *(P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(3))
        )
    )
    report: dict[str, Any] = {}
    try:
        honest = honest_tensors(0, 3)
        weights = [16.0, 18.0, 18.0]  # none above the median (the upper one of four, with the liar): counted as sent
        mean = sum(w * flat(t) for w, t in zip(weights, honest, strict=True)) / sum(weights)
        spread = sum(float((flat(t) - mean).norm()) for t in honest) / 3
        four = honest_tensors(1, 4)
        liars = {
            "huge": ([1e6 * t for t in honest[0]], 16.0),
            "heavy": ([-3.0 * t for t in honest[0]], 100.0),  # below the limit: counted as the median weight
            "weight": ([-3.0 * t for t in honest[0]], 1e30),  # above the limit (WEIGHT_LIMIT): refused
            "huge_and_weight": ([-1e6 * t for t in honest[0]], 1e30),
            "nan_weight": (honest[0], float("nan")),
            "negative_weight": (honest[0], -5.0),
        }
        scenarios: dict[str, tuple[list[list[Any]], list[float], list[bool]]] = {
            "honest_four": (four, [16.0, 18.0, 16.0, 18.0], [True] * 4),
            "honest_two": (four[:2], [16.0, 20.0], [True] * 2),
        }
        for name, (tensors, weight) in liars.items():
            # the liar as a sender only (a client-mode peer: honest peers reduce every part), and, where its own
            # reducer (garden's, in this process) keeps its part, as a peer that reduces a share too
            scenarios[f"{name}_client"] = ([*honest, tensors], [*weights, weight], [True, True, True, False])
            if name in ("huge", "heavy"):  # a refused weight: the liar as a sender only
                scenarios[name] = ([*honest, tensors], [*weights, weight], [True] * 4)
        # a liar that sends an honest part but returns a million times the average of the parts it reduces
        scenarios["lying_reducer"] = ([*honest, honest[0]], [*weights, weights[0]], [True] * 4)
        for name, (tensors, weight, reducers) in scenarios.items():
            started = time.perf_counter()
            liars = (3,) if name == "lying_reducer" else ()
            kept_own: list[int] = []
            troubles: list[list[str]] = []
            shares: list[int] = []
            results = await average_round(
                p2ps[: len(tensors)], tensors, weight, reducers, lying_reducers=liars, kept_own=kept_own,
                troubles=troubles, shares=shares,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            honest_count = 3 if len(tensors) == 4 and name.split("_")[0] != "honest" else len(tensors)
            used = weights if honest_count == 3 else weight
            reference = sum(w * flat(t) for w, t in zip(used, tensors[:honest_count], strict=True)) / sum(used)
            scale = sum(float((flat(t) - reference).norm()) for t in tensors[:honest_count]) / honest_count
            finite_weights = [w if w == w and w >= 0 else 0.0 for w in weight]  # what hivemind's sum would use
            plain = sum(w * flat(t) for w, t in zip(finite_weights, tensors, strict=True)) / sum(finite_weights)
            outcome = [r if isinstance(r, BaseException) else flat(r) for r in results]
            # a value a peer kept as it was (hivemind's fallback for a reducer that failed it), and what it averaged
            kept = [
                None if isinstance(r, BaseException) else r == flat(t) for r, t in zip(outcome, tensors, strict=True)
            ]  # fmt: skip
            common = torch.ones_like(reference, dtype=torch.bool)
            for mask in kept[:honest_count]:
                if mask is not None:
                    common &= ~mask
            report[name] = {
                "distance": [
                    None if isinstance(r, BaseException) else float((r - reference).norm()) / scale for r in outcome
                ],  # fmt: skip
                # over the values a peer averaged, those it did not keep as they were
                "averaged_distance": [
                    None if mask is None else float((r - reference)[~mask].norm()) / scale
                    for r, mask in zip(outcome, kept, strict=True)
                ],  # fmt: skip
                "kept": [None if mask is None else int(mask.sum()) for mask in kept],
                "failed": [type(r).__name__ if isinstance(r, BaseException) else None for r in outcome],
                "kept_own": kept_own,  # values a peer kept because a reducer failed it (hivemind's count)
                "troubles": troubles,  # per peer: which reducer failed it, which sender it banned, and why
                "shares": shares,  # values each peer reduces
                # hivemind hands each peer the average minus its own part, which it adds back: equal up to rounding
                # (over the values every honest peer averaged)
                "honest_apart": max(
                    float("inf") if isinstance(r, BaseException) else float((r - outcome[0])[common].norm()) / scale
                    for r in outcome[:honest_count]
                ),
                "honest": honest_count,  # the first so many peers are honest
                "plain_distance": float((plain - reference).norm()) / scale,
                "seconds": seconds,
            }
        report["spread"] = spread
    finally:
        for p2p in p2ps:
            await p2p.shutdown()
    return report


def states() -> dict[str, Any]:
    from functools import partial

    import hivemind
    import torch
    from hivemind.optim.state_averager import TrainingStateAverager

    prefix = "robust-states"
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    dhts += [
        hivemind.DHT(initial_peers=dhts[0].get_visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(3)
    ]
    honest = torch.linspace(-1.0, 1.0, 1000)
    averagers: list[Any] = []
    report: dict[str, Any] = {}
    try:
        for dht in dhts:
            averagers.append(
                TrainingStateAverager(
                    dht=dht, optimizer=partial(torch.optim.Adam, lr=0.1),
                    params=[torch.nn.Parameter(torch.zeros(1000))], prefix=prefix, start=True, request_timeout=2.0,
                )
            )  # fmt: skip
        *servers, joiner = averagers

        def offer(averager: Any, epoch: int, values: Any) -> None:
            with torch.no_grad():
                averager.optimizer.param_groups[0]["params"][0].copy_(values)
            averager.local_epoch = epoch
            averager.state_sharing_priority = epoch

        def offers(expected: list[int]) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = dhts[3].get(f"{prefix}.all_averagers", latest=True)
                values = [item.value for item in found.value.values()] if found is not None else []
                if sorted(v for v in values if isinstance(v, float | int) and v > 0) == sorted(expected):
                    return
                time.sleep(0.2)
            raise TimeoutError(f"the offers did not reach the DHT: {found}")

        def load(times: int, expected: list[int]) -> list[dict[str, Any]]:
            # Adam's statistics follow the parameters in the stream: a second peer's is read up to them only
            outcomes = []
            for _ in range(times):
                offer(joiner, 0, torch.zeros(1000))
                offers(expected)  # the joiner's DHT shows them all (a read can miss one)
                joiner.load_state_from_peers(timeout=10.0)
                loaded = joiner.optimizer.param_groups[0]["params"][0].detach()
                outcomes.append({"epoch": joiner.local_epoch, "honest": bool(torch.equal(loaded, honest)),
                                 "max_abs": float(loaded.abs().max())})  # fmt: skip
            return outcomes

        offer(servers[0], 5, honest)
        offer(servers[1], 5, honest)
        offer(servers[2], 1000, 1000 * torch.randn(1000))
        report["far_epoch"] = load(3, [5, 5, 1000])
        offer(servers[2], 5, 1000 * torch.randn(1000))
        report["garbage_at_the_same_epoch"] = load(4, [5, 5, 5])
        servers[1].allow_state_sharing = False  # one honest server and the liar, at the same epoch
        report["one_honest_one_liar"] = load(2, [5, 5])
        servers[2].allow_state_sharing = False  # the honest one alone: nothing to compare it with
        report["alone"] = load(1, [5])
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
    return report


def main() -> int:
    from garden.collab import hivemind_patches

    hivemind_patches.install(max_weight=WEIGHT_LIMIT)
    what = sys.argv[1]
    report = asyncio.run(rounds()) if what == "rounds" else states()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
