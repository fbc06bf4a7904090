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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from garden.models import LoadedModel
from garden.protocol.rows import DorpoRow
from garden.encoding import pad_id
from garden.trainer.checkpoint import Checkpoint, CheckpointError, RunDir, load_weights
from garden.trainer.collate import EncodedRow, EncodeReport, collate, dorpo_forward, encode_rows
from garden.trainer.dorpo import DorpoConfig

logger = logging.getLogger(__name__)

Schedule = Literal["cosine", "linear", "constant"]
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
METRIC_NAMES = ("loss", "nll", "or_loss", "log_odds", "kl", "pref_acc")


@dataclass(frozen=True)
class TrainConfig:
    """:param steps: optimizer steps in the whole run
    :param batch_size: rows per forward pass (memory grows with it)
    :param grad_accum: forward passes per step (a step sees ``batch_size * grad_accum`` rows)
    :param lr: peak learning rate, reached after ``warmup_steps``
    :param schedule: decay after the warm-up: cosine or linear to 0, or constant
    :param max_grad_norm: clip the gradient's global norm to this (0: no clipping)
    :param checkpoint_every: steps between checkpoints (the last step is always saved)
    :param keep_checkpoints: newest checkpoints kept on disk
    :param max_length: longest prompt + answer in tokens; longer rows are left out
    :param lambda_or: weight of the odds-ratio (preference) term; 0 with ``lambda_kl`` 0 is plain SFT
    :param lambda_kl: weight of the top-k KL to the teacher
    :param max_threads: torch CPU threads (None: torch's default, all cores)"""

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    max_length: int = 512
    lambda_or: float = 0.1
    lambda_kl: float = 1.0
    max_threads: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "weight_decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "schedule": self.schedule in _SCHEDULERS,
            "max_grad_norm": math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "max_length": self.max_length >= 8,
            "max_threads": self.max_threads is None or self.max_threads >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        self.loss_config()  # validates the lambdas

    def loss_config(self) -> DorpoConfig:
        return DorpoConfig(lambda_or=self.lambda_or, lambda_kl=self.lambda_kl)

    def resumable_with(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other`` and would make a resume inexact (all but the thread count)."""
        mine, theirs = asdict(self), asdict(other)
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
        import torch
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
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device = next(iter(self.model.parameters())).device  # batches go where the student is
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(
            _SCHEDULERS[config.schedule],
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
        )
        self.loss_config = config.loss_config()
        self.step = 0
        self.skipped_steps = 0
        self._orders: dict[int, list[int]] = {}

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
