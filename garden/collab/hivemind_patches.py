"""Every change garden makes to hivemind's internals, in one place, fenced by the hivemind release they were
written for.

hivemind offers no hook for what follows, so each one replaces a method or a registry entry of a private
class. They were written against hivemind ``TESTED_HIVEMIND`` (the version ``pyproject.toml`` pins);
:func:`install` refuses any other release, naming both, because a patch of a method that moved or changed
its arguments would fail silently (a guard that no longer runs lets one peer's NaN into everyone's
model). :data:`PATCHED` lists every ``(owner, attribute)`` replaced here; ``tests/collab/
test_hivemind_patches.py`` fails when one of them is gone from the installed hivemind. To move to a new
hivemind: read each patch against its source, update ``TESTED_HIVEMIND`` and the pin, run those tests.

There is deliberately no environment switch to skip the version check: the pin already keeps other
releases out of a normal install, whoever runs another one on purpose can change ``TESTED_HIVEMIND`` in
their checkout, and a switch would let a volunteer's machine join a swarm with checks that no longer run.

The patches (each installed once per process, before the optimizer forks its averagers, which inherit them):

* **the averaging guard** (``AllReduceRunner.__init__``, ``TensorPartReducer.accumulate_part``,
  ``TensorPartContainer.register_processed_part``, ``DecentralizedAverager.load_state_from_peers``): refuse
  tensor parts from peers that would poison an averaging round: another shape, or values that are not
  finite. hivemind's all-reduce splits every averaged tensor into parts; each peer reduces some parts (it
  sums what every sender sent for them) and sends the average back. A volunteer's broken GPU, a bug, or a
  hostile peer can send NaN, inf or a part of the wrong size, and one NaN in a sum makes the whole swarm's
  model NaN. hivemind already has the way out: an exception while accumulating a sender's stream bans that
  sender for the rest of the round (its data is left out, the others' average goes on), and an exception
  while reading a reducer's answer keeps this peer's own values for that part. The guard raises those
  exceptions for bad data (:func:`check_part`), and logs which peer sent it. A state downloaded by a peer
  that catches up (``load_state_from_peers``) is refused too when it holds non-finite values, and the peer
  that served it (named by robust averaging's download) loses its say in the progress record
  (:func:`garden.collab.robust_hivemind.refute`). hivemind
  builds its all-reduce objects deep inside the averager (no factory to pass), hence the wrapped methods.
* **the bytes meter** (``AllReduceRunner._generate_input_for_peer``,
  ``AllReduceRunner._accumulate_parts_streaming``): the bytes this trainer sends while averaging with peers,
  what ``benchmarks/collab_scaling.py`` compares across modes and compressions and what
  ``train.bytes_sent`` shows (:func:`bytes_sent`). hivemind moves averaged tensors in its averager
  processes (forked from the trainer), as protobuf messages of two streams per round: the parts this peer
  sends to each reducer, and the averaged parts it sends back as a reducer. Their sizes are added to one
  counter in shared memory, created at install, before the averagers fork, so that they all write to it.
  Not counted: the state a peer serves to a late joiner (once per join, not per round; hivemind registers
  that RPC handler by its exact signature, which a wrapper would hide), DHT traffic and libp2p framing.
* **the 8-bit decoder** (``hivemind.compression.serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"]``):
  hivemind 1.1.12's ``Uniform8BitQuantization.extract`` fails on numpy 2 (see
  :mod:`garden.collab.compression`), and hivemind decodes every part with one registry of compression
  objects by wire type (not with the averager's own object), so garden's
  :class:`~garden.collab.compression.Uniform8Bit` goes there. :func:`install_decoder` installs this one
  alone: ``make_compression`` needs it wherever an 8-bit compression is built (a test's averagers too).
* **averagers tied to their trainer** (``DecentralizedAverager.run``): hivemind's averagers are forked
  children that outlive a worker killed with SIGKILL (the OOM killer, a crash); each one watches its
  parent, as the DHT process does, and exits when the worker is gone.
* **states served whole** (``TrainingStateAverager.step``, ``.load_state_from_peers``, ``.get_current_state``):
  a peer serves its state (to a late joiner) labelled with an epoch, and the parameters it sends are the ones it
  held at that epoch. hivemind labels the state with ``local_epoch``, which it increments *before* the epoch's
  optimizer step and averaging round run (in a background thread, seconds when peers are slow to meet), and which
  ``Optimizer.load_state_from_peers`` advances to the swarm's epoch without new parameters when the state it got
  is one epoch behind ("catching up"). A late joiner asking at such a moment got epoch E+1 with the parameters of
  E, and trained, reported and checkpointed them as E+1. Here every step that changes the parameters and every
  load marks the state as moving, and ``get_current_state`` answers no state (the downloader asks the next peer,
  as for a peer that does not share) while the state moves or while its parameters are not those of its epoch
  (:func:`params_epoch`: the epoch of the last step or load that set them). A load counts only when the
  parameters it left are those the peer sent under the epoch it now holds (:func:`loaded_states`).

* **no parameter round after a lone gradient round** (``Optimizer._average_gradients_and_load_into_optimizer``,
  ``Optimizer._begin_averaging_gradients`` for a pre-scheduled round that met nobody before the epoch ended, and
  ``TrainingStateAverager.step`` above): a trainer whose gradient round met nobody (no group found) moves to the
  next epoch without its parameter round. Nobody waits for it there either (the others met, or left), and each
  round that meets nobody costs its full timeout: two trainers whose epochs end a few seconds apart (one missed a
  round, the other filled the target alone meanwhile) then fail every round, each in the other's dead time, and
  never average again (measured: a trainer killed mid-run left its two survivors out of phase for the rest of the
  run). Moved on at once, the late one counts its samples in the same epoch as the others, so both see its end
  together and meet; the next parameter round makes their parameters equal again (:func:`found_no_group`).

* **no wait for a round the swarm is past** (``Optimizer._update_global_epoch``): a trainer looking for its
  parameter round's group while every other trainer in the progress record already reached a later epoch (they
  met, or gave up, without it) stops looking at once (:func:`swarm_moved_past`) rather than after
  ``averaging_timeout``: nobody can meet it in that round, and the epoch ends as a round that failed ends. Measured
  in the demo's last epoch: two peers averaged, the third started looking 3 s later and waited out its 60 s timeout
  while the others were done (the demo and its pull waited with it). The record is read afresh (the tracker holds
  its lock through the epoch's end), its claims filtered as robust averaging filters them; one other trainer
  still at the round's epoch keeps this one looking, so a claim of a later epoch stops no round honest peers hold.

* **robust averaging** (``TensorPartReducer.reset_accumulators``, ``ProgressTracker._parse_swarm_progress_data``,
  ``DecentralizedAverager._load_state_from_peers``; and the guard's wrappers, which refuse a weight that is not a
  finite number >= 0): what another peer claims counts within bounds (the rules, and what they guarantee, are in
  :mod:`garden.collab.robust`). hivemind's reducer adds each sender's part, times the sender's weight, to a running
  sum; here the sum is replaced by an object that holds the parts of the current part index and, once every sender's
  part arrived (when hivemind divides the sum), reduces them by CenteredClip with bounded weights. hivemind takes the
  swarm's epoch as the largest any trainer claims in the progress record; here the claims too far ahead of the other
  trainers' are left out of the record before hivemind reads it. hivemind downloads a state from the peer that
  claims the highest priority (its epoch); here the peers whose claim is too far ahead are not asked, and the state
  one peer served is loaded when a second peer's parameters agree with it. The work itself is in
  :mod:`garden.collab.robust_hivemind`.

Not patches, but hivemind's internals too, for trainers that wait for each other (``[train] min_trainers``):
:func:`report_presence` stores a trainer's entry in the progress record before its first step (hivemind's reporter
stores one only once the trainer has accumulated samples), and :func:`refresh_progress` has the tracker read the
record now rather than at its next scheduled read (up to 10 s away).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import multiprocessing
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from garden.net.p2pd_patch import TESTED_HIVEMIND  # one pin for every patch of hivemind, the p2pd flags' too

logger = logging.getLogger(__name__)


PATCHED: tuple[tuple[str, str], ...] = (
    # the averaging guard
    ("hivemind.averaging.allreduce:AllReduceRunner", "__init__"),
    ("hivemind.averaging.partition:TensorPartReducer", "accumulate_part"),
    ("hivemind.averaging.partition:TensorPartContainer", "register_processed_part"),
    ("hivemind.averaging.averager:DecentralizedAverager", "load_state_from_peers"),
    # the bytes meter
    ("hivemind.averaging.allreduce:AllReduceRunner", "_generate_input_for_peer"),
    ("hivemind.averaging.allreduce:AllReduceRunner", "_accumulate_parts_streaming"),
    # the 8-bit decoder (an entry of this dict)
    ("hivemind.compression.serialization", "_BASE_COMPRESSION_TYPES"),
    # averagers tied to their trainer
    ("hivemind.averaging.averager:DecentralizedAverager", "run"),
    # states served whole
    ("hivemind.optim.state_averager:TrainingStateAverager", "step"),
    ("hivemind.optim.state_averager:TrainingStateAverager", "load_state_from_peers"),
    ("hivemind.optim.state_averager:TrainingStateAverager", "get_current_state"),
    # no parameter round after a lone gradient round
    ("hivemind.optim.optimizer:Optimizer", "_average_gradients_and_load_into_optimizer"),
    ("hivemind.optim.optimizer:Optimizer", "_begin_averaging_gradients"),
    # no wait for a round the swarm is past
    ("hivemind.optim.optimizer:Optimizer", "_update_global_epoch"),
    # robust averaging
    ("hivemind.averaging.partition:TensorPartReducer", "reset_accumulators"),
    ("hivemind.optim.progress_tracker:ProgressTracker", "_parse_swarm_progress_data"),
    ("hivemind.averaging.averager:DecentralizedAverager", "_load_state_from_peers"),
)
"""Every ``(owner, attribute)`` replaced here; an owner is ``module`` or ``module:Class``."""

_lock = threading.Lock()
_installed: set[str] = set()
_counter: Any = None


def owner(path: str) -> Any:
    """The module or class an entry of :data:`PATCHED` names (``module`` or ``module:Class``)."""
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in filter(None, qualname.split(".")):
        found = getattr(found, name)
    return found


def check_version() -> None:
    """Raise ``RuntimeError`` unless the installed hivemind is :data:`TESTED_HIVEMIND`."""
    import hivemind

    found = getattr(hivemind, "__version__", "unknown")
    if found != TESTED_HIVEMIND:
        raise RuntimeError(
            f"garden's patches of hivemind internals (garden.collab.hivemind_patches) were written for hivemind "
            f"{TESTED_HIVEMIND}, but hivemind {found} is installed; install hivemind=={TESTED_HIVEMIND} "
            f"(pip install 'hivemind=={TESTED_HIVEMIND}')"
        )


def install(max_weight: float | None = None) -> None:
    """Install every patch in this process (idempotent; the version is checked at each call). Call it before
    the optimizer forks its averagers: they inherit the patches. ``max_weight``: the largest averaging weight a
    sender may claim (see :func:`garden.collab.robust.set_weight_limit`); a part sent with more is refused."""
    from garden.collab import robust

    with _lock:
        check_version()
        if max_weight is not None:
            robust.set_weight_limit(max_weight)
        _once("decoder", _install_decoder)
        _once("guard", _install_guard)
        _once("meter", _install_meter)
        _once("tie", _install_tie)
        _once("whole states", _install_whole_states)
        _once("lone rounds", _install_lone_rounds)
        _once("passed rounds", _install_passed_rounds)
        _once("robust", _install_robust)


def install_decoder() -> None:
    """Install the 8-bit decoder alone (idempotent; the version is checked at each call)."""
    with _lock:
        check_version()
        _once("decoder", _install_decoder)


def _once(name: str, patch: Callable[[], None]) -> None:
    if name not in _installed:
        patch()
        _installed.add(name)


# --- the averaging guard ---------------------------------------------------------------------------------


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


def check_delta(delta: Any, own_scale: float, peer: str) -> None:
    """Raise :class:`RefusedPart` (and log ``peer``) when an averaged part moves this peer's own part by more than
    :data:`garden.collab.robust.DROP_RADIUS` times ``own_scale`` (the norm of the largest part this peer sent): a
    reducer that returns its own huge part, or follows a sender's weight of 1e30, lies about its share. hivemind
    then uses this peer's own values for what that reducer averages (as for a reducer that failed)."""
    from garden.collab import robust

    if own_scale <= 0.0:
        return
    moved = float(delta.float().norm())
    if moved > robust.DROP_RADIUS * own_scale:
        logger.warning("refused the averaged parts from peer %s: one moves this peer's values by %.3g, more than %g "
                       "times its largest part (%.3g); its own values stand for them", peer, moved,
                       robust.DROP_RADIUS, own_scale)  # fmt: skip
        raise RefusedPart(f"an averaged part from {peer}: moved by {moved:.3g}")


def check_weight(weight: Any, peer: str) -> None:
    """Raise :class:`RefusedPart` (and log ``peer``) unless ``weight`` is a finite number >= 0 (a NaN weight makes
    the whole part NaN; a negative one subtracts the part) and at most :func:`garden.collab.robust.weight_limit`
    (more samples than any peer can have trained in a round: a lie)."""
    from garden.collab import robust

    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > robust.weight_limit():
        logger.warning("refused a tensor part from peer %s: weight %r; it is left out of this averaging round", peer,
                       weight)  # fmt: skip
        raise RefusedPart(f"a tensor part from {peer}: weight {weight!r}")


def _install_guard() -> None:
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer

    original_init = AllReduceRunner.__init__
    original_accumulate = TensorPartReducer.accumulate_part
    original_register = TensorPartContainer.register_processed_part
    original_load_state = DecentralizedAverager.load_state_from_peers

    from garden.collab.robust_hivemind import SERVED_BY, refute

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # who is who, for the checks below: senders (as the reducer counts them) and reducers (by peer index)
        self.tensor_part_reducer.garden_senders = [str(p) for p in self.sender_peer_ids]
        own = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        self.tensor_part_reducer.garden_own = own  # robust averaging: a reducer of two senders trusts its own part
        self.tensor_part_container.garden_peers = [str(p) for p in self.ordered_peer_ids]
        self.tensor_part_container.garden_part_shapes = [
            [tuple(part.shape) for part, _ in parts] for parts in self.tensor_part_container._input_parts_by_peer
        ]
        # the scale of what this peer sends (its largest part's norm): an honest reducer's result differs from
        # this peer's own part by about the senders' spread, never by DROP_RADIUS times this peer's largest part
        self.tensor_part_container.garden_own_scale = max(
            (float(part.float().norm()) for parts in self.tensor_part_container._input_parts_by_peer
             for part, _ in parts), default=0.0,
        )  # fmt: skip

    async def accumulate_part(
        self: Any, sender_index: int, part_index: int, tensor_part: Any, weight: float = 1.0
    ) -> Any:
        senders = getattr(self, "garden_senders", None)
        if senders is not None and 0 <= part_index < self.num_parts:
            check_part(tensor_part, self.part_shapes[part_index], senders[sender_index], "a tensor part")
            check_weight(weight, senders[sender_index])
        tensor_part._garden_sender = sender_index  # who sent it, for robust averaging's log lines
        return await original_accumulate(self, sender_index, part_index, tensor_part, weight)

    def register_processed_part(self: Any, peer_index: int, part_index: int, part: Any) -> None:
        shapes = getattr(self, "garden_part_shapes", None)
        if shapes is not None and part_index < len(shapes[peer_index]):
            peer = self.garden_peers[peer_index]
            check_part(part, shapes[peer_index][part_index], peer, "an averaged part")
            check_delta(part, getattr(self, "garden_own_scale", 0.0), peer)
        original_register(self, peer_index, part_index, part)

    def load_state_from_peers(self: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = original_load_state(self, *args, **kwargs)
        if loaded is not None and kwargs.get("wait", True):
            import torch

            metadata, tensors = loaded
            if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
                served_by = metadata.get(SERVED_BY) if isinstance(metadata, dict) else None
                logger.warning("refused a state downloaded from %s: it holds non-finite values",
                               f"peer {served_by}" if served_by else "a peer")  # fmt: skip
                if isinstance(served_by, str):
                    refute(served_by, "served a state with non-finite values")
                loaded = None  # hivemind reads this as "no state loaded" and tries again later
            self._garden_download = loaded  # what "states served whole" checks the load against
        return loaded

    AllReduceRunner.__init__ = init  # type: ignore[method-assign]
    TensorPartReducer.accumulate_part = accumulate_part  # type: ignore[method-assign]
    TensorPartContainer.register_processed_part = register_processed_part  # type: ignore[method-assign]
    DecentralizedAverager.load_state_from_peers = load_state_from_peers  # type: ignore[method-assign]


# --- the bytes meter -------------------------------------------------------------------------------------


def bytes_sent() -> int:
    """Bytes this process and its averagers sent in averaging rounds since :func:`install` (0 before)."""
    return int(_counter.value) if _counter is not None else 0


def _counting(stream: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(stream)
    async def counted(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for message in stream(self, *args, **kwargs):
            with _counter.get_lock():
                _counter.value += message.ByteSize()
            yield message

    return counted


def _install_meter() -> None:
    global _counter
    from hivemind.averaging.allreduce import AllReduceRunner

    _counter = multiprocessing.Value("q", 0)
    for name in ("_generate_input_for_peer", "_accumulate_parts_streaming"):
        setattr(AllReduceRunner, name, _counting(getattr(AllReduceRunner, name)))


# --- the 8-bit decoder -----------------------------------------------------------------------------------


def _install_decoder() -> None:
    from hivemind.compression import serialization

    from garden.collab.compression import Uniform8Bit

    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()


# --- averagers tied to their trainer ---------------------------------------------------------------------


def _install_tie() -> None:
    from hivemind.averaging.averager import DecentralizedAverager

    original = DecentralizedAverager.run

    def run(self: DecentralizedAverager) -> None:
        from garden.lifecycle import watch_parent

        watch_parent(self._parent_pid)
        original(self)

    DecentralizedAverager.run = run  # type: ignore[method-assign]


# --- states served whole ---------------------------------------------------------------------------------

_serving = threading.Lock()
"""Guards the marks below (``_garden_moving``, ``_garden_version``, ``_garden_params_epoch``). Never held while
waiting on anything: a read for a peer checks the marks before and after, it does not hold steps back."""


def params_epoch(averager: Any) -> int:
    """The epoch the parameters of ``averager`` (hivemind's ``TrainingStateAverager``) belong to: its
    ``local_epoch``, unless hivemind advanced that without new parameters (the epoch of the last step or load that
    set them). Without the patches installed, ``local_epoch``."""
    return int(getattr(averager, "_garden_params_epoch", averager.local_epoch))


def loaded_states(averager: Any) -> int:
    """How many states ``averager`` loaded from peers (loads that left this peer holding a peer's parameters
    under that peer's epoch; a load that found no state, or was refused, does not count)."""
    return int(getattr(averager, "_garden_loads", 0))


class _Moving:
    """The state of ``averager`` changes inside this block: a read for a peer that overlaps it is not served."""

    def __init__(self, averager: Any):
        self.averager = averager

    def __enter__(self) -> None:
        averager = self.averager
        with _serving:
            if not hasattr(averager, "_garden_params_epoch"):  # before hivemind can move the epoch alone
                averager._garden_params_epoch = averager.local_epoch
            averager._garden_moving = getattr(averager, "_garden_moving", 0) + 1
            averager._garden_version = getattr(averager, "_garden_version", 0) + 1

    def __exit__(self, *exc: Any) -> None:
        with _serving:
            self.averager._garden_moving -= 1


def _servable(averager: Any, epoch: Any, version: int | None = None) -> str | None:
    """Why the state of ``averager``, read as of ``epoch`` (and ``version``), must not be served; None if it
    may. Called with :data:`_serving` held."""
    moved = version is not None and getattr(averager, "_garden_version", 0) != version
    if getattr(averager, "_garden_moving", 0) or moved:
        return "it moves to another epoch"
    if epoch != params_epoch(averager):
        return f"its parameters are those of epoch {params_epoch(averager)}, not {epoch}"
    return None


def _holds(averager: Any, download: Any) -> bool:
    """Whether ``averager`` holds the parameters (and extra tensors) of ``download`` under its epoch."""
    import torch

    metadata, tensors = download
    if not isinstance(metadata, dict) or metadata.get("epoch") != averager.local_epoch:
        return False
    mine = [p for group in averager.optimizer.param_groups for p in group["params"]] + list(averager.extra_tensors)
    return len(tensors) >= len(mine) and all(
        tuple(p.shape) == tuple(t.shape) and torch.equal(p.detach().cpu(), t.to(p.dtype))
        for p, t in zip(mine, tensors, strict=False)
    )


def _install_whole_states() -> None:
    from hivemind.optim.state_averager import TrainingStateAverager

    original_step = TrainingStateAverager.step
    original_load = TrainingStateAverager.load_state_from_peers
    original_state = TrainingStateAverager.get_current_state
    changing = ("increment_epoch", "optimizer_step", "averaging_round")

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("increment_epoch"):  # the epoch's end: its parameter round follows the gradient round
            lone, self._garden_lone = getattr(self, "_garden_lone", False), False
            if lone and kwargs.get("averaging_round"):
                kwargs = skip_round(self, kwargs)
        if not args and not any(kwargs.get(name) for name in changing):
            return original_step(self, *args, **kwargs)  # waits for or applies nothing garden runs delayed
        # garden runs no delayed optimizer step nor delayed averaging (garden.collab.trainer.make_optimizer): the
        # parameters are final when this returns
        with _Moving(self):
            try:
                return original_step(self, *args, **kwargs)
            finally:
                self._garden_params_epoch = self.local_epoch

    def load_state_from_peers(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _Moving(self):  # the parameters are copied before the epoch is set
            self._garden_download = None
            try:
                return original_load(self, *args, **kwargs)
            finally:
                download, self._garden_download = self._garden_download, None
                if download is not None and _holds(self, download):
                    self._garden_params_epoch = self.local_epoch
                    self._garden_loads = loaded_states(self) + 1

    def get_current_state(self: Any) -> Any:
        with _serving:
            why = _servable(self, self.local_epoch)
            version = getattr(self, "_garden_version", 0)
        if why is None:
            metadata, tensors, infos = original_state(self)
            # hivemind hands over views of the live parameters (on CPU), streamed to the peer later: copy them,
            # so that a step taken while the state is on its way does not change what is sent
            count = sum(len(group["params"]) for group in self.optimizer.param_groups) + len(self.extra_tensors)
            tensors = [t.clone() if i < count else t for i, t in enumerate(tensors)]
            with _serving:  # nothing moved while it was read
                why = _servable(self, metadata.get("epoch"), version)
            if why is None:
                return metadata, tensors, infos
        logger.info("a peer asked for this trainer's state while %s: not served (it asks another)", why)
        return None, [], []  # no tensors: the stream is empty and the downloader goes on to the next peer

    TrainingStateAverager.step = step  # type: ignore[method-assign]
    TrainingStateAverager.load_state_from_peers = load_state_from_peers  # type: ignore[method-assign]
    TrainingStateAverager.get_current_state = get_current_state  # type: ignore[method-assign]


# --- no parameter round after a lone gradient round --------------------------------------------------------


def found_no_group(control: Any) -> bool:
    """Whether the gradient round of ``control`` (a hivemind ``StepControl``; None when none began) met nobody:
    it failed because matchmaking found no group, or it is still looking for one when the optimizer gave up on it
    (after ``averaging_timeout``; hivemind lets it look on until its deadline)."""
    from hivemind.averaging.control import AveragingStage

    if control is None or control.cancelled():
        return False
    if not control.done():
        return bool(control.stage == AveragingStage.LOOKING_FOR_GROUP)
    error = control.exception()
    return error is not None and "could not find a group" in str(error)  # hivemind's AllreduceException


def skip_round(averager: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``TrainingStateAverager.step``'s ``kwargs`` without the parameter round (its pre-scheduled group
    cancelled, as hivemind cancels one it does not use)."""
    control = kwargs.get("averaging_control")
    if control is not None and not control.done():
        control.cancel()
    logger.info("no peer met this trainer in the gradient round of epoch %s: on to the next epoch without the "
                "parameter round (it would meet nobody either)", averager.local_epoch)  # fmt: skip
    return kwargs | {"averaging_round": False, "averaging_control": None, "averaging_opts": None}


def _install_lone_rounds() -> None:
    from hivemind.optim.optimizer import Optimizer

    original = Optimizer._average_gradients_and_load_into_optimizer
    original_begin = Optimizer._begin_averaging_gradients

    def average_gradients(self: Any, maybe_step_control: Any) -> None:
        original(self, maybe_step_control)
        self.state_averager._garden_lone = found_no_group(maybe_step_control)  # read by its next epoch's step

    def begin_averaging_gradients(self: Any, grad_scaler: Any) -> bool:
        # hivemind drops a pre-scheduled gradient round that ended (or was triggered) before the epoch's step, e.g.
        # one that already failed to find a group, and then averages nothing: average_gradients above never runs,
        # so the lone round is told here
        scheduled = self.scheduled_grads
        stale = scheduled is not None and (scheduled.triggered or scheduled.done())
        began = original_begin(self, grad_scaler)
        if stale and not began:
            self.state_averager._garden_lone = found_no_group(scheduled)
        return bool(began)

    Optimizer._average_gradients_and_load_into_optimizer = average_gradients  # type: ignore[method-assign]
    Optimizer._begin_averaging_gradients = begin_averaging_gradients  # type: ignore[method-assign]


# --- no wait for a round the swarm is past ----------------------------------------------------------------

PASSED_POLL_S = 1.0
"""Seconds between two reads of the progress record while a trainer looks for its parameter round's group."""
DECLARATION_GRACE_S = 5.0
"""Seconds after its end that another trainer's declaration on the matchmaking key still counts as looking: a
leader assembles its group when its declaration ends, and its members learn it a moment later."""


def other_epochs(tracker: Any) -> list[int]:
    """The epochs the other trainers in the progress record of ``tracker`` (a hivemind ``ProgressTracker``) claim,
    read now, their claims filtered as robust averaging filters them (a claim that is no number counts as -1)."""
    from hivemind.utils import ValueWithExpiration

    from garden.collab.robust_hivemind import credible_progress

    found = tracker.dht.get(tracker.training_progress_key, latest=True)
    metadata = found.value if isinstance(found, ValueWithExpiration) else None
    if not isinstance(metadata, dict) or not metadata:
        return []
    claims = [
        item.value.get("epoch") for key, item in credible_progress(tracker, metadata).items()
        if key != tracker._local_public_key and isinstance(getattr(item, "value", None), dict)
    ]  # fmt: skip
    return [e if isinstance(e, int) else -1 for e in claims]


def all_past(epochs: list[int], epoch: int) -> bool:
    """Whether every one of the other trainers' ``epochs`` is after ``epoch``: then none of them can meet this one
    in that epoch's round. False for no other trainer (hivemind's own timeout decides then), and while any one is
    still at ``epoch`` or before (a claim of a later epoch, true or not, stops no round another trainer holds)."""
    return bool(epochs) and min(epochs) > epoch


def swarm_moved_past(tracker: Any, epoch: int) -> bool:
    """:func:`all_past` of the progress record of ``tracker``, read now (:func:`other_epochs`)."""
    return all_past(other_epochs(tracker), epoch)


def others_looking_until(dht: Any, key: str, own: bytes) -> float:
    """When the last declaration, read now, of a peer other than ``own`` (a peer id's bytes) that it looks for a
    group on hivemind's matchmaking ``key`` ends; -inf for none (the DHT drops a declaration once it ended)."""
    from hivemind.utils import ValueWithExpiration

    found = dht.get(key, latest=True)
    if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
        return -math.inf
    return max((entry.expiration_time for peer, entry in found.value.items()
                if peer != own and getattr(entry, "value", None) is True), default=-math.inf)  # fmt: skip


def stop_looking_when_passed(
    tracker: Any, control: Any, epoch: int, done: threading.Event, key: str | None = None, own: bytes = b""
) -> None:
    """Until ``done`` or the round of ``control`` (a hivemind ``StepControl``) ends: once the trainer waits on it
    (``triggered``) and it has met nobody yet, cancel it when :func:`swarm_moved_past` ``epoch`` and nobody else
    has looked for a group on the round's matchmaking ``key`` for :data:`DECLARATION_GRACE_S`
    (:func:`others_looking_until`; ``own`` is this trainer's peer id). hivemind's state averager takes a
    cancelled round as a failed one.

    Why the second condition: the key names no epoch, so trainers already past ``epoch`` that look for their own
    parameter round may be forming a group with this one. A member that leaves before its leader assembles the
    group is dropped from it (hivemind's leader sees the stream close), but one that leaves after, before the
    news reached it (the stage still says looking), is counted in, and the others wait for its parts until their
    ``averaging_timeout``. A leader assembles when its declaration ends, hence the grace after it. A peer that
    declares on the key forever only keeps this trainer to hivemind's own timeout, as without the patch."""
    from hivemind.averaging.control import AveragingStage

    from hivemind.utils import get_dht_time

    looking = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
    others_until = -math.inf  # the end of the last declaration another peer was seen to make on the key
    while not done.wait(PASSED_POLL_S) and not control.done():
        if not control.triggered or control.stage not in looking:
            continue  # not waited on yet (hivemind would start a new round), or in a group: let it run
        try:
            passed = swarm_moved_past(tracker, epoch)
            if passed and key is not None:
                others_until = max(others_until, others_looking_until(tracker.dht, key, own))
                passed = get_dht_time() >= others_until + DECLARATION_GRACE_S
        except Exception as e:  # noqa: BLE001 - a DHT read that failed: look on, as hivemind would
            logger.debug("could not read the progress record: %r", e)
            continue
        if passed and control.stage in looking and control.cancel():
            logger.info("every other trainer is past epoch %d: not waiting for a parameter round nobody can join",
                        epoch)  # fmt: skip
            return


def _install_passed_rounds() -> None:
    from hivemind.optim.optimizer import Optimizer

    original = Optimizer._update_global_epoch

    def update_global_epoch(self: Any, grad_scaler: Any) -> None:
        control, done = self.scheduled_state, threading.Event()
        if control is not None and not control.done():
            # the key hivemind's matchmaking declares under (no group bits without a target group size); the
            # matchmaking object itself lives in the averager's own process
            key, own = f"{self.state_averager.prefix}.0b", self.dht.peer_id.to_bytes()
            threading.Thread(target=stop_looking_when_passed, args=(self.tracker, control, self.local_epoch, done,
                                                                    key, own),
                             name="garden-passed-round", daemon=True).start()  # fmt: skip
        try:
            original(self, grad_scaler)
        finally:
            done.set()

    Optimizer._update_global_epoch = update_global_epoch  # type: ignore[method-assign]


# --- robust averaging ------------------------------------------------------------------------------------


def _install_robust() -> None:
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.averaging.partition import TensorPartReducer
    from hivemind.optim.progress_tracker import ProgressTracker

    from garden.collab.robust_hivemind import HeldParts, agreed_state, credible_progress

    original_reset = TensorPartReducer.reset_accumulators
    original_parse = ProgressTracker._parse_swarm_progress_data

    def reset_accumulators(self: Any) -> None:
        original_reset(self)
        if not self.finished.is_set() and hasattr(self, "accumulator"):
            self.accumulator = HeldParts(self)

    def parse_swarm_progress_data(self: Any, metadata: Any) -> Any:
        if isinstance(metadata, dict) and metadata:
            metadata = credible_progress(self, metadata)
        return original_parse(self, metadata)

    async def load_state_from_peers(self: Any, future: Any, timeout: float | None = None) -> None:
        if timeout is not None:  # as hivemind: with a timeout, each chunk waits the averager's own timeout
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            future.set_result(await agreed_state(self, timeout))
        except Exception as e:
            logger.warning("could not load a state from peers: %r", e)
        finally:
            if not future.done():
                future.set_result(None)

    TensorPartReducer.reset_accumulators = reset_accumulators  # type: ignore[method-assign]
    ProgressTracker._parse_swarm_progress_data = parse_swarm_progress_data  # type: ignore[method-assign]
    DecentralizedAverager._load_state_from_peers = load_state_from_peers  # type: ignore[method-assign]


def report_presence(tracker: Any) -> None:
    """Store this trainer's progress record (0 samples at its epoch) under hivemind's progress key, as hivemind's
    own reporter does once a trainer has accumulated samples (before that it stores none, so a trainer that
    waits to start is invisible to the others). Returns once stored. The record expires after the tracker's
    ``metadata_expiration``; call again to keep it. hivemind's reporter replaces it (later expiration) from the
    first step on."""
    from hivemind.utils import get_dht_time

    tracker.dht.store(
        key=tracker.training_progress_key,
        subkey=tracker._local_public_key,
        value=tracker.local_progress.dict(),
        expiration_time=get_dht_time() + tracker.metadata_expiration,
    )


def refresh_progress(tracker: Any) -> None:
    """Have hivemind's progress tracker read the progress record now (it reads it on a schedule of its own,
    every 0.5 to 10 s by its estimate of the epoch's end); the new view is in ``tracker.global_progress`` once
    read, a moment later."""
    from hivemind.utils import get_dht_time

    tracker.global_progress.next_fetch_time = get_dht_time()
    tracker.global_state_updated.set()  # wakes the fetcher, which finds its next read due
