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
  model and throwing it away; the state it loads is one a peer held whole at the epoch it is labelled with
  ("states served whole" in :mod:`garden.collab.hivemind_patches`);
* with ``min_trainers`` above 1, no trainer takes its first step before that many are in the swarm's progress
  record, so that a run meant for several peers is not trained by the first one alone;
* a step whose loss or gradient is not finite never reaches ``Optimizer.step``: its gradients are
  dropped here, so they are neither applied nor counted nor sent to peers;
* what arrives from peers is checked too (the guard in :mod:`garden.collab.hivemind_patches`): a part of a tensor
  with another shape or non-finite values is refused, the sender is logged, and the round goes on;
* and what peers claim counts within bounds (:mod:`garden.collab.robust`): a sender's weight, its part (clipped
  around the round's median), its epoch, and the state a joining peer loads.

This module runs inside the trainer worker process (``garden.collab.worker``), because
``hivemind.Optimizer`` must own the main thread of its process.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any


from garden.collab import hivemind_patches
from garden.collab.settings import CollabConfig, TrainStatus
from garden.models.chat import pad_id
from garden.models.loading import LoadedModel
from garden.protocol.rows import DorpoRow
from garden.distill.collate import EncodedRow, EncodeReport, encode_rows
from garden.distill.trainer import (
    HF_SCHEDULERS,
    StepGradients,
    adamw,
    compute_gradients,
    freeze_embeddings_,
    loss_config,
)
from garden.protocol.mission_spec import Compression, TrainMode

logger = logging.getLogger(__name__)

__all__ = ["CollabConfig", "CollabTrainer", "TrainStatus", "make_compression", "make_optimizer"]
Mode = TrainMode
CompressionName = Compression
SMALL_TENSOR = 2**16
"""Elements below which a tensor is sent in fp16 even in ``8bit`` mode (norm weights, biases): quantizing a
vector of 576 norm gains to 256 levels costs more accuracy than the bytes it saves."""
LOAD_RETRY_S = 0.5
"""Seconds between a late joiner's attempts to load the swarm's state (see :meth:`CollabTrainer.sync_with_peers`)."""
PRESENCE_PERIOD_S = 10.0
"""Seconds between the progress records a trainer waiting for ``min_trainers`` stores (they live a minute)."""


def make_compression(name: CompressionName) -> Any:
    """hivemind's compression for ``name``."""
    from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression

    from garden.collab import hivemind_patches
    from garden.collab.compression import Uniform8Bit

    hivemind_patches.install_decoder()  # hivemind's own 8-bit decoder fails on numpy 2: see garden.collab.compression

    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return SizeAdaptiveCompression(threshold=SMALL_TENSOR, less=Float16Compression(), greater_equal=Uniform8Bit())
    raise ValueError(f"unknown compression {name!r}: none, fp16 or 8bit")


def make_optimizer(dht: Any, run_id: str, params: Sequence[Any], config: CollabConfig) -> Any:
    """``hivemind.Optimizer`` over ``params`` (AdamW inside) for ``config``'s mode and compression.
    ``run_id`` is the mission id: peers of other missions never average with these."""
    import hivemind
    import torch
    from hivemind.compression import NoCompression
    from transformers import get_scheduler

    compression = make_compression(config.compression)

    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(
            HF_SCHEDULERS[config.schedule],
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
        optimizer=functools.partial(adamw, settings=config),
        scheduler=schedule,
        matchmaking_time=config.matchmaking_time,
        averaging_timeout=config.averaging_timeout,
        load_state_timeout=config.load_state_timeout,
        use_local_updates=local,
        # sync: a parameter round at every average_state_every-th epoch (hivemind counts by the swarm's epoch, so
        # every peer holds it at the same epochs); local: every epoch, as its round
        average_state_every=1 if local else config.average_state_every,
        # the averaged state must be in hand when the epoch ends: in sync mode for the step, in local mode
        # for the outer step (garden.collab.trainer.OuterStep) that follows the round
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
            for p, anchor, buffer in zip(self.params, self.anchor, self.buffer, strict=True):
                delta = anchor - p
                buffer.mul_(self.momentum).add_(delta)
                anchor.sub_(delta + self.momentum * buffer, alpha=self.lr)
                p.copy_(anchor)

    def restart(self) -> None:
        """The parameters came from elsewhere (state loaded from peers): anchor there, forget momentum."""
        import torch

        with torch.no_grad():
            for p, anchor, buffer in zip(self.params, self.anchor, self.buffer, strict=True):
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
        if config.freeze_embeddings:  # every trainer of the mission does the same: their parameters match
            freeze_embeddings_(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.device = self.params[0].device
        self.pad = pad_id(student.tokenizer)
        self.loss_config = loss_config(config)
        self.encoded: list[EncodedRow] = []
        self.encode_report = EncodeReport()
        self._seen: set[str] = set()
        self._generator = torch.Generator().manual_seed(config.seed * 1_000_003 + peer_seed)
        self.status = TrainStatus(max_epochs=config.max_epochs)
        self.optimizer = make_opt(self.params)
        plain = config.outer_lr == 1.0 and config.outer_momentum == 0.0  # the outer step would be the identity
        self.outer = (
            OuterStep(self.params, config.outer_lr, config.outer_momentum)
            if config.mode == "local" and not plain
            else None
        )
        self._started = time.monotonic()
        self._enough_trainers = config.min_trainers <= 1  # once met, training goes on whoever leaves
        self._presence_at = -float("inf")

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

    @property
    def params_epoch(self) -> int:
        """The epoch this peer's parameters belong to: :attr:`epoch`, except after hivemind advanced the epoch of a
        peer that caught up without giving it that epoch's parameters (until its next round)."""
        return hivemind_patches.params_epoch(self.optimizer.state_averager)

    def state_mark(self) -> tuple[int, int]:
        """``(params_epoch, states loaded)``: it changes when the parameters become another epoch's or a state is
        loaded from peers (the worker notes a probe and maybe a checkpoint then)."""
        return self.params_epoch, hivemind_patches.loaded_states(self.optimizer.state_averager)

    def sync_with_peers(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Before the first step: when the swarm is past this peer's epoch, load its state (parameters, optimizer,
        epoch); then note the probe of the parameters it starts from (:meth:`record_probe`). Returns whether it
        loaded. Waits for hivemind's first progress report to know.

        A load counts when this peer then holds the parameters a peer served under the epoch it holds (peers serve
        only whole states: "states served whole" in :mod:`garden.collab.hivemind_patches`, which the worker
        installs). While no peer serves one (each is moving to the next epoch), or while the state loaded is
        behind the swarm's epoch (the swarm moved on while it was on its way), it asks again, for as long as a
        peer may take to move to the next epoch (``matchmaking_time + averaging_timeout``, at most
        ``load_state_timeout``) or until ``stopped()``; then it keeps what it holds (a swarm whose peers are gone
        serves nothing), and hivemind loads again at this peer's first step as for any peer out of sync."""
        tracker = self.optimizer.tracker
        # in the progress record from the start (hivemind stores an entry only once a trainer has samples): the
        # others count this trainer as present, and weigh a stranger's epoch claim against it (garden.collab.robust)
        hivemind_patches.report_presence(tracker)
        self._presence_at = time.monotonic()
        tracker.fetched_global_progress_this_epoch.wait(timeout=self.config.load_state_timeout)
        loaded = tracker.global_epoch > self.params_epoch and self._load_state(stopped)
        self.record_probe()
        return loaded

    def catch_up(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """At the last epoch: when hivemind moved this peer to it without its parameters (it missed the round and
        caught up: hivemind's optimizer sets the epoch after loading a state one epoch behind), load the state of
        a peer that holds them (the peers that finished serve theirs while they linger). Returns whether it
        loaded. Without this, such a peer said "done" holding the parameters of the epoch before, and wrote no
        checkpoint of the last one."""
        if self.params_epoch >= self.epoch:
            return False
        logger.info("reached epoch %d holding the parameters of epoch %d: loading the swarm's state",
                    self.epoch, self.params_epoch)  # fmt: skip
        return self._load_state(stopped)

    def _load_state(self, stopped: Callable[[], bool]) -> bool:
        averager, tracker = self.optimizer.state_averager, self.optimizer.tracker
        logger.info("the swarm is at epoch %d: loading its state", tracker.global_epoch)
        self.status.state = "loading state from peers"
        window = min(self.config.load_state_timeout, self.config.matchmaking_time + self.config.averaging_timeout)
        deadline = time.monotonic() + window
        loads = first = hivemind_patches.loaded_states(averager)
        while True:
            self.optimizer.load_state_from_peers()
            if hivemind_patches.loaded_states(averager) > loads:
                loads = hivemind_patches.loaded_states(averager)
                # the epoch too: a peer that loaded the last epoch's state takes no step, which would have set it
                self.status.loaded_state_at_epoch, self.status.epoch = self.params_epoch, self.epoch
                if self.outer is not None:
                    self.outer.restart()
                if self.params_epoch >= max(tracker.global_epoch, self.epoch):
                    return True
                logger.info("loaded the state of epoch %d, but the swarm is at epoch %d: loading again",
                            self.params_epoch, max(tracker.global_epoch, self.epoch))  # fmt: skip
            if stopped() or time.monotonic() >= deadline:
                break
            time.sleep(LOAD_RETRY_S)
        if loads == first:
            logger.warning("no peer served its state within %.0f s: keeping this peer's", window)
            return False
        logger.info("keeping the state of epoch %d loaded from a peer", self.params_epoch)
        return True

    def trainers_behind(self) -> int:
        """How many other trainers the swarm's progress record shows at an epoch below this peer's (garden's checks
        of the record applied, client-mode trainers counted too): a peer that is done keeps serving its state while
        there are some (``garden.collab.worker``), since one that falls behind can only catch up from a peer that
        holds the last epoch's parameters."""
        from hivemind.optim.progress_tracker import LocalTrainingProgress

        from garden.collab.robust_hivemind import credible_progress

        tracker = self.optimizer.tracker
        found = tracker.dht.get(tracker.training_progress_key, latest=True)
        if found is None or not isinstance(found.value, dict) or not found.value:
            return 0
        behind = 0
        for key, item in credible_progress(tracker, found.value).items():
            if key == tracker._local_public_key or getattr(item, "value", None) is None:
                continue
            try:
                progress = LocalTrainingProgress.parse_obj(item.value)
            except Exception:  # noqa: BLE001 - not progress: nobody to wait for
                continue
            behind += progress.epoch < self.epoch
        return behind

    def _trainers_present(self) -> bool:
        """Whether this peer may step: ``min_trainers`` trainers are (or once were) in hivemind's progress record,
        as this peer's hivemind tracker last read it (the view hivemind's rounds go by: a trainer that starts on a
        fresher view than its tracker's would average alone). While they are not, it stores its own entry every
        :data:`PRESENCE_PERIOD_S` (hivemind stores none before a trainer's first step), asks the tracker to read
        the record again (by itself it may wait 10 s: with each call asking, waiting trainers start within a call
        of each other) and says what it waits for."""
        if self._enough_trainers:
            return True
        tracker = self.optimizer.tracker
        present = int(tracker.global_progress.num_peers)
        if present >= self.config.min_trainers:
            logger.info("%d trainers in the swarm: training starts", present)
            self._enough_trainers = True
            tracker.performance_ema.reset_timer()  # the wait is not this peer's speed
            return True
        now = time.monotonic()
        if now - self._presence_at >= PRESENCE_PERIOD_S:
            hivemind_patches.report_presence(tracker)
            self._presence_at = now
        hivemind_patches.refresh_progress(tracker)
        self.status.state = f"waiting for {self.config.min_trainers} trainers ({present} present)"
        self.status.peers = present
        self.status.updated_at = time.time()
        return False

    def step(self) -> StepGradients | None:
        """One local step (``batch_size * grad_accum`` rows); None when there are no rows yet or fewer than
        ``min_trainers`` trainers in the swarm (the caller waits a moment and calls again), and when the trainer is
        :attr:`done`: a late peer that loaded the swarm's state of the last epoch has nothing left to train (CI saw
        one step on into an epoch past ``max_epochs``, alone)."""
        if self.done:
            return None
        if not self.encoded:
            self.status.state = "waiting for rows"
            return None
        if not self._trainers_present():
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
            averager = self.optimizer.state_averager
            epoch, loads = self.epoch, hivemind_patches.loaded_states(averager)
            self.optimizer.step()  # hivemind may load the swarm's state here instead (this peer was out of sync)
            if hivemind_patches.loaded_states(averager) > loads and self.status.loaded_state_at_epoch is None:
                self.status.loaded_state_at_epoch = self.params_epoch
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
        """Note the probe in the status, under the epoch the parameters belong to (see :attr:`TrainStatus.probes`)."""
        probe = self.params_probe()
        self.status.params_probe = probe
        self.status.probes[str(self.params_epoch)] = probe
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
