"""Files and directories put in place whole (:mod:`garden.durable`), and checkpoints that survive kill -9.

The kill tests run a real child process that rewrites a directory (or a real checkpoint of a tiny model)
over and over, kill it with SIGKILL at several moments, and check that what is in place is one whole
version, never a mix, never nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from garden import durable
from garden.durable import recover_dir, replace_file, swap_dir, write_bytes


def _version_dir(path: Path, version: int, files: int = 8) -> None:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"part-{i}.bin").write_bytes(f"{version}:".encode() * 20_000)
    (path / "version.json").write_text(json.dumps({"version": version, "files": files}))


def _whole_version(path: Path) -> int:
    """The one version ``path`` holds, asserting every file belongs to it."""
    manifest = json.loads((path / "version.json").read_text())
    version = manifest["version"]
    for i in range(manifest["files"]):
        assert (path / f"part-{i}.bin").read_bytes() == f"{version}:".encode() * 20_000, (path, i)
    return int(version)


def test_write_bytes_and_replace_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_bytes(target, b"one")
    write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    tmp = tmp_path / ".a.partial"
    tmp.write_bytes(b"three")
    replace_file(tmp, target)
    assert target.read_bytes() == b"three" and not tmp.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_dir_replaces_a_directory_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # a file system without RENAME_EXCHANGE: the rename-aside fallback
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    final = tmp_path / "ckpt"
    for version in (1, 2, 3):
        staging = tmp_path / "ckpt.partial"
        _version_dir(staging, version)
        swap_dir(staging, final)
        assert _whole_version(final) == version
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging, no old copy left


def test_recover_dir_after_a_crash_between_the_fallbacks_renames(tmp_path: Path) -> None:
    final, aside = tmp_path / "ckpt", tmp_path / "ckpt.old"
    _version_dir(aside, 1)  # the crash came after the old one went aside, before the new one arrived
    recover_dir(final)
    assert _whole_version(final) == 1 and not aside.exists()
    _version_dir(aside, 0)  # ... or after the new one arrived: the old one's leftovers go
    recover_dir(final)
    assert _whole_version(final) == 1 and not aside.exists()
    recover_dir(tmp_path / "never")  # nothing to do


SWAPPER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from garden.durable import swap_dir, write_bytes
    root, version = Path(sys.argv[1]), 0
    while True:
        version += 1
        staging = root / "ckpt.partial"
        staging.mkdir()
        for i in range(8):
            (staging / f"part-{i}.bin").write_bytes(f"{version}:".encode() * 20_000)
        (staging / "version.json").write_text(json.dumps({"version": version, "files": 8}))
        swap_dir(staging, root / "ckpt")
        write_bytes(root / "done", str(version).encode())  # whole, or the previous number: never empty
    """
)


def test_kill_9_while_swapping_directories_leaves_one_whole_version(tmp_path: Path) -> None:
    """What a pull and a checkpoint write do (``swap_dir``), killed at many moments."""
    import shutil

    for delay in (0.05, 0.13, 0.31, 0.57, 0.9):
        child = subprocess.Popen([sys.executable, "-c", SWAPPER, str(tmp_path)])
        deadline = time.monotonic() + 30
        while not (tmp_path / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        recover_dir(tmp_path / "ckpt")
        assert _whole_version(tmp_path / "ckpt") >= int((tmp_path / "done").read_text())
        shutil.rmtree(tmp_path / "ckpt.partial", ignore_errors=True)  # what the next writer does first
        (tmp_path / "done").unlink()


CHECKPOINTER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from garden.distill.checkpoints import RunDir
    student, run = Path(sys.argv[1]), RunDir(sys.argv[2])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    if not run.exists():
        run.create({"student": str(student)})
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        # the same step again and again: each save replaces the checkpoint of step 1 (a resume's rewrite)
        run.save(1, model, tokenizer, {"step": step}, {"loss": float(step)}, keep=2)
        (run.path / "saved").write_text(str(step))
    """
)


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one_whole_and_loadable(
    tmp_path: Path, model_cache: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from garden.distill.checkpoints import RunDir
    from harness.trainers import make_tiny_student

    student = make_tiny_student(tmp_path / "student")
    run_path = tmp_path / "run"
    for delay in (0.0, 0.3):  # at once, and mid-way through a later save
        child = subprocess.Popen([sys.executable, "-c", CHECKPOINTER, str(student), str(run_path)])
        deadline = time.monotonic() + 120
        while not (run_path / "saved").exists() and time.monotonic() < deadline:
            assert child.poll() is None, "the checkpointing child died"
            time.sleep(0.02)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        latest = RunDir(run_path).latest()
        assert latest is not None and latest.step == 1
        latest.verify()  # every file of the manifest, with its sha256
        AutoModelForCausalLM.from_pretrained(latest.model_dir)  # and it loads
        (run_path / "saved").unlink()
