"""The built-in demo prompt set, shipped inside the package: the default for ``--prompts``.

240 short English prompts, each with a one-sentence reference answer (at most 30 words, so that a
135M student can learn them), 60 in each of four topics:

* ``capitals``: "What is the capital of Peru?" -> "The capital of Peru is Lima."
* ``units``: metric length, mass and volume, and hours/minutes:
  "How many centimetres are in 3.5 metres?" -> "3.5 metres is 350 centimetres."
* ``arithmetic``: small sums, differences and products: "What is 17 + 25?" -> "17 + 25 = 42."
* ``definitions``: "What is photosynthesis?" -> "Photosynthesis is the process by which plants ..."

Every line of ``demo_prompts.jsonl`` is a :class:`~garden.protocol.rows.PromptRow` whose ``meta`` is
``{"topic": <one of the above>, "split": "train" | "heldout"}``. Exactly 20 % of each topic (12 prompts)
is held out, for evaluating a student on prompts it was not trained on; no prompt appears twice.

The file is written by ``scripts/make_demo_prompts.py`` (stdlib only, deterministic: re-running it
rewrites the file byte for byte). Capitals and definitions are hand-written in that script; unit
conversions and arithmetic are computed there exactly; the held-out prompts are drawn per topic by a
seeded RNG. Edit the script and re-run it, never the JSONL by hand.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Literal

from garden.protocol.rows import PromptRow

__all__ = ["DEMO_PROMPTS", "DEMO_PROMPTS_FILE", "Split", "TOPICS", "demo_prompts"]

DEMO_PROMPTS = "builtin:demo"
"""The name by which a mission or ``--prompts`` asks for this set."""

DEMO_PROMPTS_FILE = "demo_prompts.jsonl"
TOPICS = ("capitals", "units", "arithmetic", "definitions")

Split = Literal["train", "heldout", "all"]
_SPLITS = ("train", "heldout", "all")


@cache
def _load() -> tuple[PromptRow, ...]:
    text = files(__name__).joinpath(DEMO_PROMPTS_FILE).read_text(encoding="utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(PromptRow.model_validate_json(line, strict=True))
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise ValueError(f"{DEMO_PROMPTS_FILE}:{lineno}: invalid prompt row: {exc}") from exc
    return tuple(rows)


@cache
def _split(split: Split) -> tuple[PromptRow, ...]:
    rows = _load()
    if split == "all":
        return rows
    return tuple(row for row in rows if row.meta.get("split") == split)


def demo_prompts(split: Split = "train") -> list[PromptRow]:
    """The demo prompts of one split (``"train"``, ``"heldout"`` or ``"all"``), in file order.

    The file is read and validated once per process; each call returns a new list of deep copies, so a
    caller may not change the cached rows (their ``meta`` dicts included).
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(_SPLITS)}")
    return [row.model_copy(deep=True) for row in _split(split)]
