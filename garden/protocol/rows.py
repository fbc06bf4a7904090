"""Prompt and DORPO row records: what shakers read and write, what trainers consume, what peers
replicate. Strict schemas (reject, never coerce), like every record that may come from a stranger."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 32_000


class PromptRow(BaseModel):
    """One prompt of a mission's data set (a line of a prompts JSONL file).

    :param prompt: the user message (the chat template is applied by the shaker)
    :param reference: a known good answer, for the ``reference`` judge (optional)
    :param meta: free-form extras carried along (e.g. ``{"topic": "capitals"}``), never interpreted
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    reference: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    meta: dict[str, Any] = Field(default_factory=dict)
