from __future__ import annotations

import fcntl
import os
from pathlib import Path
from collections.abc import Iterator

import psutil

# as the daemon does (garden/cli/peer.py): no torch_shm_manager beside in-process hivemind DHTs
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the light tests two at a time on machines with two cores: one compute thread per
    # worker (and per daemon it starts), or the two workers' thread pools fight over the cores and each
    # torch op waits on the other's spinning threads (the shaker's tests ran 8x slower). Before torch loads.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
# No test reaches the Hugging Face hub, not even for a model's size: set before any test module imports
# huggingface_hub (it reads the variable once, at import), and inherited by every process a test starts. A
# test of the hub path points ``HF_ENDPOINT`` at a server of its own on 127.0.0.1.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest

from harness.daemons import DaemonFactory

LOG_TAIL = 60
SHARED_MODEL_CACHE_ENV = "GARDEN_TEST_MODEL_CACHE"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make check`, `make test`: ``--dist loadfile --no-loadscope-reorder``), the order in which
    the two workers are handed test files: each takes the next file in this order when it is nearly done with its
    own, so the longest files go first (a long file handed out last keeps one worker busy while the other has
    nothing left). A file marked ``heavy(seconds)`` takes about that long; the others a few seconds at most.

    The costliest file that needs the built-in model goes first, then every file that needs no model, then the
    other model files: while the first worker converts the model (once per run, ~15 s, ``model_cache``), the
    second runs files that do not wait for it. The tests of a file keep their order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)

    def seconds(name: str) -> float:
        marker = files[name][0].get_closest_marker("heavy")
        return float(marker.args[0]) if marker is not None else 0.0

    needs_model = {f for f in files if any("model_cache" in item.fixturenames for item in files[f])}
    model = sorted((f for f in files if f in needs_model), key=seconds, reverse=True)
    free = sorted((f for f in files if f not in needs_model), key=seconds, reverse=True)
    items[:] = [item for name in model[:1] + free + model[1:] for item in files[name]]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One conversion cache for the whole run: the built-in GGUF is converted once (~15 s), then reused. Under
    pytest-xdist the workers share it (their base temp dirs have one parent): the first converts under a
    lock, the others wait and reuse it. ``make test`` and ``make check`` run pytest twice and name one cache for
    both runs in ``GARDEN_TEST_MODEL_CACHE`` (a directory they make and remove)."""
    from garden.models import loading as models

    shared = os.environ.get(SHARED_MODEL_CACHE_ENV)
    if shared or os.environ.get("PYTEST_XDIST_WORKER"):
        root = Path(shared) if shared else tmp_path_factory.getbasetemp().parent / "model-cache"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "conversion.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            previous = os.environ.get(models.CACHE_ENV)
            os.environ[models.CACHE_ENV] = str(root)
            models.converted_gguf(models.builtin_gguf("smollm2-135m"))
    else:
        root = tmp_path_factory.mktemp("model-cache")
        previous = os.environ.get(models.CACHE_ENV)
        os.environ[models.CACHE_ENV] = str(root)
    yield root
    if previous is None:
        os.environ.pop(models.CACHE_ENV, None)
    else:
        os.environ[models.CACHE_ENV] = previous


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands run by tests without --data-dir (e.g. `garden shake`, which stores rows) must never touch the
    real user's data dir: point the default at a throwaway one."""
    previous = os.environ.get("GARDEN_DATA_DIR")
    os.environ["GARDEN_DATA_DIR"] = str(tmp_path_factory.mktemp("default-data-dir"))
    yield
    if previous is None:
        os.environ.pop("GARDEN_DATA_DIR", None)
    else:
        os.environ["GARDEN_DATA_DIR"] = previous


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so that a fixture's teardown knows whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def daemons(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """Real `garden run` processes; teardown stops them and fails the test on any orphaned child. When the test
    failed, the end of every daemon's log is printed: on a CI machine it is all there is to learn from."""
    factory = DaemonFactory(tmp_path)
    yield factory
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        for daemon in factory.daemons:
            print(f"\n----- the log of the daemon in {daemon.data_dir.name} (last {LOG_TAIL} lines) -----")
            print("\n".join(daemon.stderr().splitlines()[-LOG_TAIL:]))
    orphans = factory.close()
    assert not orphans, f"processes outlived their daemons: {orphans}"


@pytest.fixture(autouse=True)
def _no_leaked_children() -> Iterator[None]:
    """In-process hivemind DHTs (and their p2pd) started by a test must be gone when it ends. A process started by
    one that was already running (a module's daemon, which starts its sampling process when a test gives it a
    mission) is that process's to stop, and the fixture that started it checks for orphans."""
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = []
    for proc in me.children(recursive=True):
        try:
            ancestors = {parent.pid for parent in proc.parents()}
        except psutil.Error:
            continue
        if proc.pid in before or ancestors & before:
            continue
        try:
            proc.wait(timeout=5)
        except psutil.TimeoutExpired:
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            pass
    assert not leaked, f"test left child processes running: {leaked}"
