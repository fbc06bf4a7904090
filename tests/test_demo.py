"""``garden demo`` (the README's first command, ``make demo``) end to end, small: three local peers (the demo's
default) form a swarm, shake the real built-in teacher (24 prompts, 8 a shard: a shard each), train the real
pruned student, checkpoint, and the student is pulled through the last peer; the held-out KL to the
teacher falls. Every peer it started is gone afterwards. It takes about 130 s on two cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.serial]


@pytest.mark.timeout(900)  # the demo's own limit below; it takes 3-5 minutes on 2 cores
def test_the_demo_trains_a_student_closer_to_the_teacher(tmp_path: Path, model_cache: Path) -> None:
    work = tmp_path / "demo"
    env = {**os.environ, "GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if k != "GARDEN_DATA_DIR"}
    argv = [sys.executable, "-m", "garden", "demo", "--peers", "3", "--prompts", "24", "--epochs", "1",
            "--target-batch-size", "16", "--http-port", "0", "--dir", str(work)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "watch it at http://127.0.0.1:" in done.stdout
    assert "starting 3 peers" in done.stdout and "pulled the trained student" in done.stdout
    result = json.loads((work / "demo-result.json").read_text())
    assert result["heldout_kl_after"] < result["heldout_kl_before"], result
    # the trained student generates through `garden generate`; what it says is up to a minute of training
    # (in one of six runs of this small demo, its first token was already the end of its turn)
    assert result["sample_finish"] in ("stop", "length") and isinstance(result["sample_answer"], str), result
    assert (work / "student" / "model.safetensors").is_file()
    # the harvest: published as mission:<id>, served by a peer that never trained it, asked through /v1, rated,
    # exported to one GGUF file
    assert result["model"] == f"mission:{result['mission_id']}" and result["answer_id"].startswith("chatcmpl-")
    assert "published the student" in done.stdout and "rated it: accept" in done.stdout
    gguf = Path(result["gguf"])
    assert gguf.read_bytes()[:4] == b"GGUF" and result["gguf_bytes"] == gguf.stat().st_size > 10_000_000
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(work) in cmdline:
            leftovers.append(f"{proc.pid} {cmdline[:120]}")
    assert not leftovers, leftovers
