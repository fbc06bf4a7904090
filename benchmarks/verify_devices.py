"""How far an honest producer's teacher log-probs land from a verifier on other hardware or another dtype.

Run: ``.venv/bin/python benchmarks/verify_devices.py [--model builtin:smollm2-135m] [--prompts 16]``. Prints ONE
JSON object (``--out FILE`` writes it there too). Without a GPU it measures the CPU configurations only.

``garden.distill.verify`` refuses a row when the teacher's top-k log-probs, recomputed by the verifier, are not
within :class:`~garden.distill.verify.Tolerance` of the row's. Honest peers differ by float16 storage, batch
shape, dtype and device; this measures by how much, for each configuration of:

- ``cpu-fp32`` (the reference: how the project's shaker runs by default), ``cpu-bf16``;
- with CUDA: ``cuda-fp32`` (TF32 off), ``cuda-tf32`` (float32 weights, TF32 matmuls), ``cuda-fp16``,
  ``cuda-bf16``.

``verifiers``: honest rows shaken on ``cpu-fp32`` (``garden.distill.shaker.shake``, the reference judge),
checked by each configuration. ``producers`` (``--producers``, all by default): rows shaken by each configuration
(its own sampled answers), checked by a ``cpu-fp32`` verifier. For each: ``accepted`` / ``rows`` by
``verify_rows`` under the default :class:`Tolerance` (the project's own check, judge re-run), the gap on
shared top-k ids (``max``, ``p99``, ``p999``, ``mean``), the per-token top-k ``overlap`` (``mean``, ``min``),
``off``: the share of all tokens outside the default tolerance and the largest share in one row, and
``accepted_by``: rows accepted under each of :data:`TOLERANCES` (the project's row comparison on the same
recomputed top-k). ``fakes_refused``: rows of the reference producer whose first fifth of tokens' log-probs
were lowered by 0.1 or 0.3 (as ``benchmarks/integrity.py`` forges them), refused by a ``cpu-fp32`` verifier
under each tolerance: what loosening costs in detection. ``weights_sha256`` fingerprints the float32 weights
(compare it between machines to know they ran the same model).

Needs a transformers whose causal LMs take a 2-D ``logits_to_keep`` (per-row positions), as garden's
``teacher_topk`` does: 5.25 does; 5.17 does not (``teacher_topk`` then returns [B, T, k] per row and the row
schema refuses it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from garden.data import demo_prompts
from garden.distill.judges import ReferenceJudge
from garden.distill.shaker import ShakeConfig, shake, teacher_topk
from garden.distill.verify import Tolerance, compare_topk, verify_rows
from garden.models.chat import chat_prompt_ids
from garden.models.loading import LoadedModel, load_model, tokenizer_fingerprint
from garden.protocol.rows import DorpoRow, PromptRow


@dataclass(frozen=True)
class Setup:
    """One way to run the teacher: a device, a dtype, and whether float32 matmuls may use TF32."""

    name: str
    device: str
    dtype: str
    tf32: bool = False


REFERENCE = Setup("cpu-fp32", "cpu", "float32")
SETUPS = (
    REFERENCE,
    Setup("cpu-bf16", "cpu", "bfloat16"),
    Setup("cuda-fp32", "cuda", "float32"),
    Setup("cuda-tf32", "cuda", "float32", tf32=True),
    Setup("cuda-fp16", "cuda", "float16"),
    Setup("cuda-bf16", "cuda", "bfloat16"),
)
TOLERANCES = {
    "default": Tolerance(),
    "atol.1": Tolerance(atol=0.1, rtol=0.02),
    "atol.2": Tolerance(atol=0.2, rtol=0.02, min_overlap=0.7, max_off=0.05),
    "atol.3-hard2": Tolerance(atol=0.3, rtol=0.05, min_overlap=0.6, max_off=0.1, hard=2.0),
}
"""The default and looser tolerances each configuration's rows are also compared under."""
FAKE_SHIFTS = (0.1, 0.3)


def available_setups(names: Sequence[str] | None = None) -> list[Setup]:
    """The setups this machine can run (CUDA ones only with a GPU), restricted to ``names`` when given."""
    import torch

    cuda = torch.cuda.is_available()
    chosen = [s for s in SETUPS if cuda or s.device == "cpu"]
    if names:
        unknown = set(names) - {s.name for s in SETUPS}
        if unknown:
            raise SystemExit(f"unknown setups {sorted(unknown)}; known: {', '.join(s.name for s in SETUPS)}")
        chosen = [s for s in chosen if s.name in names or s == REFERENCE]
    return chosen


@contextlib.contextmanager
def precision(setup: Setup) -> Iterator[None]:
    """float32 matmuls in TF32 for ``setup.tf32``, in full float32 otherwise; restored afterwards."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if setup.tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def weights_sha256(teacher: LoadedModel) -> str:
    """sha256 over the parameters' names, shapes and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, param in sorted(teacher.model.named_parameters()):
        array = param.detach().float().cpu().contiguous().numpy()
        digest.update(f"{name}{tuple(array.shape)}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def recompute(teacher: LoadedModel, rows: Sequence[DorpoRow]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's top-k as a verifier recomputes it (the pass ``verify_rows`` makes)."""
    items = [(chat_prompt_ids(teacher.tokenizer, row.prompt), row.chosen_ids_array().tolist()) for row in rows]
    tops, _ = teacher_topk(teacher, items, max(row.k for row in rows))
    return [(ids.numpy(), logprobs.numpy()) for ids, logprobs in tops]


def gap_stats(rows: Sequence[DorpoRow], again: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Gaps between stored and recomputed log-probs on shared ids, and the per-token top-k overlap."""
    gaps: list[float] = []
    overlaps: list[float] = []
    for row, (ids, logprobs) in zip(rows, again, strict=True):
        stored_ids, stored = row.topk_ids_array(), row.topk_logprobs_array().astype(np.float64)
        for t in range(stored_ids.shape[0]):
            recomputed = dict(zip(ids[t].tolist(), logprobs[t].astype(np.float64).tolist(), strict=True))
            pairs = zip(stored_ids[t].tolist(), stored[t].tolist(), strict=True)
            shared = [abs(recomputed[i] - lp) for i, lp in pairs if i in recomputed]
            gaps.extend(shared)
            overlaps.append(len(shared) / row.k)
    g = np.asarray(gaps or [0.0])
    return {
        "gap": {
            "max": round(float(g.max()), 4),
            "p999": round(float(np.quantile(g, 0.999)), 4),
            "p99": round(float(np.quantile(g, 0.99)), 4),
            "mean": round(float(g.mean()), 5),
        },
        "overlap": {"mean": round(float(np.mean(overlaps)), 4), "min": round(float(np.min(overlaps)), 4)},
    }


def measure(
    verifier: LoadedModel, rows: Sequence[DorpoRow], answered: Sequence[PromptRow], judge: ReferenceJudge
) -> dict[str, Any]:
    """How ``verifier`` judges ``rows``: the project's verdicts, the gaps, and acceptance per tolerance."""
    began = time.perf_counter()
    checks = verify_rows(verifier, rows, answered, judge)
    verify_s = time.perf_counter() - began
    again = recompute(verifier, rows)
    tokens = [row.chosen_ids_array().shape[0] for row in rows]
    off_tokens = sum(round(check.off * n) for check, n in zip(checks, tokens, strict=True))
    refused = sorted({check.reason for check in checks if check.reason is not None})
    return {
        "rows": len(rows),
        "tokens": sum(tokens),
        "accepted": sum(check.ok for check in checks),
        "worst": round(max(check.worst for check in checks), 4),
        **gap_stats(rows, again),
        "off": {"share": round(off_tokens / max(1, sum(tokens)), 4), "row_max": round(max(c.off for c in checks), 4)},
        "accepted_by": {
            name: sum(compare_topk(row, ids, lps, tol).ok for row, (ids, lps) in zip(rows, again, strict=True))
            for name, tol in TOLERANCES.items()
        },
        "refused_reasons": refused[:5],
        "verify_s": round(verify_s, 2),
    }


def faked(row: DorpoRow, shift: float, vocab_size: int) -> DorpoRow:
    """``row`` with its first fifth of tokens' log-probs lowered by ``shift`` (``benchmarks/integrity.py``)."""
    logprobs = row.topk_logprobs_array().copy()
    logprobs[: max(1, logprobs.shape[0] // 5)] -= shift
    return DorpoRow.from_arrays(
        prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, chosen_ids=row.chosen_ids_array(),
        topk_ids=row.topk_ids_array(), topk_logprobs=logprobs, teacher=row.teacher, judge=row.judge,
        scores=dict(row.scores), tokenizer=row.tokenizer, reference_used=row.reference_used, vocab_size=vocab_size,
    )  # fmt: skip


def fakes_refused(verifier: LoadedModel, rows: Sequence[DorpoRow]) -> dict[str, dict[str, int]]:
    """Per shift, per tolerance: how many forged copies of ``rows`` the verifier refuses."""
    again = recompute(verifier, rows)
    vocab_size = int(verifier.model.config.vocab_size)
    out: dict[str, dict[str, int]] = {}
    for shift in FAKE_SHIFTS:
        forged = [faked(row, shift, vocab_size) for row in rows]
        out[f"-{shift}"] = {
            name: sum(not compare_topk(row, ids, lps, tol).ok for row, (ids, lps) in zip(forged, again, strict=True))
            for name, tol in TOLERANCES.items()
        }
    return out


def environment() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def _log(began: float, text: str) -> None:
    print(f"[{time.perf_counter() - began:7.1f} s] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """The measurement; ``save`` is handed the result so far after each step (a run cut short keeps it)."""
    setups = available_setups(args.setups.split(",") if args.setups else None)
    names = [s.name for s in setups if s != REFERENCE]
    producers = names if args.producers == "all" else [n for n in args.producers.split(",") if n in names]
    judge = ReferenceJudge(threshold=0.5)
    prompts = demo_prompts(args.split)[: args.prompts]
    by_text = {p.prompt: p for p in prompts}
    config = ShakeConfig(candidates=args.candidates, max_new_tokens=args.max_new_tokens, batch_prompts=8, seed=0)
    began = time.perf_counter()

    reference = load_model(args.model, dtype=REFERENCE.dtype, device=REFERENCE.device)
    result: dict[str, Any] = {
        "model": args.model,
        "weights_sha256": weights_sha256(reference),
        "tokenizer": tokenizer_fingerprint(reference.tokenizer),
        "environment": environment(),
        "producer": REFERENCE.name,
        "shake": {"prompts": len(prompts), "candidates": config.candidates, "max_new_tokens": config.max_new_tokens,
                  "batch_prompts": config.batch_prompts, "judge": "reference(0.5)"},
        "tolerances": {name: asdict(tol) for name, tol in TOLERANCES.items()},
        "verifiers": {}, "producers": {}, "errors": {},
    }  # fmt: skip
    _log(began, f"loaded {args.model}; shaking {len(prompts)} prompts on {REFERENCE.name}")
    with precision(REFERENCE):
        rows = shake(reference, prompts, judge, config).rows
    result["shake"]["rows"] = len(rows)
    result["shake"]["seconds"] = round(time.perf_counter() - began, 2)
    if not rows:
        raise SystemExit("the reference producer made no rows")
    answered = [by_text[row.prompt] for row in rows]
    with precision(REFERENCE):
        result["fakes_refused"] = fakes_refused(reference, rows)
    save(result)
    reference_answers = {row.prompt: row.chosen for row in rows}

    for setup in setups:
        _log(began, f"verifier {setup.name}")
        try:
            teacher = load_model(args.model, dtype=setup.dtype, device=setup.device)
            with precision(setup):
                result["verifiers"][setup.name] = measure(teacher, rows, answered, judge)
        except Exception as e:  # one setup failing (a dtype a device lacks) must not lose the others
            traceback.print_exc(file=sys.stderr)
            result["errors"][f"verifier {setup.name}"] = f"{type(e).__name__}: {e}"[:300]
        save(result)
    for setup in setups:
        if setup.name not in producers:
            continue
        _log(began, f"producer {setup.name}")
        try:
            teacher = load_model(args.model, dtype=setup.dtype, device=setup.device)
            with precision(setup):
                own = shake(teacher, prompts, judge, config).rows
            with precision(REFERENCE):
                checked = measure(reference, own, [by_text[row.prompt] for row in own], judge)
            checked["same_answers"] = sum(reference_answers.get(row.prompt) == row.chosen for row in own)
            result["producers"][setup.name] = checked
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            result["errors"][f"producer {setup.name}"] = f"{type(e).__name__}: {e}"[:300]
        save(result)
    result["seconds"] = round(time.perf_counter() - began, 1)
    _log(began, "done")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m", help="a model reference (garden.models.loading)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--split", default="train")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--setups", default="", help=f"comma-separated subset of {', '.join(s.name for s in SETUPS)}")
    parser.add_argument(
        "--producers", default="all", help="setups that also shake rows for a cpu-fp32 verifier: all, none or a list"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (after every step)")
    args = parser.parse_args()

    def save(result: dict[str, Any]) -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(result) + "\n")

    result = run(args, save)
    save(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
