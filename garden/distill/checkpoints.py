"""Training run directories and their checkpoints: written atomically, verified by sha256, resumable exactly.

A run directory (``garden train --out runs/capitals``)::

    garden-run.json                  what was trained on what, the settings, and ``latest``
    metrics.jsonl                    one line of metrics per step (appended; cut back on resume)
    checkpoints/step-000050/
        model/                       a transformers model directory (LoRA merged in): load it anywhere
        adapter/                     the PEFT adapter, for LoRA students (what resume and averaging use)
        trainer_state.pt             optimizer, scheduler, RNG, step: what an exact resume needs
        manifest.json                step, metrics and the sha256 of every file above

A checkpoint is written into ``step-N.partial`` and renamed into place only when complete, then
``garden-run.json`` is replaced atomically to name it: a crash at any moment leaves the previous
checkpoint intact and named. The whole run directory is a model reference (``garden generate --model
runs/capitals``): ``garden.models.loading`` resolves it to the latest checkpoint's ``model/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garden.durable import recover_dir, swap_dir, write_bytes
from garden.models.loading import RUN_MANIFEST, file_sha256

logger = logging.getLogger(__name__)

RUN_FORMAT = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message says why and what to do."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON via a temporary file and a rename, so readers never see half a file."""
    write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def verify(self) -> None:
        """Raise ``CheckpointError`` unless every file listed in the manifest exists with its sha256."""
        for rel, digest in self.manifest.get("files", {}).items():
            path = self.path / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {rel}")
            if file_sha256(path) != digest:
                raise CheckpointError(f"checkpoint {self.path}: {rel} does not match its sha256 (damaged?)")


class RunDir:
    """One training run's directory. ``info`` is ``garden-run.json``: the student and teacher references,
    the data's digest, the training settings, and ``latest`` (the newest complete checkpoint)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / RUN_MANIFEST

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_info(self) -> dict[str, Any]:
        try:
            info = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not a training run (no {RUN_MANIFEST})") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.manifest_path} is unreadable: {e}") from None
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{self.manifest_path} is not a garden run manifest of format {RUN_FORMAT}")
        return info

    def create(self, info: dict[str, Any]) -> None:
        """Start a new run; refuses a directory that already holds one (resume it, or pick another)."""
        if self.exists():
            raise CheckpointError(f"{self.path} already holds a training run: add --resume, or choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            raise CheckpointError(f"{self.path} exists and is not empty; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, {**info, "format": RUN_FORMAT, "created": time.time(), "latest": None})

    def latest(self) -> Checkpoint | None:
        name = self.read_info().get("latest")
        if not name:
            return None
        return self.checkpoint(name)

    def checkpoint(self, name: str) -> Checkpoint:
        path = self.path / CHECKPOINTS / name
        recover_dir(path)  # a crash in the middle of replacing it: the previous one comes back
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}: {e}") from None
        return Checkpoint(path=path, step=int(manifest["step"]), manifest=manifest)

    def save(
        self,
        step: int,
        model: Any,
        tokenizer: Any,
        trainer_state: dict[str, Any],
        metrics: dict[str, float],
        keep: int = 2,
    ) -> Checkpoint:
        """Write checkpoint ``step``, name it ``latest``, then delete all but the newest ``keep``."""
        import torch

        root = self.path / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        name = checkpoint_name(step)
        staging = root / f"{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        if is_peft(model):
            model.save_pretrained(staging / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(staging / "model")
        else:
            model.save_pretrained(staging / "model")
        tokenizer.save_pretrained(staging / "model")
        torch.save(trainer_state, staging / TRAINER_STATE)
        files = {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"step": step, "time": time.time(), "metrics": _finite(metrics), "files": files}
        write_json_atomic(staging / MANIFEST, manifest)
        final = root / name
        recover_dir(final)
        swap_dir(staging, final)  # a rewrite of the same step after a resume replaces it whole, never emptied
        info = self.read_info()
        info["latest"] = name
        write_json_atomic(self.manifest_path, info)
        self._prune(keep, protect=name)
        return Checkpoint(path=final, step=step, manifest=manifest)

    def _prune(self, keep: int, protect: str) -> None:
        root = self.path / CHECKPOINTS
        done = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith((".partial", ".old")))
        for old in done[: max(0, len(done) - max(1, keep))]:
            if old.name != protect:
                shutil.rmtree(old, ignore_errors=True)
        for partial in root.glob("*.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep only metric lines up to ``step`` (a resume replays the steps after its checkpoint)."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a crash
        self.metrics_path.write_text("".join(line + "\n" for line in kept))


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def load_weights(model: Any, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's trained weights into ``model``, a freshly built student of the same spec."""
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        adapter = checkpoint.adapter_dir / "adapter_model.safetensors"
        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"the adapter in {checkpoint.path} does not fit this student: {unexpected[:3]}")
        return
    state: dict[str, Any] = {}
    for shard in sorted(checkpoint.model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"the weights in {checkpoint.path} do not fit this student (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]}): was it trained with another --student?"
        )
    if tied:
        model.tie_weights()


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: metrics that are NaN (no row had the term) or infinite are written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
