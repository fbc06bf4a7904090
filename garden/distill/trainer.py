"""The DORPO trainer on one machine: AdamW, warm-up then decay, gradient accumulation and clipping,
checkpoints, and an exact resume.

Exact resume: everything a step depends on is either in the checkpoint (weights, AdamW moments,
scheduler, torch RNG) or a pure function of the step number (which rows it reads: epoch ``e``'s order
is a permutation seeded with ``(seed, e)``), so training 100 steps, stopping, and resuming to 200 gives
bit-identical weights to 200 steps in one go on the same machine and thread count.

A step whose loss or gradient is not finite is skipped: its gradients are dropped, the weights and
AdamW moments stay as they were, a warning is logged and the step is counted in ``skipped_steps``.
The schedule still advances, so one bad batch does not shift every later learning rate.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from garden.models.loading import LoadedModel
from garden.protocol.rows import DorpoRow
from garden.models.chat import pad_id
from garden.distill.checkpoints import Checkpoint, CheckpointError, RunDir, load_weights
from garden.distill.collate import EncodedRow, EncodeReport, collate, dorpo_forward, encode_rows
from garden.distill.dorpo import DorpoConfig
from garden.distill.settings import StepSettings
from garden.protocol.mission_spec import DorpoSettings, Schedule

logger = logging.getLogger(__name__)

HF_SCHEDULERS: dict[Schedule, str] = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""transformers' scheduler for each :data:`~garden.protocol.mission_spec.Schedule`."""
METRIC_NAMES = ("loss", "nll", "or_loss", "log_odds", "kl", "pref_acc")


def loss_config(settings: DorpoSettings) -> DorpoConfig:
    """The DORPO loss's weights from ``settings``."""
    return DorpoConfig(lambda_or=settings.lambda_or, lambda_kl=settings.lambda_kl)


def adamw(params: Any, settings: DorpoSettings) -> Any:
    """torch's AdamW over ``params`` at ``settings``' peak learning rate, weight decay and betas (a schedule then
    moves the learning rate). One place, so that a trainer on one machine and the swarm's step alike."""
    import torch

    betas = (settings.adam_beta1, settings.adam_beta2)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=betas)


class TrainConfig(DorpoSettings, StepSettings):
    """The single-machine trainer's settings: :class:`~garden.protocol.mission_spec.DorpoSettings` (the
    hyper-parameters a mission's ``[train]`` shares), :class:`StepSettings`, and

    :param steps: optimizer steps in the whole run
    :param warmup_steps: steps of linear warm-up to the peak ``lr``
    :param checkpoint_every: steps between checkpoints (the last step is always saved)
    :param keep_checkpoints: newest checkpoints kept on disk
    :param max_threads: torch CPU threads (None: torch's default, all cores)
    :param freeze_embeddings: keep the student's token embeddings and output head as the base has them. They are
        the teacher's own (a pruned student shares its vocabulary): trained on a few hundred rows they fit those
        rows' tokens and lose the rest (benchmarks/dorpo_distill.py: held-out KL 1.80 -> 1.67, top-1 agreement
        0.52 -> 0.55; docs/training.md), and they are about half of a small student's parameters"""

    invalid: ClassVar[str | None] = "training settings"

    steps: int = Field(default=200, ge=1)
    warmup_steps: int = Field(default=10, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_threads: int | None = Field(default=None, ge=1)
    freeze_embeddings: bool = True

    def loss_config(self) -> DorpoConfig:
        return loss_config(self)

    def resumable_with(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other`` and would make a resume inexact (all but the thread count)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [k for k in mine if k != "max_threads" and mine[k] != theirs[k]]


@dataclass
class StepReport:
    step: int
    steps: int
    metrics: dict[str, float]
    lr: float
    grad_norm: float
    skipped: bool
    seconds: float

    def record(self) -> dict[str, Any]:
        return {"step": self.step, **self.metrics, "lr": self.lr, "grad_norm": self.grad_norm, "skipped": self.skipped}


@dataclass
class TrainResult:
    steps_done: int
    skipped_steps: int
    metrics: dict[str, float]
    checkpoint: Checkpoint | None
    seconds: float
    data: EncodeReport = field(default_factory=EncodeReport)


def freeze_embeddings_(model: Any) -> None:
    """Stop training the token embeddings and the output head (one matrix when tied), in place."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.requires_grad_(False)


def rows_digest(rows: Sequence[DorpoRow]) -> str:
    """The data's identity, in order: a resume must read the same rows in the same order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(bytes.fromhex(row.row_id))
    return digest.hexdigest()


class DorpoTrainer:
    """Trains ``student`` (a transformers causal LM, possibly a PEFT model) on DORPO ``rows``.

    Use :meth:`train` for the whole run, or :meth:`train_step` one step at a time (the swarm trainer
    drives steps itself). With ``run`` given, checkpoints go there and :meth:`resume` reads them."""

    def __init__(
        self, student: LoadedModel, rows: Sequence[DorpoRow], config: TrainConfig, run: RunDir | None = None
    ) -> None:
        from transformers import get_scheduler

        self.student, self.config, self.run = student, config, run
        self.model = student.model
        self.encoded, self.data_report = encode_rows(rows, student.tokenizer, config.max_length)
        if not self.encoded:
            raise ValueError(
                f"no usable rows: {len(rows)} given, {self.data_report.too_long} longer than max_length "
                f"{config.max_length}"
            )
        self.data_digest = rows_digest(rows)
        self.pad = pad_id(student.tokenizer)
        if config.freeze_embeddings:
            freeze_embeddings_(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = next(iter(self.model.parameters())).device  # batches go where the student is
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = adamw(self.params, config)
        self.scheduler = get_scheduler(
            HF_SCHEDULERS[config.schedule],
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        self.loss_config = config.loss_config()
        self.step = 0
        self.skipped_steps = 0
        self._orders: dict[int, list[int]] = {}

    def replace_rows(self, rows: Sequence[DorpoRow]) -> None:
        """Train on from the next step on ``rows``, as many as before, each in its predecessor's place in the data
        order (the student's fresh answers as rejected ones, :mod:`garden.distill.on_policy`)."""
        encoded, report = encode_rows(rows, self.student.tokenizer, self.config.max_length)
        if len(encoded) != len(self.encoded):
            raise ValueError(f"{len(encoded)} usable rows in place of {len(self.encoded)}: the data order would move")
        self.encoded, self.data_report, self.data_digest = encoded, report, rows_digest(rows)

    # --- data order: a pure function of (seed, step) -------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            if len(self._orders) > 2:  # a step spans at most two epochs: keep the cache small
                self._orders.clear()
            self._orders[epoch] = torch.randperm(len(self.encoded), generator=generator).tolist()
        return self._orders[epoch]

    def micro_batches(self, step: int) -> list[list[EncodedRow]]:
        """The rows of optimizer step ``step`` (0-based), as ``grad_accum`` micro-batches."""
        n, size = len(self.encoded), self.config.batch_size
        first = step * self.config.grad_accum * size
        batches = []
        for m in range(self.config.grad_accum):
            indices = range(first + m * size, first + (m + 1) * size)
            batches.append([self.encoded[self._order(i // n)[i % n]] for i in indices])
        return batches

    # --- one step --------------------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        """Forward/backward over the step's micro-batches, clip, and apply (or skip when not finite)."""
        started = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])
        grads = compute_gradients(
            self.model, self.micro_batches(self.step), self.pad, self.device, self.loss_config, self.params,
            self.config.max_grad_norm,
        )  # fmt: skip
        if grads.finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            logger.warning(
                "step %d: loss or gradient is not finite (loss %s, grad norm %s); skipped, weights unchanged",
                self.step + 1,
                grads.last_loss,
                grads.grad_norm,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return StepReport(
            step=self.step,
            steps=self.config.steps,
            metrics=grads.metrics,
            lr=lr,
            grad_norm=grads.grad_norm,
            skipped=not grads.finite,
            seconds=time.perf_counter() - started,
        )

    # --- the run ---------------------------------------------------------------------------------------
    def train(self, on_step: Callable[[StepReport], None] | None = None, until: int | None = None) -> TrainResult:
        """Train to ``config.steps`` (or to step ``until``), checkpointing every ``checkpoint_every`` steps
        and at the end. Ctrl+C checkpoints the last finished step before it propagates, so nothing is lost."""
        import torch

        if self.config.max_threads:
            torch.set_num_threads(self.config.max_threads)
        started = time.perf_counter()
        last: StepReport | None = None
        checkpoint = None
        end = min(until or self.config.steps, self.config.steps)
        try:
            while self.step < end:
                last = self.train_step()
                if self.run is not None:
                    self.run.append_metrics(last.record())
                if on_step is not None:
                    on_step(last)
                if self.step % self.config.checkpoint_every == 0 or self.step == end:
                    checkpoint = self.save(last.metrics)
        except KeyboardInterrupt:
            if last is not None and (checkpoint is None or checkpoint.step != self.step):
                logger.warning("interrupted: saving step %d before stopping", self.step)
                self.save(last.metrics)
            raise
        return TrainResult(
            steps_done=self.step,
            skipped_steps=self.skipped_steps,
            metrics=last.metrics if last else {},
            checkpoint=checkpoint,
            seconds=time.perf_counter() - started,
            data=self.data_report,
        )

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        import torch

        state: dict[str, Any] = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save(self, metrics: dict[str, float]) -> Checkpoint | None:
        if self.run is None:
            return None
        checkpoint = self.run.save(
            self.step,
            self.model,
            self.student.tokenizer,
            self.state_dict(),
            metrics,
            keep=self.config.keep_checkpoints,
        )
        logger.info("checkpoint %s written", checkpoint.path)
        return checkpoint

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue exactly where ``checkpoint`` stopped: weights, AdamW moments, schedule, RNG and step."""
        import torch

        checkpoint.verify()
        load_weights(self.model, checkpoint)
        state = torch.load(checkpoint.path / "trainer_state.pt", weights_only=True)
        if state["step"] != checkpoint.step:
            raise CheckpointError(f"checkpoint {checkpoint.path}: trainer state is for step {state['step']}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.run is not None:
            self.run.truncate_metrics(self.step)


@dataclass
class StepGradients:
    """What one step's forward/backward left: the metrics (means over micro-batches), the clipped global
    gradient norm, and whether loss and gradient were finite (when not, ``.grad`` is cleared)."""

    metrics: dict[str, float]
    grad_norm: float
    finite: bool
    last_loss: float  # of the last micro-batch run: the non-finite one when ``finite`` is False


def compute_gradients(
    model: Any,
    micro_batches: Sequence[Sequence[EncodedRow]],
    pad: int,
    device: Any,
    loss_config: DorpoConfig,
    params: Sequence[Any],
    max_grad_norm: float,
) -> StepGradients:
    """Accumulate the mean gradient of ``micro_batches`` into ``.grad`` and clip it to ``max_grad_norm``
    (0: no clipping). A non-finite loss stops at that micro-batch; a non-finite loss or norm clears the
    gradients, so that nothing of the step can be applied (here) or sent to peers (the swarm trainer)."""
    import torch

    model.train()
    for p in params:
        p.grad = None
    sums: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    finite = True
    for rows in micro_batches:
        out = dorpo_forward(model, collate(rows, pad).to(device), loss_config)
        for name, value in out.metrics().items():
            sums[name].append(value)
        if not torch.isfinite(out.loss):
            finite = False
            break
        (out.loss / len(micro_batches)).backward()
    grad_norm = math.nan
    if finite:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
        finite = math.isfinite(grad_norm)
    if not finite:
        for p in params:
            p.grad = None
    metrics = {name: _nanmean(values) for name, values in sums.items()}
    return StepGradients(metrics=metrics, grad_norm=grad_norm, finite=finite, last_loss=sums["loss"][-1])


def _nanmean(values: list[float]) -> float:
    """Mean of the finite-or-NaN metric values of a step's micro-batches, ignoring NaN (a micro-batch without
    any rejected answer has no log-odds); NaN when none has a value."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
