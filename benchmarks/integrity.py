"""What checking other peers' rows costs and catches, on the built-in teacher (``garden.distill.verify``).

Run: ``.venv/bin/python benchmarks/integrity.py [--prompts 24] [--runs 10]``. Prints ONE JSON object.

All in one run, on one machine:

- ``shake_s`` / ``verify_all_s``: seconds to shake ``--prompts`` prompts, and to verify every resulting row
  (one teacher-forced pass per row, the judge re-run); ``verify_fraction_cost``: the throughput of shaking
  plus verifying a ``--fraction`` (0.1) of rows, over shaking alone (the issue's target: >= 0.85)
- ``worst_fp32``: the largest log-prob gap between honest rows and a recomputation in float32 with another
  batch shape (float16 storage and batching: what honest peers of one setup differ by);
  ``worst_bf16`` / ``off_bf16``: the same recomputed by a bfloat16 teacher (a peer with another dtype or a
  GPU), and the largest share of a row's tokens outside the tolerance; ``honest_refused_bf16``: how many
  honest rows a bfloat16 verifier would refuse under the default :class:`Tolerance`
- ``detection``: over ``--runs`` seeds, a shaker wins every shard of a mission of ``--mission-rows`` rows
  (the shaken rows, cycled) and fakes the log-probs of 20 % of its rows (a fifth of their tokens' log-probs
  lowered by 0.3: more confident ones would not pass the row schema's sum check); a verifier checks a
  ``--fraction`` sample of each shard's rows (at least one), the producer's first ``PROBATION_ROWS`` rows in
  full, chosen as the daemon chooses (``garden.mission.verification.sample_rows``, seeded by each row set's
  hash); ``caught_runs`` counts the runs in which at least one faked row was checked and refused (one is
  enough: a refutation re-verifies all of that producer's shards)
- ``probation_cost``: shaking's throughput with the probation's checks (``PROBATION_ROWS`` rows, once per
  producer and mission) over shaking alone, for a mission of ``--prompts`` prompts: the worst case
- ``averaging``: ``benchmarks/robust_averaging.py``'s held-out KL ratios (one liar among 3 honest peers in real
  hivemind rounds, with the attack ÷ without; the issue's target: <= 1.1 for a weight of 1e30 and a part 10^6
  times the others'), garden's and hivemind's as shipped; ``--no-averaging`` skips it (about 30 s)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from garden.data import demo_prompts
from garden.distill.judges import ReferenceJudge
from garden.distill.shaker import ShakeConfig, shake
from garden.distill.verify import Tolerance, verify_rows
from garden.mission.verification import PROBATION_ROWS, sample_rows
from garden.models.loading import load_model
from garden.protocol.rows import DorpoRow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's harness
from harness.rows import remake_row  # noqa: E402


def _faked(row: DorpoRow) -> DorpoRow:
    logprobs = row.topk_logprobs_array().copy()
    logprobs[: max(1, logprobs.shape[0] // 5)] -= 0.3
    return remake_row(row, topk_logprobs=logprobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--mission-rows", type=int, default=160)
    parser.add_argument("--no-averaging", action="store_true", help="skip the robust averaging benchmark")
    args = parser.parse_args()
    averaging = None if args.no_averaging else robust_averaging()

    teacher = load_model("builtin:smollm2-135m")
    judge = ReferenceJudge(threshold=0.5)
    prompts = demo_prompts("train")[: args.prompts]
    config = ShakeConfig(candidates=4, max_new_tokens=48, batch_prompts=8, seed=0)
    began = time.perf_counter()
    rows = shake(teacher, prompts, judge, config).rows
    shake_s = time.perf_counter() - began
    by_text = {p.prompt: p for p in prompts}
    answered = [by_text[row.prompt] for row in rows]

    began = time.perf_counter()
    fp32 = verify_rows(teacher, rows, answered, judge)
    verify_all_s = time.perf_counter() - began
    bf16_teacher = load_model("builtin:smollm2-135m", dtype="bfloat16")
    bf16 = verify_rows(bf16_teacher, rows, answered, judge)

    mission = [rows[i % len(rows)] for i in range(args.mission_rows)]
    caught, checked_rows = 0, []
    for seed in range(args.runs):
        rng = random.Random(seed)
        shards = [mission[i : i + args.shard_size] for i in range(0, len(mission), args.shard_size)]
        found, producer_rows = False, 0
        for index, shard in enumerate(shards):
            fake = set(rng.sample(range(len(shard)), max(1, round(0.2 * len(shard)))))
            sent = [_faked(row) if i in fake else row for i, row in enumerate(shard)]
            # the daemon's own choice: seeded by the row set's hash, the producer's probation first
            done = SimpleNamespace(row_set_sha256=hashlib.sha256(f"{seed}:{index}".encode()).hexdigest())
            probation = max(0, PROBATION_ROWS - producer_rows)
            checked = sample_rows(done, len(sent), args.fraction, at_least=probation)  # type: ignore[arg-type]
            producer_rows += len(checked)
            verdicts = verify_rows(teacher, [sent[i] for i in checked], [by_text[sent[i].prompt] for i in checked])
            found = found or any(not v.ok for i, v in zip(checked, verdicts, strict=True) if i in fake)
            if found:
                break  # refuted: from here every row of the producer's is checked (and discarded)
        caught += found
        checked_rows.append(producer_rows)

    fraction_s = verify_all_s * args.fraction
    print(json.dumps({
        "rows": len(rows), "prompts": len(prompts), "shake_s": round(shake_s, 2),
        "verify_all_s": round(verify_all_s, 2),
        "verify_fraction": args.fraction, "verify_fraction_cost": round(shake_s / (shake_s + fraction_s), 3),
        "honest_refused_fp32": sum(not c.ok for c in fp32), "worst_fp32": round(max(c.worst for c in fp32), 4),
        "honest_refused_bf16": sum(not c.ok for c in bf16), "worst_bf16": round(max(c.worst for c in bf16), 4),
        "off_bf16": round(max(c.off for c in bf16), 4), "tolerance": Tolerance().__dict__,
        "detection": {"runs": args.runs, "caught_runs": caught, "shard_size": args.shard_size,
                      "mission_rows": args.mission_rows, "probation_rows": PROBATION_ROWS,
                      "rows_checked_until_caught": checked_rows},
        "probation_cost": round(shake_s / (shake_s + verify_all_s * min(1.0, PROBATION_ROWS / len(rows))), 3),
        "averaging": averaging,
    }))  # fmt: skip


def robust_averaging() -> dict[str, object]:
    """benchmarks/robust_averaging.py's figures (run as it is: it starts its own P2P peers in child processes)."""
    import subprocess

    script = Path(__file__).with_name("robust_averaging.py")
    done = subprocess.run([sys.executable, str(script), "--json-only"], capture_output=True, text=True, timeout=900,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"robust_averaging.py failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    return {k: report[k] for k in ("settings", "kl_ratio", "target_kl_ratio", "meets_target")}


if __name__ == "__main__":
    main()
