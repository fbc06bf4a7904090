"""What one machine chooses for its own training steps, apart from the trainer that runs them: the daemon reads
these settings without loading torch (``garden.distill.trainer`` imports it)."""

from __future__ import annotations

from pydantic import Field

from garden.protocol.mission_spec import Settings


class StepSettings(Settings):
    """What one machine chooses for itself, whether it trains alone (:class:`TrainConfig`) or in a swarm
    (``garden.collab.trainer.CollabConfig``).

    :param batch_size: rows per forward pass (memory grows with it)
    :param grad_accum: forward passes per step (a step sees ``batch_size * grad_accum`` rows)
    :param seed: seed of the data order (and of a LoRA adapter's initial weights)
    """

    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    seed: int = 0

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum
