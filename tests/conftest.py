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
import pytest

from tests.daemons import DaemonFactory


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One conversion cache for the whole run: the built-in GGUF is converted once (~25 s), then reused. Under
    pytest-xdist the workers share it (their base temp dirs have one parent): the first converts under a
    lock, the others wait and reuse it."""
    from garden import models

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "model-cache"
        root.mkdir(exist_ok=True)
        with open(root.parent / "model-cache.lock", "w") as lock:
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


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Real `garden run` processes; teardown stops them and fails the test on any orphaned child."""
    factory = DaemonFactory(tmp_path)
    yield factory
    orphans = factory.close()
    assert not orphans, f"processes outlived their daemons: {orphans}"


@pytest.fixture(autouse=True)
def _no_leaked_children() -> Iterator[None]:
    """In-process hivemind DHTs (and their p2pd) started by a test must be gone when it ends."""
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = []
    for proc in me.children(recursive=True):
        if proc.pid in before:
            continue
        try:
            proc.wait(timeout=5)
        except psutil.TimeoutExpired:
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            pass
    assert not leaked, f"test left child processes running: {leaked}"
