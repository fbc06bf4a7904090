"""What the Hugging Face hub says about a model before a byte of it is downloaded.

A mission from a stranger may name any hub id as its teacher or student. Before a peer takes such a
mission it asks the hub how big the model is (its safetensors metadata: parameters per dtype), so that a
model too big for ``--max-memory`` or for the room ``--max-disk`` leaves is refused without fetching
gigabytes first. Offline (``HF_HUB_OFFLINE``), unreachable, or a repository without safetensors metadata:
the size is unknown (None) and loading tells the real story.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

HUB_METADATA_TIMEOUT = 10.0
"""Seconds to wait for the hub's answer about a model's size."""
REMEMBER_S = 600.0
"""Seconds an answer is reused: every peer checks its missions' teachers often, the hub is asked rarely."""
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
"""Bytes per parameter of each safetensors dtype (the hub's names); an unknown one counts as 4."""
SMALL_FILES_BYTES = 32 * 1024**2
"""What a model's config, tokenizer and other small files add to its weights on disk, at most."""


@dataclass(frozen=True)
class HubSize:
    """A hub model's size from its safetensors metadata: parameters in all, and bytes on disk once downloaded."""

    parameters: int
    download_bytes: int


_answers: dict[str, tuple[float, HubSize | None]] = {}
_answers_lock = threading.Lock()


def hub_size(hub_id: str) -> HubSize | None:
    """The size the hub reports for ``hub_id``, or None (offline, unreachable, not reported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    now = time.monotonic()
    with _answers_lock:
        remembered = _answers.get(hub_id)
    if remembered is not None and now - remembered[0] < REMEMBER_S:
        return remembered[1]
    size = _ask(hub_id)
    with _answers_lock:
        _answers[hub_id] = (now, size)
    return size


def hub_parameter_count(hub_id: str) -> int | None:
    """The parameter count the hub reports for ``hub_id``, or None."""
    size = hub_size(hub_id)
    return None if size is None else size.parameters


def forget_answers() -> None:
    """Ask the hub afresh next time (tests that change what their hub says)."""
    with _answers_lock:
        _answers.clear()


def _ask(hub_id: str) -> HubSize | None:
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(hub_id, expand=["safetensors"], timeout=HUB_METADATA_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - any failure means "unknown": loading will tell the real story
        logger.info("the hub did not say how big %s is (%s); its size is found out by loading it", hub_id, e)
        return None
    safetensors = getattr(info, "safetensors", None)
    total = getattr(safetensors, "total", None)
    if not isinstance(total, int) or total <= 0:
        return None
    per_dtype = getattr(safetensors, "parameters", None) or {}
    weights = sum(int(count) * DTYPE_BYTES.get(str(dtype).upper(), 4) for dtype, count in per_dtype.items())
    return HubSize(parameters=total, download_bytes=(weights or total * 4) + SMALL_FILES_BYTES)
