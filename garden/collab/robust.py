"""Robust averaging: the rules by which a trainer weighs what other peers claim while training together. Pure
policies (data in, decision out); :mod:`garden.collab.hivemind_patches` applies them inside hivemind.

The swarm is open, so any peer in an averaging round may be a stranger who lies. What it can lie about, and the
rule for each:

* **its weight** (how much its tensor counts in the average; in ``sync`` mode hivemind sends the samples it
  accumulated, else 1). hivemind divides by the sum of the senders' weights: one weight of 1e30 makes the
  average that sender's tensor. Two rules. A weight above :func:`weight_limit` (set by the trainer from what any
  peer can have trained in a round: a few times the swarm's ``target_batch_size``, since an epoch ends when the
  swarm reaches it) is a lie no honest peer can tell: :mod:`garden.collab.hivemind_patches` leaves such a part out
  of the round, as a NaN weight. Below that, :func:`bound_weights`: no sender weighs more than
  :data:`WEIGHT_RATIO` times the round's median weight (of the positive weights; the upper one of an even count),
  so in a round of three or more a sender that claims to have trained more than the median sender counts as the
  median. Honest peers of similar speed are barely affected; a peer many times faster than the median counts as
  the median (its gradient is still averaged, at the weight of a median peer's). In a round of two there is no
  median to trust (the upper one is the larger weight: a peer that trained the whole epoch beside one that joined
  with a step keeps its weight), and the clip below bounds the other sender's influence whatever its weight.
* **its part** (a slice of a tensor: gradients or parameters). A finite part a million times larger than the
  others moves a plain average a million-fold. :func:`centered_clip` (CenteredClip: Karimireddy, He and Jaggi
  2021; Gorbunov et al. 2022, BTARD) starts from the coordinate-wise median of the parts and iterates
  ``v <- v + sum_i w_i (x_i - v) min(1, tau / |x_i - v|) / sum_i w_i`` (:data:`CLIP_ITERATIONS` times at most).
  ``tau`` is :data:`CLIP_RADIUS` times the distance of the median sender's part from the start (the
  ``(n // 2 + 1)``-th smallest distance: a part of the honest majority whenever a strict majority of the senders
  is honest), so it scales with how far honest parts lie from each other, not with anything one sender controls.
  When no part is farther than ``tau`` from the start, one iteration gives exactly the weighted mean and the next
  ones leave it there: honest averaging is unchanged. A part farther away counts as a part ``tau`` away in its
  direction, so one sender of weight share ``d`` moves the result by about ``d / (1 - d) * tau`` at most from the
  honest senders' mean, whatever it sends.
  Before the iterations, a part farther than :data:`DROP_RADIUS` times that median distance from the start is left
  out altogether (weight 0): honest parts are never that far, and a part that far carries nothing but its sender's
  pull, which clipping alone would still add as noise of ``tau`` in the liar's direction in every round. (Dense
  honest gradients lie at nearly equal distances; the sparse embedding gradients of a small DORPO batch were
  measured more than 4 times apart, hence the wide margin.)

  With two senders there is no majority to find: the median is the midpoint, which one sender moves at will. A
  reducer that is one of the two (the usual case) takes one step from its own part instead, towards the other's
  clipped at ``CLIP_RADIUS`` times its own part's norm: the weighted mean when the parts are that close (honest
  ones of similar batch sizes are), and otherwise a result at most ``CLIP_RADIUS`` times its own part's norm away
  from it, whatever the other's weight (bounded, not outvoted); a part more than :data:`DROP_RADIUS` times its own
  part's norm away is left out. Rounds of three or more senders with an honest
  majority are what keeps one stranger's influence within the honest spread.
* **its epoch** (the progress record, and the priority under which it offers its state). hivemind takes the
  swarm's epoch as the largest any peer claims, and downloads a state from whoever claims the highest priority: a
  peer claiming ``max_epochs`` makes every other load its parameters and stop. :func:`epoch_ceiling`: a claim
  more than :data:`EPOCH_MARGIN` epochs ahead of the median of the other trainers' claims is ignored (the lower
  median: with one honest peer and one liar, the honest one's). A claim behind this peer's own epoch counts as
  this peer's epoch (a trainer that left or has not caught up yet is no evidence that the swarm is behind), so a
  peer that fell behind follows the others, and a peer joining late follows the swarm. With a single other
  trainer its claim stands: there is nothing to compare it with. The same rule picks the peers a joining peer
  asks for a state (their priority is their epoch), and refuses a state labelled with an epoch above it.
* **its state** (what a joining peer loads). :func:`states_agree`: the first state served is loaded once a second
  peer's parameters agree with it (distance below :data:`STATE_AGREEMENT` times the smaller norm, epochs within
  the margin); when they disagree a third peer decides; a state that no other peer could serve to compare is
  loaded as it is.

What these rules do not cover:

* a peer that *reduces* a share of the tensors (each peer of a round reduces about ``1 / n`` of them) can still
  return a wrong average for that share: :mod:`garden.collab.hivemind_patches` refuses non-finite values, wrong
  shapes and an average that moves a peer's values by more than ``DROP_RADIUS`` times its largest part (the peer
  keeps its own values for that reducer's share, as for a reducer that failed), but a lie within that bound
  stands (BTARD's recomputation of reducers is not built);
* a part within the honest spread is not told from an honest one: a liar that knows the honest mean and sends its
  opposite, with a weight within the bound, slows training by its weight share (bounded, not cancelled);
* a claim one epoch ahead (the margin honest transitions need), or of samples accumulated towards the epoch (the
  progress record's other claim), ends the swarm's epochs early;
* a trainer alone with a liar, or whose first read of the record shows only the liar (it starts while no other
  trainer is in the record yet), follows the liar's epoch and may load its state (a state with non-finite values
  is refused, and the liar that served it loses its say in the record: :func:`garden.collab.robust_hivemind.refute`;
  a finite state, however wrong, is loaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WEIGHT_RATIO = 1.0
"""A sender weighs at most this many times the round's median weight (see :func:`bound_weights`). At 1, one liar
among ``n`` honest senders holds ``1 / (n + 1)`` of the round at most: at 2 (a fast peer counting double) the
averaging benchmark's liar, sending noise of an honest norm, held 2 / 5 of a four-peer round and made the held-out
KL 1.37-1.48 times the honest run's; at 1, 1.15-1.26."""
DROP_RADIUS = 100.0
"""A part farther than this many times the median sender's distance from the coordinate-wise median is left out of
the round (see :func:`centered_clip`). At 4, honest parts of a 3-peer DORPO round on 2-row batches were left out
(tests/mission/test_hostile_swarm.py); a part between ``CLIP_RADIUS`` and this is clipped."""
PLAUSIBLE_EPOCHS = 4.0
"""The weight limit the trainer sets (:func:`set_weight_limit`) is this many times the swarm's ``target_batch_size``:
an honest peer's accumulated samples stay below one epoch's target plus a batch, with room for a round that starts
late."""
_weight_limit = math.inf
CLIP_RADIUS = 2.0
"""CenteredClip's radius, in units of the median sender's distance from the start (see :func:`centered_clip`).
Honest parts in thousands of dimensions lie at nearly equal distances from the coordinate-wise median (their
noise is independent), so twice that distance leaves them whole, while a liar's pull is cut at twice the honest
spread."""
CLIP_ITERATIONS = 5
"""CenteredClip iterations at most (one suffices when nothing is clipped; more converge towards its fixed point)."""
EPOCH_MARGIN = 1
"""Epochs a claim may be ahead of the other trainers' median claim and still count: the first peer to see an epoch
end is one ahead of the others for a moment."""
STATE_AGREEMENT = 1.0
"""Two states agree when the distance between their parameters is less than this share of the smaller norm. Loose on
purpose: peers in ``local`` mode, or whose last round failed, hold different parameters at one epoch; what it
refuses is a state that is no nearby training state (scaled, zeroed, random or sign-flipped parameters)."""


def lower_median(values: Sequence[float]) -> float:
    """The lower median of ``values`` (the ``(n + 1) // 2``-th smallest; with two values, the smaller)."""
    if not values:
        raise ValueError("the median of no values")
    return sorted(values)[(len(values) - 1) // 2]


def set_weight_limit(limit: float) -> None:
    """Refuse weights above ``limit`` in this process's averaging rounds (and in the averagers it forks later)."""
    global _weight_limit
    if not limit > 0:
        raise ValueError(f"a weight limit must be positive, not {limit!r}")
    _weight_limit = float(limit)


def weight_limit() -> float:
    """The largest weight a sender may claim in this process's rounds (infinite unless :func:`set_weight_limit`)."""
    return _weight_limit


def bound_weights(weights: Sequence[float]) -> list[float]:
    """``weights`` with each one cut to ``WEIGHT_RATIO`` times the median of the positive ones (the upper one of an
    even count; zero weights, hivemind's "tag along", stay zero)."""
    positive = sorted(w for w in weights if w > 0)
    if not positive:
        return [0.0 for _ in weights]
    cap = WEIGHT_RATIO * positive[len(positive) // 2]
    return [min(max(float(w), 0.0), cap) for w in weights]


@dataclass
class Reduced:
    """The result of :func:`centered_clip`: the reduced part, the radius used, and which senders' parts (indices
    into the input) were farther than the radius from the result (clipped), left out (farther than ``DROP_RADIUS``
times the median distance from the start: ``dropped``) or weighed less than they claimed."""

    value: Any
    radius: float
    clipped: list[int] = field(default_factory=list)
    bounded: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)


def centered_clip(parts: Sequence[Any], weights: Sequence[float], own: int | None = None) -> Reduced:
    """The robust weighted average of ``parts`` (tensors of one shape) under ``weights`` (bounded first by
    :func:`bound_weights`); ``own``: the index of the reducer's own part, if it is one of them (used when there are
    two senders). See the module docstring for the rule and what it guarantees."""
    import torch

    if not parts:
        raise ValueError("nothing to reduce")
    shape = parts[0].shape
    bounded = bound_weights(weights)
    cut = [i for i, (w, b) in enumerate(zip(weights, bounded, strict=True)) if b < w]
    live = [i for i, w in enumerate(bounded) if w > 0] or list(range(len(parts)))  # all zero: equal weights
    x = torch.stack([parts[i].reshape(-1).to(torch.float32) for i in live])
    w = torch.tensor([bounded[i] if bounded[i] > 0 else 1.0 for i in live], dtype=torch.float64)
    w = (w / w.sum()).to(torch.float32)
    n = len(live)
    if n == 1:
        return Reduced(x[0].reshape(shape).clone(), math.inf, [], cut)
    mine = live.index(own) if own is not None and own in live else None
    if n == 2 and mine is not None:
        # one step from the reducer's own part: the weighted mean when the other part is within the radius; else
        # the other part pulls by its weight share of the radius at most (iterating on would let a part of twice
        # the reducer's weight drag the result on, a radius per iteration)
        other = 1 - mine
        own_norm = float(torch.linalg.vector_norm(x[mine]))
        radius = CLIP_RADIUS * own_norm
        diff = x[other] - x[mine]
        norm = float(torch.linalg.vector_norm(diff))
        if 0.0 < DROP_RADIUS * own_norm < norm:  # nothing but a pull: left out, as in larger rounds
            return Reduced(x[mine].reshape(shape).clone(), radius, [], cut, [live[other]])
        scale = min(1.0, radius / norm) if norm > 0 else 1.0
        value = x[mine] + (w[other] * scale) * diff
        return Reduced(value.reshape(shape), radius, [live[other]] if scale < 1.0 else [], cut)
    v = coordinate_median(x)
    distances = torch.linalg.vector_norm(x - v, dim=1)
    median_distance = float(distances.sort().values[n // 2])
    radius = CLIP_RADIUS * median_distance
    # (a median distance of 0, where most senders' parts are equal (zeros of sparse gradients), leaves the others
    # at radius 0 below: the same result, without calling honest parts "left out")
    far = distances > DROP_RADIUS * median_distance if median_distance > 0 else torch.zeros_like(distances, dtype=bool)
    dropped = [live[i] for i in range(n) if bool(far[i])]
    if dropped:
        w = torch.where(far, torch.zeros_like(w), w)
        w = w / w.sum()
    for _ in range(CLIP_ITERATIONS):
        diff = x - v
        norms = torch.linalg.vector_norm(diff, dim=1)
        scale = torch.where(norms > radius, radius / norms.clamp_min(1e-30), torch.ones_like(norms))
        step = (w * scale) @ diff
        v = v + step
        if float(torch.linalg.vector_norm(step)) <= 1e-7 * float(torch.linalg.vector_norm(v)):
            break
    norms = torch.linalg.vector_norm(x - v, dim=1)
    clipped = [live[i] for i in range(n) if float(norms[i]) > radius * (1 + 1e-5) and live[i] not in dropped]
    return Reduced(v.reshape(shape), radius, clipped, cut, dropped)


def coordinate_median(x: Any) -> Any:
    """The coordinate-wise median of the rows of ``x`` (``n x d``; the mean of the middle two for even ``n``).
    Rounds have few senders: up to four, by elementwise minima and maxima (a sort along a dimension of 2 to 4
    entries costs 50 times more)."""
    import torch

    n = x.shape[0]
    if n <= 2:
        return x.mean(dim=0)
    if n == 3:
        a, b, c = x
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    if n == 4:
        return (x.sum(dim=0) - x.amax(dim=0) - x.amin(dim=0)) / 2
    ordered = x.sort(dim=0).values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def epoch_ceiling(claims: Sequence[float], own: float = 0) -> float:
    """The largest epoch that counts, given the epochs the *other* trainers claim (``claims``, not this peer's own)
    and this peer's own epoch ``own``: the lower median of the claims, each raised to ``own`` at least, plus
    :data:`EPOCH_MARGIN`; infinite when there are no claims."""
    return lower_median([max(c, own) for c in claims]) + EPOCH_MARGIN if claims else math.inf


def states_agree(mine: Sequence[Any], theirs: Sequence[Any]) -> bool:
    """Whether two peers' parameters (the same tensors, in order) agree: same shapes, finite, and the distance
    between them below :data:`STATE_AGREEMENT` times the smaller norm."""
    import torch

    if len(mine) != len(theirs) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(mine, theirs, strict=True)):
        return False
    if not mine:
        return True
    a = torch.cat([t.reshape(-1).to(torch.float64) for t in mine])
    b = torch.cat([t.reshape(-1).to(torch.float64) for t in theirs])
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return False
    norms = (float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    if max(norms) == 0.0:
        return True
    # the smaller norm: against the larger one, a state a thousand times too large is "near" anything small
    return float(torch.linalg.vector_norm(a - b)) < STATE_AGREEMENT * min(norms)
