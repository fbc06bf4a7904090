"""A swarm trainer's settings and the status it reports: what the daemon reads and writes about trainers, without
loading torch (``garden.collab.trainer``, which runs in the worker, imports it)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from garden.distill.settings import StepSettings
from garden.protocol.mission_spec import Epochs, SwarmSettings, TargetBatchSize, TrainSection, WarmupEpochs


class CollabConfig(SwarmSettings, StepSettings):
    """Everything every trainer of one mission must agree on (the mission's ``[train]``:
    :class:`~garden.protocol.mission_spec.SwarmSettings`), plus this peer's own
    :class:`~garden.distill.trainer.StepSettings` and

    :param load_state_timeout: seconds a late joiner waits for a peer's state

    Built from a mission with :meth:`from_section`. Constructed directly (tests, benchmarks),
    ``target_batch_size`` and ``max_epochs`` must be given and ``warmup_epochs`` defaults to 0.
    """

    invalid: ClassVar[str | None] = "swarm training settings"

    target_batch_size: TargetBatchSize
    max_epochs: Epochs
    warmup_epochs: WarmupEpochs = 0
    load_state_timeout: float = Field(default=60.0, gt=0.0)

    @classmethod
    def from_section(cls, section: TrainSection, **peer: Any) -> CollabConfig:
        """The settings of a mission's ``[train]`` section, with this peer's own ``peer`` settings
        (``batch_size``, ``grad_accum``, ``seed``, ``load_state_timeout``)."""
        shared = section.model_dump(include=set(SwarmSettings.model_fields))
        return cls(**shared, **peer)


class TrainStatus(BaseModel):
    """What a trainer reports (to the daemon, through ``garden.collab.worker.WorkerStatus``, then
    ``GET /missions/{id}`` and ``/metrics``)."""

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
    rows_held_out: int = 0  # rows of the mission's held-out prompts, left for the lead's evaluation
    loaded_state_at_epoch: int | None = None  # the epoch of the first state this peer loaded from peers
    bytes_sent: int = 0  # sent in averaging rounds (garden.collab.hivemind_patches.bytes_sent)
    params_probe: list[float] | None = None  # see CollabTrainer.params_probe, at the last epoch change
    # the probe at each of the last PROBE_EPOCHS epochs (key: the epoch the parameters belong to, as a string for
    # JSON): peers whose round at an epoch succeeded show the same probe there, whatever became of later rounds,
    # and so does a late joiner that loaded the state of that epoch
    probes: dict[str, list[float]] = Field(default_factory=dict)
    last_checkpoint: dict[str, Any] | None = None
    error: str | None = None
    updated_at: float = 0.0
