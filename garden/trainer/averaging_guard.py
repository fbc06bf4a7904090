"""Refuse tensor parts from peers that would poison an averaging round: another shape, or values that are
not finite.

hivemind's all-reduce splits every averaged tensor into parts; each peer reduces some parts (it sums what
every sender sent for them) and sends the average back. A volunteer's broken GPU, a bug, or a hostile
peer can send NaN, inf or a part of the wrong size, and one NaN in a sum makes the whole swarm's model
NaN. hivemind already has the way out: an exception while accumulating a sender's stream bans that
sender for the rest of the round (its data is left out, the others' average goes on), and an exception
while reading a reducer's answer keeps this peer's own values for that part. This module raises those
exceptions for bad data, and logs which peer sent it. A state downloaded by a peer that catches up
(``load_state_from_peers``) is refused too when it holds non-finite values.

hivemind builds its all-reduce objects deep inside the averager (no factory to pass), so the checks are
installed by wrapping two methods, once per process, before the averagers start (they are forked from the
trainer process and inherit the wrap). :func:`install` is idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_installed = False


class RefusedPart(Exception):
    """A tensor part from a peer was refused; hivemind bans the sender for this round."""


def check_part(part: Any, expected_shape: Any, peer: str, what: str) -> None:
    """Raise :class:`RefusedPart` (and log ``peer``) unless ``part`` has ``expected_shape`` and finite values."""
    import torch

    problem = None
    if tuple(part.shape) != tuple(expected_shape):
        problem = f"shape {tuple(part.shape)}, expected {tuple(expected_shape)}"
    elif not bool(torch.isfinite(part).all()):
        problem = "non-finite values"
    if problem is not None:
        logger.warning("refused %s from peer %s: %s; it is left out of this averaging round", what, peer, problem)
        raise RefusedPart(f"{what} from {peer}: {problem}")


def install() -> None:
    global _installed
    if _installed:
        return
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

    original_init = AllReduceRunner.__init__
    original_accumulate = TensorPartReducer.accumulate_part
    original_register = TensorPartContainer.register_processed_part
    original_load_state = DecentralizedAverager.load_state_from_peers

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # who is who, for the checks below: senders (as the reducer counts them) and reducers (by peer index)
        self.tensor_part_reducer.garden_senders = [str(p) for p in self.sender_peer_ids]
        self.tensor_part_container.garden_peers = [str(p) for p in self.ordered_peer_ids]
        self.tensor_part_container.garden_part_shapes = [
            [tuple(part.shape) for part, _ in parts] for parts in self.tensor_part_container._input_parts_by_peer
        ]

    async def accumulate_part(
        self: Any, sender_index: int, part_index: int, tensor_part: Any, weight: float = 1.0
    ) -> Any:
        senders = getattr(self, "garden_senders", None)
        if senders is not None and 0 <= part_index < self.num_parts:
            check_part(tensor_part, self.part_shapes[part_index], senders[sender_index], "a tensor part")
        return await original_accumulate(self, sender_index, part_index, tensor_part, weight)

    def register_processed_part(self: Any, peer_index: int, part_index: int, part: Any) -> None:
        shapes = getattr(self, "garden_part_shapes", None)
        if shapes is not None and part_index < len(shapes[peer_index]):
            check_part(part, shapes[peer_index][part_index], self.garden_peers[peer_index], "an averaged part")
        original_register(self, peer_index, part_index, part)

    def load_state_from_peers(self: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = original_load_state(self, *args, **kwargs)
        if loaded is not None and kwargs.get("wait", True):
            import torch

            _, tensors = loaded
            if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
                logger.warning("refused a state downloaded from a peer: it holds non-finite values")
                return None  # hivemind reads this as "no state loaded" and tries again later
        return loaded

    AllReduceRunner.__init__ = init  # type: ignore[method-assign]
    TensorPartReducer.accumulate_part = accumulate_part  # type: ignore[method-assign]
    TensorPartContainer.register_processed_part = register_processed_part  # type: ignore[method-assign]
    DecentralizedAverager.load_state_from_peers = load_state_from_peers  # type: ignore[method-assign]
    _installed = True
