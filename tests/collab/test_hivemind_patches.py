"""The fence around garden's patches of hivemind internals (``garden.collab.hivemind_patches``): every patched
attribute exists on the installed hivemind, the wrapped methods still take the arguments the wrappers pass,
another hivemind release is refused with a message naming both versions, and no other module patches
hivemind."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import hivemind
import pytest

from garden.collab import hivemind_patches

pytestmark = pytest.mark.heavy(9)  # seconds in `make check`: see tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("owner", "name"), hivemind_patches.PATCHED, ids=[f"{o}.{n}" for o, n in hivemind_patches.PATCHED]
)
def test_every_patched_attribute_exists(owner: str, name: str) -> None:
    assert hasattr(hivemind_patches.owner(owner), name), (
        f"hivemind {hivemind.__version__} has no {owner}.{name}: garden.collab.hivemind_patches must be updated"
    )


def test_the_wrapped_methods_take_the_arguments_the_wrappers_pass() -> None:
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.averager import DecentralizedAverager
    from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
    from hivemind.compression import serialization

    def params(method: object) -> list[str]:
        return list(inspect.signature(inspect.unwrap(method)).parameters)  # type: ignore[arg-type]

    # read from the originals where the patches are installed in this process (the guard's wrappers are
    # closures with the same parameters; the meter's keep the original under __wrapped__)
    assert params(TensorPartReducer.accumulate_part) == ["self", "sender_index", "part_index", "tensor_part", "weight"]
    assert params(TensorPartContainer.register_processed_part) == ["self", "peer_index", "part_index", "part"]
    assert params(AllReduceRunner._generate_input_for_peer) == ["self", "peer_index"]
    assert params(AllReduceRunner._accumulate_parts_streaming) == ["self", "stream", "sender_index"]
    assert "wait" in inspect.signature(DecentralizedAverager.load_state_from_peers).parameters
    assert params(DecentralizedAverager.run) == ["self"]
    assert "UNIFORM_8BIT" in serialization._BASE_COMPRESSION_TYPES
    from hivemind.optim.state_averager import TrainingStateAverager

    assert {"increment_epoch", "optimizer_step", "averaging_round"} < set(params(TrainingStateAverager.step))
    assert params(TrainingStateAverager.get_current_state) == ["self"]
    assert params(TrainingStateAverager.load_state_from_peers) == ["self", "kwargs"]
    from hivemind.optim.optimizer import Optimizer

    assert params(Optimizer._average_gradients_and_load_into_optimizer) == ["self", "maybe_step_control"]
    assert params(Optimizer._begin_averaging_gradients) == ["self", "grad_scaler"]
    # no wait for a round the swarm is past: the epoch's end runs its parameter round on the pre-scheduled group
    assert params(Optimizer._update_global_epoch) == ["self", "grad_scaler"]
    assert "averaging_control=self.scheduled_state" in inspect.getsource(Optimizer._update_global_epoch)
    from hivemind.optim.progress_tracker import ProgressTracker

    # robust averaging: the reducer's running sum (what the held parts stand in for), the record, the download
    assert params(TensorPartReducer.reset_accumulators) == ["self"]
    assert params(ProgressTracker._parse_swarm_progress_data) == ["self", "metadata"]
    assert params(DecentralizedAverager._load_state_from_peers) == ["self", "future", "timeout"]
    # the held parts stand in for the sum: hivemind's reducer must touch it through these two calls only
    from hivemind.averaging import partition

    uses = [line.strip() for line in inspect.getsource(partition).splitlines() if "self.accumulator" in line]
    assert uses == [
        "self.accumulator = None  # this will contain the sum of current tensor part from group peers",
        "self.accumulator = torch.zeros(self.part_shapes[self.current_part_index])",
        "self.accumulator.add_(tensor_part, alpha=weight)",
        "self.current_part_future.set_result(self.accumulator.div_(self.denominator))",
        "del self.accumulator",
    ], uses


def test_the_tested_hivemind_is_the_pinned_and_installed_one() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"hivemind=={hivemind_patches.TESTED_HIVEMIND}" in pyproject["project"]["dependencies"]
    assert hivemind.__version__ == hivemind_patches.TESTED_HIVEMIND


@pytest.mark.parametrize("install", [hivemind_patches.install, hivemind_patches.install_decoder])
def test_another_hivemind_release_is_refused(monkeypatch: pytest.MonkeyPatch, install: object) -> None:
    installed = set(hivemind_patches._installed)
    monkeypatch.setattr(hivemind, "__version__", "1.2.0")
    with pytest.raises(RuntimeError, match=r"written for hivemind 1\.1\.12, but hivemind 1\.2\.0 is installed"):
        install()  # type: ignore[operator]
    assert hivemind_patches._installed == installed  # refused before patching anything


def test_a_worker_on_another_hivemind_fails_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from garden.collab.trainer import CollabConfig
    from garden.collab.worker import WorkerConfig, WorkerStatus, run
    from garden.protocol.mission_spec import StudentSection

    config = WorkerConfig(
        mission_id="c011ab", student=StudentSection(base="builtin:smollm2-135m"),
        collab=CollabConfig(target_batch_size=8, max_epochs=1), store_path=tmp_path / "garden.sqlite3",
        status_path=tmp_path / "status.json", out_dir=tmp_path / "out",
    )  # fmt: skip
    monkeypatch.setattr(hivemind, "__version__", "1.2.0")
    assert run(config, threading.Event()) == 1
    status = WorkerStatus.read(config.status_path)
    assert status is not None and status.state == "failed" and status.pid == os.getpid()
    assert status.error is not None and "hivemind 1.2.0 is installed" in status.error


def test_install_patches_every_listed_attribute_once() -> None:
    """In a fresh process (the guard and the watch of the parent stay out of this one)."""
    script = """
from garden.collab import hivemind_patches as h
from garden.collab.compression import Uniform8Bit
before = {(o, n): getattr(h.owner(o), n) for o, n in h.PATCHED}
h.install()
after = {(o, n): getattr(h.owner(o), n) for o, n in h.PATCHED}
h.install()
again = {(o, n): getattr(h.owner(o), n) for o, n in h.PATCHED}
registry = ("hivemind.compression.serialization", "_BASE_COMPRESSION_TYPES")
unchanged = [k for k in h.PATCHED if k != registry and after[k] is before[k]]
assert not unchanged, f"listed but not patched: {unchanged}"
assert isinstance(after[registry]["UNIFORM_8BIT"], Uniform8Bit)
assert all(again[k] is after[k] for k in h.PATCHED), "a second install() patched again"
assert h.bytes_sent() == 0
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


ASKED_READS = """
READ_ONLY_WHEN_ASKED = dict(min_refresh_period=300.0, max_refresh_period=300.0, default_refresh_period=300.0)
"""
"""A script's line for an optimizer's ``tracker_opts``: its tracker reads the progress record only when the script
asks (``h.refresh_progress``). A read on hivemind's own schedule that lands inside ``opt.step()``, after the step
counted its samples but before it checked them, replaces the count with the record's (which has none of them yet):
the step ends no epoch. A loaded CI machine met that."""


def test_a_state_is_served_only_whole_and_a_waiting_trainer_is_in_the_progress_record() -> None:
    """In a fresh process with the patches installed, a one-peer hivemind.Optimizer: asked for its state while its
    epoch ends (from inside the optimizer step), it serves none; after, it serves the new epoch's parameters as a
    copy; with the epoch advanced without parameters (hivemind's catch-up), none. report_presence stores the
    progress record hivemind stores only after a first step."""
    script = ASKED_READS + """
import hivemind, torch
from garden.collab import hivemind_patches as h
h.install()
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
seen, spying = [], []
class Spy(torch.optim.SGD):
    def step(self, closure=None):
        if spying:
            seen.append(opt.state_averager.get_current_state())
        return super().step(closure)
p = torch.nn.Parameter(torch.zeros(3))
opt = hivemind.Optimizer(dht=dht, run_id="whole", target_batch_size=4, batch_size_per_step=4, params=[p],
                         optimizer=lambda ps: Spy(ps, lr=1.0), matchmaking_time=1.0, averaging_timeout=5.0,
                         tracker_opts=READ_ONLY_WHEN_ASKED)
states = opt.state_averager
try:
    h.report_presence(opt.tracker)
    record = dht.get("whole_progress", latest=True)
    assert record is not None and len(record.value) == 1, record
    meta, tensors, _ = states.get_current_state()
    assert meta["epoch"] == 0 and torch.equal(tensors[0], torch.zeros(3))
    spying.append(True)
    p.grad = torch.ones(3)
    opt.step()  # 4 samples of 4: the epoch ends, its optimizer step asks for the state
    assert opt.local_epoch == 1 and h.params_epoch(states) == 1, (opt.local_epoch, h.params_epoch(states))
    assert not torch.equal(p.detach(), torch.zeros(3))
    assert len(seen) == 1 and seen[0][0] is None and len(seen[0][1]) == 0, seen
    meta, tensors, _ = states.get_current_state()
    assert meta["epoch"] == 1 and torch.equal(tensors[0], p.detach())
    with torch.no_grad():
        p.add_(1.0)
        states.optimizer.param_groups[0]["params"][0].add_(1.0)
    assert not torch.equal(tensors[0], p.detach()), "a view of the live parameters was served"
    states.local_epoch = 2  # as hivemind's catch-up does after a state one epoch behind
    assert h.params_epoch(states) == 1 and len(states.get_current_state()[1]) == 0
    print("ok")
finally:
    opt.shutdown()
    dht.shutdown()
"""
    run_ok(script, timeout=120)


TWO_DHTS = """
import logging, threading, time, hivemind, torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey
from garden.collab import hivemind_patches as h
h.install()
said = []
class Said(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.getLogger("garden.collab.hivemind_patches").addHandler(Said())
logging.getLogger("garden.collab.hivemind_patches").setLevel(logging.INFO)
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
other = hivemind.DHT(start=True, initial_peers=dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
"""
"""The start of a fresh process's script: garden's patches installed, what they log in ``said``, and two DHT nodes
(``dht`` for the trainer under test, ``other`` for the trainers beside it)."""
STOP_ALL = """
finally:
    opt.shutdown()
    away.shutdown()
    other.shutdown()
    dht.shutdown()
"""
"""Its end, after a ``try:`` that prints ``ok``: the optimizer ``opt``, the other trainer's tracker ``away``, the
DHTs."""


def run_ok(script: str, timeout: float) -> None:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-3000:]


def test_a_trainer_whose_gradient_round_met_nobody_moves_on_without_the_parameter_round() -> None:
    """In a fresh process with the patches installed, a one-peer hivemind.Optimizer beside a second trainer that is
    in the progress record but never steps (one whose round is seconds away, out of phase): the epoch ends, the
    gradient round finds no group, and the trainer moves to the next epoch without its parameter round (which
    would wait its full timeout for nobody)."""
    script = TWO_DHTS + ASKED_READS + """
away = ProgressTracker(other, "lone", target_batch_size=4, private_key=RSAPrivateKey(), start=True)  # its own entry
p = torch.nn.Parameter(torch.zeros(3))
opt = hivemind.Optimizer(dht=dht, run_id="lone", target_batch_size=4, batch_size_per_step=4, params=[p],
                         optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), matchmaking_time=1.0, averaging_timeout=3.0,
                         tracker_opts=READ_ONLY_WHEN_ASKED)
rounds = []
step = opt.state_averager.step
def spy(*args, **kwargs):
    if kwargs.get("increment_epoch"):
        rounds.append(kwargs.get("averaging_round"))
    return step(*args, **kwargs)
opt.state_averager.step = spy
try:
    h.report_presence(away)
    h.report_presence(opt.tracker)  # each trainer in the record before its first step, as with min_trainers
    deadline = time.monotonic() + 30
    while opt.tracker.global_progress.num_peers < 2:
        assert time.monotonic() < deadline, "the other trainer never showed in the progress record"
        h.refresh_progress(opt.tracker)
        time.sleep(0.2)
    p.grad = torch.ones(3)
    opt.step()  # 4 samples of 4: the epoch ends; the gradient round meets nobody
    assert opt.local_epoch == 1, opt.local_epoch
    assert any("on to the next epoch without the parameter round" in line for line in said), said
    # asked for the round (two trainers in the record) and it was dropped: the wrapper under the spy saw it
    assert rounds == [True], rounds
    print("ok")
""" + STOP_ALL
    run_ok(script, timeout=120)


@pytest.mark.parametrize("declares", [0, 4], ids=["nobody-looks", "the-other-looks-4s"])
def test_a_trainer_stops_looking_for_a_parameter_round_once_every_other_trainer_is_past_it(declares: int) -> None:
    """In a fresh process with the patches installed, a local-mode hivemind.Optimizer (its parameter round
    pre-scheduled, as garden's local mode primes it) beside a second trainer that is only in the progress record:
    once the trainer waits on its round, the other reports the next epoch (it met, or gave up, without this one),
    and the trainer stops looking within seconds, not after its 60 s ``averaging_timeout``. While the other
    declares on the round's matchmaking key for ``declares`` seconds (as a trainer looking for its own round does:
    the key names no epoch, so they may be forming a group), the trainer looks on until that declaration ended."""
    script = TWO_DHTS + f"DECLARES = {declares}\n" + """
away = ProgressTracker(other, "past", target_batch_size=4, private_key=RSAPrivateKey(), start=True)
p = torch.nn.Parameter(torch.zeros(3))
opt = hivemind.Optimizer(dht=dht, run_id="past", target_batch_size=4, batch_size_per_step=1, params=[p],
                         optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), matchmaking_time=2.0,
                         averaging_timeout=60.0, use_local_updates=True, average_state_every=1,
                         delay_state_averaging=False, averager_opts={"request_timeout": 1.0})
opt.delay_before_state_averaging.update(task_size=1, interval=0.0)  # as garden.collab.trainer primes local mode
def claim(tracker, epoch):
    with tracker.pause_updates():
        tracker.update_epoch(epoch)
    h.report_presence(tracker)
waited = {}
def move_on_once_waited():  # the other trainer ends the round's epoch once this one waits on its round
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        control = opt.scheduled_state
        if control is not None and control.triggered:
            waited["at"] = time.monotonic()
            if DECLARES:  # the other looks for a group on the same key (hivemind's GroupKeyManager without bits)
                key = f"{opt.state_averager.prefix}.0b"
                other.store(key, True, hivemind.utils.get_dht_time() + DECLARES, subkey=other.peer_id.to_bytes())
            claim(away, 1)
            return
        time.sleep(0.05)
try:
    h.report_presence(away)
    h.report_presence(opt.tracker)
    deadline = time.monotonic() + 30
    while opt.tracker.global_progress.num_peers < 2:
        assert time.monotonic() < deadline, "the other trainer never showed in the progress record"
        h.refresh_progress(opt.tracker)
        time.sleep(0.2)
    threading.Thread(target=move_on_once_waited, daemon=True).start()
    deadline = time.monotonic() + 90
    while opt.local_epoch == 0:
        assert time.monotonic() < deadline, said
        p.grad = torch.ones(3)
        opt.step()
        h.refresh_progress(opt.tracker)
        time.sleep(0.1)
    ended = time.monotonic()
    assert "at" in waited, said  # the round it waited on was the pre-scheduled one
    assert any("every other trainer is past epoch 0" in line for line in said), said
    assert ended - waited["at"] < 30, ended - waited["at"]  # hivemind alone: its 60 s averaging_timeout
    assert ended - waited["at"] >= DECLARES + h.DECLARATION_GRACE_S if DECLARES else True, ended - waited["at"]
    print("ok")
""" + STOP_ALL
    run_ok(script, timeout=180)


def test_a_round_is_given_up_only_when_every_other_trainer_is_past_it() -> None:
    """A hostile trainer that claims the next epoch stops no round another trainer still holds: it would make honest
    peers leave every round they could meet in."""
    assert hivemind_patches.all_past([3, 4], 2)
    assert not hivemind_patches.all_past([3, 2], 2)  # a liar at 3 beside an honest trainer still at 2
    assert not hivemind_patches.all_past([2], 2) and not hivemind_patches.all_past([1, 3], 2)
    assert not hivemind_patches.all_past([], 2)  # nobody else in the record: hivemind's timeout decides
    assert not hivemind_patches.all_past([-1, 5], 2)  # a claim that is no number counts as behind


def test_a_pre_scheduled_gradient_round_that_met_nobody_before_the_epoch_ended_counts_as_lone() -> None:
    """hivemind's optimizer drops a pre-scheduled gradient round that is already over when the epoch's step comes
    (it failed to find a group while the trainer still computed) and averages nothing: the parameter round after it
    would wait its full timeout for nobody. Found once as a flake of the test above, when its round ended early.
    In a fresh process with the patches installed, on the optimizer's own method (its other state stand-ins)."""
    script = """
import logging
from types import SimpleNamespace
from hivemind.averaging.control import StepControl
from hivemind.averaging.partition import AllreduceException
from hivemind.optim.optimizer import Optimizer
from hivemind.utils import MPFuture, get_dht_time
from garden.collab import hivemind_patches as h
h.install()
MPFuture()
def control(error):
    made = StepControl(scheduled_time=get_dht_time(), deadline=get_dht_time() + 5, allow_retries=True,
                       weight=1.0, data_for_gather=b"")
    made.attach(MPFuture(), MPFuture())
    if error is not None:
        made.set_exception(error)
    return made
def optimizer(scheduled, peers=2):
    return SimpleNamespace(scheduled_grads=scheduled, scheduled_state=None, status_loglevel=logging.DEBUG,
                           tracker=SimpleNamespace(global_progress=SimpleNamespace(num_peers=peers)),
                           state_averager=SimpleNamespace(_garden_lone=None))
met_nobody = optimizer(control(AllreduceException("Averaging step failed: could not find a group")))
assert Optimizer._begin_averaging_gradients(met_nobody, None) is False
assert met_nobody.scheduled_grads is None and met_nobody.state_averager._garden_lone is True
failed_later = optimizer(control(TimeoutError()))
assert Optimizer._begin_averaging_gradients(failed_later, None) is False
assert failed_later.state_averager._garden_lone is False  # a group met: its parameter round goes on
alone = optimizer(None, peers=1)  # nobody else in the swarm: no round at all, nothing said
assert Optimizer._begin_averaging_gradients(alone, None) is False
assert alone.state_averager._garden_lone is None
print("ok")
"""
    run_ok(script, timeout=120)


def test_found_no_group_tells_a_round_that_met_nobody_from_one_that_failed_later() -> None:
    from hivemind.averaging.control import AveragingStage, StepControl
    from hivemind.averaging.partition import AllreduceException
    from hivemind.utils import MPFuture, get_dht_time

    MPFuture()  # hivemind starts its futures' backend on MPFuture itself only when the first one is no subclass

    def control(stage: AveragingStage | None = None, error: BaseException | None = None) -> StepControl:
        made = StepControl(scheduled_time=get_dht_time(), deadline=get_dht_time() + 5, allow_retries=True,
                           weight=1.0, data_for_gather=b"")  # fmt: skip
        if stage is not None:
            made.stage = stage
        made.attach(MPFuture(), MPFuture())  # as the averager does (its trigger and cancel)
        if error is not None:
            made.set_exception(error)
        return made

    assert not hivemind_patches.found_no_group(None)  # no round began (no other trainer)
    assert hivemind_patches.found_no_group(control(AveragingStage.LOOKING_FOR_GROUP))  # given up on while looking
    assert not hivemind_patches.found_no_group(control(AveragingStage.RUNNING_ALLREDUCE))  # met, then timed out
    assert hivemind_patches.found_no_group(control(error=AllreduceException(
        "Averaging step failed: could not find a group")))  # fmt: skip
    assert not hivemind_patches.found_no_group(control(error=TimeoutError()))  # a group that failed mid-round
    cancelled = control(AveragingStage.LOOKING_FOR_GROUP)
    cancelled.cancel()
    assert not hivemind_patches.found_no_group(cancelled)


def hivemind_names(tree: ast.AST) -> set[str]:
    """The names a module binds to hivemind's modules, classes and functions by importing them."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hivemind"):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                         if alias.name.startswith("hivemind"))  # fmt: skip
    return names


def patches_outside(path: Path, source: str) -> list[str]:
    """Lines of ``source`` that assign (or ``setattr``) onto something imported from hivemind."""
    tree = ast.parse(source, str(path))
    names = hivemind_names(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for target in targets:
            root = target
            while isinstance(root, ast.Attribute | ast.Subscript):
                root = root.value
            if target is not root and isinstance(root, ast.Name) and root.id in names:
                found.append(f"{path}:{node.lineno}")
    return found


def test_the_check_for_patches_elsewhere_finds_them() -> None:
    source = """
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.compression import serialization
import hivemind
DecentralizedAverager.run = None
serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = None
setattr(hivemind.Optimizer, "step", None)
local = DecentralizedAverager
mine = object()
mine.run = None
"""
    assert patches_outside(Path("x.py"), source) == ["x.py:5", "x.py:6", "x.py:7"]


def test_no_other_module_patches_hivemind() -> None:
    """Every assignment onto hivemind lives in garden/collab/hivemind_patches.py, or (the p2p daemon's flags,
    below the collab level) garden/net/p2pd_patch.py."""
    allowed = {"garden/collab/hivemind_patches.py", "garden/net/p2pd_patch.py"}
    offenders = [
        line
        for path in sorted((ROOT / "garden").rglob("*.py"))
        if str(path.relative_to(ROOT)) not in allowed
        for line in patches_outside(path.relative_to(ROOT), path.read_text())
    ]
    assert not offenders, f"hivemind patched outside {sorted(allowed)}: {offenders}"


def test_the_p2pd_flags_patch_adds_its_flags_and_replaces_what_is_still_there() -> None:
    from garden.net import p2pd_patch

    for path, name in p2pd_patch.PATCHED:
        assert hasattr(hivemind_patches.owner(path), name), f"{path}.{name} is gone from hivemind"
    code = (
        "from garden.net import p2pd_patch\n"
        "from hivemind.p2p import P2P\n"
        "before = P2P._make_process_args('p2pd', relay=True)\n"
        "p2pd_patch.install({'relayDiscovery': False, 'relayMaxCircuits': 3})\n"
        "p2pd_patch.install({'relayTimeLimit': '60s'})\n"
        "print(before, P2P._make_process_args('p2pd', relay=True))\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "-relayDiscovery=0" not in done.stdout.split("]")[0]  # only after install, and only in that process
    assert "'-relayDiscovery=0'" in done.stdout and "'-relayMaxCircuits=3'" in done.stdout
    assert "'-relayTimeLimit=60s'" in done.stdout
