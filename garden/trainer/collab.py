"""Collaborative DORPO training: one peer's share of a swarm that trains one student together.

Every trainer of a mission builds the same student from the spec, computes DORPO gradients on the rows
it holds, and hands them to ``hivemind.Optimizer`` under ``run_id = <mission id>``. hivemind counts the
samples of all peers; once they reach ``target_batch_size`` the peers average (gradients in ``sync``
mode, parameters in ``local`` mode) with a fault-tolerant all-reduce, and every peer applies the same
update: one model, trained by whoever is online.

Why these choices:

* one *epoch* is hivemind's: ``target_batch_size`` samples across the swarm, not a pass over the data.
  The learning-rate schedule runs on epochs (hivemind steps the scheduler at each), so a peer that
  joins late gets the same learning rate as the others;
* a late joiner loads parameters, optimizer state and epoch from peers *before* its first step
  (:meth:`CollabTrainer.sync_with_peers`), rather than computing one batch of gradients on a stale
  model and throwing it away;
* a step whose loss or gradient is not finite never reaches ``Optimizer.step``: its gradients are
  dropped here, so they are neither applied nor counted nor sent to peers;
* what arrives from peers is checked too (:class:`garden.trainer.averaging_guard`): a part of a tensor
  with another shape or non-finite values is refused, the sender is logged, and the round goes on.

This module runs inside the trainer worker process (``garden.trainer.train_worker``), because
``hivemind.Optimizer`` must own the main thread of its process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from garden.encoding import pad_id
from garden.models import LoadedModel
from garden.protocol.rows import DorpoRow
from garden.trainer.collate import EncodedRow, EncodeReport, encode_rows
from garden.trainer.train import _SCHEDULERS, Schedule, StepGradients, compute_gradients

logger = logging.getLogger(__name__)

Mode = Literal["sync", "local"]
CompressionName = Literal["none", "fp16", "8bit"]
SMALL_TENSOR = 2**16
"""Elements below which a tensor is sent in fp16 even in ``8bit`` mode (norm weights, biases): quantizing a
vector of 576 norm gains to 256 levels costs more accuracy than the bytes it saves."""


@dataclass(frozen=True)
class CollabConfig:
    """Everything every trainer of one mission must agree on, plus this peer's own batch sizes.

    :param target_batch_size: samples (rows) across the swarm per epoch
    :param batch_size: rows per forward pass on this peer (memory grows with it)
    :param grad_accum: forward passes per hivemind step on this peer
    :param max_epochs: the run ends at this epoch; also the length of the learning-rate schedule
    :param warmup_epochs: epochs of linear warm-up before ``schedule`` decays
    :param mode: ``sync`` averages gradients every epoch (equivalent to one big batch); ``local`` steps on
        its own and averages parameters every epoch, then takes an outer step (DiLoCo: far fewer bytes per
        sample)
    :param outer_lr: ``local`` mode: the outer SGD learning rate on the pseudo-gradient (parameters at the
        last round minus their average now); 1 with ``outer_momentum`` 0 is plain averaging
    :param outer_momentum: ``local`` mode: Nesterov momentum of the outer step (DiLoCo uses 0.7 and 0.9). The
        anchor and momentum are each peer's own: a peer that misses a round keeps another anchor from then
        on, so the outer step suits swarms whose peers rarely miss rounds; the default is plain averaging
    :param compression: how averaged tensors travel: ``none`` (fp32), ``fp16``, or ``8bit`` (uniform
        8-bit quantization for large tensors, fp16 for small ones)
    :param matchmaking_time: seconds a peer waits to gather others for an averaging round
    :param averaging_timeout: seconds a round may take before the peers that answered go on without the
        others (a peer killed mid-round holds the rest up for at most this long)
    :param load_state_timeout: seconds a late joiner waits for a peer's state
    """

    target_batch_size: int
    max_epochs: int
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0
    max_length: int = 512
    lambda_or: float = 0.1
    lambda_kl: float = 1.0
    mode: Mode = "sync"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    compression: CompressionName = "none"
    matchmaking_time: float = 5.0
    averaging_timeout: float = 30.0
    load_state_timeout: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "target_batch_size": self.target_batch_size >= 1,
            "max_epochs": self.max_epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "warmup_epochs": 0 <= self.warmup_epochs <= self.max_epochs,
            "schedule": self.schedule in _SCHEDULERS,
            "max_grad_norm": math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            "mode": self.mode in ("sync", "local"),
            "outer_lr": math.isfinite(self.outer_lr) and 0 < self.outer_lr <= 10,
            "outer_momentum": 0 <= self.outer_momentum < 1,
            "compression": self.compression in ("none", "fp16", "8bit"),
            "matchmaking_time": self.matchmaking_time > 0,
            "averaging_timeout": self.averaging_timeout > 0,
            "load_state_timeout": self.load_state_timeout > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid swarm training settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def make_compression(name: CompressionName) -> Any:
    """hivemind's compression for ``name``."""
    from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression

    from garden.trainer.compression import Uniform8Bit, install

    install()  # hivemind's own 8-bit decoder fails on numpy 2: see garden.trainer.compression

    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return SizeAdaptiveCompression(
            threshold=SMALL_TENSOR, less=Float16Compression(), greater_equal=Uniform8Bit()
        )
    raise ValueError(f"unknown compression {name!r}: none, fp16 or 8bit")


def make_optimizer(dht: Any, run_id: str, params: Sequence[Any], config: CollabConfig) -> Any:
    """``hivemind.Optimizer`` over ``params`` (AdamW inside) for ``config``'s mode and compression.
    ``run_id`` is the mission id: peers of other missions never average with these."""
    import hivemind
    import torch
    from hivemind.compression import NoCompression
    from transformers import get_scheduler

    compression = make_compression(config.compression)

    def adamw(parameters: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)

    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(
            _SCHEDULERS[config.schedule],
            optimizer,
            num_warmup_steps=config.warmup_epochs,
            num_training_steps=config.max_epochs,
        )

    local = config.mode == "local"
    optimizer = hivemind.Optimizer(
        dht=dht,
        run_id=run_id,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=config.samples_per_step,
        params=list(params),
        optimizer=adamw,
        scheduler=schedule,
        matchmaking_time=config.matchmaking_time,
        averaging_timeout=config.averaging_timeout,
        load_state_timeout=config.load_state_timeout,
        use_local_updates=local,
        average_state_every=1,
        # the averaged state must be in hand when the epoch ends: in sync mode for the step, in local mode
        # for the outer step (garden.trainer.collab.OuterStep) that follows the round
        delay_state_averaging=False,
        grad_compression=compression,
        state_averaging_compression=compression,
        load_state_compression=NoCompression(),  # a late joiner gets the exact state
        client_mode=dht.client_mode,
        # hivemind warns (and can deadlock) when a matchmaking request may outlast matchmaking itself
        averager_opts={"request_timeout": min(3.0, config.matchmaking_time / 2)},
        verbose=True,  # each round's outcome at INFO (the worker shows them: see train_worker.main)
    )
    # hivemind pre-schedules a parameter-averaging round (so that peers meet at the swarm's ETA for the
    # epoch's end, not each at the moment it notices) only once it has timed one such round, and it times
    # only pre-scheduled rounds: never, unless primed. Without this, local mode's rounds form only when
    # peers happen to see the epoch end within matchmaking_time of each other. (Sync mode's state rounds
    # follow its gradient rounds, which hivemind pre-schedules itself, so peers already meet there.)
    if local:
        optimizer.delay_before_state_averaging.update(task_size=1, interval=0.0)
    return optimizer


@dataclass
class TrainStatus:
    """What a trainer reports (to the daemon, then ``GET /missions/{id}`` and ``/metrics``)."""

    state: str = "starting"
    epoch: int = 0
    max_epochs: int = 0
    steps: int = 0
    samples: int = 0  # rows this peer trained on
    samples_per_s: float = 0.0  # this peer's rate (hivemind's moving average)
    peers: int = 0  # trainers in the swarm's latest progress report
    loss: float | None = None
    kl: float | None = None
    pref_acc: float | None = None
    skipped_steps: int = 0
    rows: int = 0  # usable rows this peer holds
    rows_skipped: int = 0  # stored rows that failed validation or were too long
    loaded_state_at_epoch: int | None = None
    bytes_sent: int = 0  # sent in averaging rounds (garden.trainer.averaging_meter)
    params_probe: list[float] | None = None  # see CollabTrainer.params_probe, at the last epoch change
    # the probe at each of the last PROBE_EPOCHS epochs (key: the epoch, as a string for JSON): peers whose
    # round at an epoch succeeded show the same probe there, whatever became of later rounds
    probes: dict[str, list[float]] = field(default_factory=dict)
    last_checkpoint: dict[str, Any] | None = None
    error: str | None = None
    updated_at: float = 0.0


PROBE_EPOCHS = 16


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class OuterStep:
    """DiLoCo's outer optimizer for ``local`` mode: after each averaging round the pseudo-gradient
    ``anchor - averaged`` (the anchor being the parameters after the previous round) takes a Nesterov SGD
    step from the anchor, and the result becomes both the parameters and the next anchor.

    Every peer in a round sees the same averaged parameters and the same anchor, so they stay identical;
    a peer that loaded the swarm's state starts from it with no momentum (the buffer is not shared), which
    only slows its first outer steps."""

    def __init__(self, params: Sequence[Any], lr: float, momentum: float):
        import torch

        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.anchor = [p.detach().clone() for p in self.params]
        self.buffer = [torch.zeros_like(p) for p in self.params]

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for p, anchor, buffer in zip(self.params, self.anchor, self.buffer):
                delta = anchor - p
                buffer.mul_(self.momentum).add_(delta)
                anchor.sub_(delta + self.momentum * buffer, alpha=self.lr)
                p.copy_(anchor)

    def restart(self) -> None:
        """The parameters came from elsewhere (state loaded from peers): anchor there, forget momentum."""
        import torch

        with torch.no_grad():
            for p, anchor, buffer in zip(self.params, self.anchor, self.buffer):
                anchor.copy_(p)
                buffer.zero_()


class CollabTrainer:
    """Steps the student on the rows this peer holds, through ``hivemind.Optimizer``.

    :param student: the student, built from the mission spec (the same on every peer)
    :param config: the mission's swarm-training settings
    :param make_opt: ``(params) -> hivemind.Optimizer`` (``make_optimizer`` bound to a DHT and run id)
    :param peer_seed: this peer's data-order seed (its peer id hashed): peers sample different rows
    """

    def __init__(
        self,
        student: LoadedModel,
        config: CollabConfig,
        make_opt: Callable[[Sequence[Any]], Any],
        peer_seed: int = 0,
    ) -> None:
        import torch

        self.student, self.config = student, config
        self.model = student.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.device = self.params[0].device
        self.pad = pad_id(student.tokenizer)
        self.loss_config = _loss_config(config)
        self.encoded: list[EncodedRow] = []
        self.encode_report = EncodeReport()
        self._seen: set[str] = set()
        self._generator = torch.Generator().manual_seed(config.seed * 1_000_003 + peer_seed)
        self.status = TrainStatus(max_epochs=config.max_epochs)
        self.optimizer = make_opt(self.params)
        plain = config.outer_lr == 1.0 and config.outer_momentum == 0.0  # the outer step would be the identity
        self.outer = (
            OuterStep(self.params, config.outer_lr, config.outer_momentum) if config.mode == "local" and not plain else None
        )
        self._started = time.monotonic()

    # --- data ------------------------------------------------------------------------------------------
    def add_rows(self, rows: Sequence[DorpoRow]) -> int:
        """Encode rows not seen before for the student; returns how many became usable."""
        fresh = [r for r in rows if r.row_id not in self._seen]
        self._seen.update(r.row_id for r in fresh)
        encoded, report = encode_rows(fresh, self.student.tokenizer, self.config.max_length)
        self.encoded.extend(encoded)
        self.encode_report.kept += report.kept
        self.encode_report.too_long += report.too_long
        self.encode_report.hard_labels += report.hard_labels
        self.status.rows = len(self.encoded)
        return len(encoded)

    def _micro_batches(self) -> list[list[EncodedRow]]:
        import torch

        n = len(self.encoded)
        picks = torch.randint(n, (self.config.samples_per_step,), generator=self._generator).tolist()
        size = self.config.batch_size
        return [[self.encoded[i] for i in picks[j : j + size]] for j in range(0, len(picks), size)]

    # --- hivemind ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self.optimizer.local_epoch)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.max_epochs

    def sync_with_peers(self) -> bool:
        """Before the first step: when the swarm is past epoch 0, load its state (parameters, optimizer,
        epoch). Returns whether it did. Waits for hivemind's first progress report to know."""
        tracker = self.optimizer.tracker
        tracker.fetched_global_progress_this_epoch.wait(timeout=self.config.load_state_timeout)
        if tracker.global_epoch <= self.epoch:
            return False
        logger.info("the swarm is at epoch %d: loading its state before the first step", tracker.global_epoch)
        self.status.state = "loading state from peers"
        self.optimizer.load_state_from_peers()
        self.status.loaded_state_at_epoch = self.epoch
        if self.outer is not None:
            self.outer.restart()
        return True

    def step(self) -> StepGradients | None:
        """One local step (``batch_size * grad_accum`` rows); None when there are no rows yet."""
        if not self.encoded:
            self.status.state = "waiting for rows"
            return None
        grads = compute_gradients(
            self.model, self._micro_batches(), self.pad, self.device, self.loss_config, self.params,
            self.config.max_grad_norm,
        )  # fmt: skip
        if not grads.finite:
            # dropped here: not applied, not counted towards the epoch, not sent to any peer
            self.status.skipped_steps += 1
            logger.warning(
                "step %d: loss or gradient is not finite (loss %s, grad norm %s); not applied, not sent",
                self.status.steps + 1, grads.last_loss, grads.grad_norm,
            )  # fmt: skip
        else:
            epoch = self.epoch
            self.optimizer.step()
            self.status.samples += self.config.samples_per_step
            if self.outer is not None and self.epoch != epoch:
                if self.epoch == epoch + 1:
                    self.outer.step()  # the round just averaged the parameters
                else:  # hivemind caught this peer up with the swarm's state
                    self.outer.restart()
        self.optimizer.zero_grad()
        self.status.steps += 1
        self._report(grads)
        return grads

    def _report(self, grads: StepGradients) -> None:
        status, tracker = self.status, self.optimizer.tracker
        status.state = "training" if not self.done else "done"
        status.epoch = self.epoch
        status.peers = int(tracker.global_progress.num_peers)
        status.samples_per_s = float(tracker.performance_ema.samples_per_second)
        if grads.finite:
            status.loss = _finite_or_none(grads.metrics["loss"])
            status.kl = _finite_or_none(grads.metrics["kl"])
            status.pref_acc = _finite_or_none(grads.metrics["pref_acc"])
        status.rows_skipped = self.encode_report.too_long
        status.updated_at = time.time()

    def parameters_vector(self) -> Any:
        """All trainable parameters, flattened."""
        import torch

        return torch.cat([p.detach().reshape(-1).cpu() for p in self.params])

    def record_probe(self) -> None:
        """Note this epoch's probe in the status (see :attr:`TrainStatus.probes`)."""
        probe = self.params_probe()
        self.status.params_probe = probe
        self.status.probes[str(self.epoch)] = probe
        for old in sorted(self.status.probes, key=int)[:-PROBE_EPOCHS]:
            del self.status.probes[old]

    def params_probe(self) -> list[float]:
        """Three numbers that summarise the trainable parameters (sum, sum of squares, a position-weighted
        sum, in float64): peers that hold the same model show the same probe, so a user (or a test) can
        see that the swarm trains one model without moving it."""
        import torch

        sums = torch.zeros(3, dtype=torch.float64)
        for p in self.params:
            x = p.detach().reshape(-1).double().cpu()
            weights = torch.arange(x.numel(), dtype=torch.float64).remainder_(7).add_(1)
            sums += torch.stack([x.sum(), x.square().sum(), (x * weights).sum()])
        return [float(v) for v in sums]

    def shutdown(self) -> None:
        self.optimizer.shutdown()


def _loss_config(config: CollabConfig) -> Any:
    from garden.trainer.dorpo import DorpoConfig

    return DorpoConfig(lambda_or=config.lambda_or, lambda_kl=config.lambda_kl)
