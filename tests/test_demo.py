"""``garden demo`` (the README's first command, ``make demo``) end to end, small: three local peers (the demo's
default) form a swarm, shake the real built-in teacher (24 prompts, 8 a shard: a shard each), train the real
pruned student, checkpoint, and the student is pulled through the last peer; the held-out KL to the
teacher falls. Every peer it started is gone afterwards. It takes about 130 s on two cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from harness.daemons import printed_mission_id, wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.serial]


@pytest.mark.timeout(900)  # the demo's own limit below; it takes 3-5 minutes on 2 cores
def test_the_demo_trains_a_student_closer_to_the_teacher(tmp_path: Path, model_cache: Path) -> None:
    """With ``--keep``, as a user who then uses the harvest: the demo's student is in ``garden models`` with its
    evaluation and answers the official ``openai`` client, a rating by the CLI counts, and the next mission is made
    of that feedback; Ctrl+C then stops every peer."""
    work = tmp_path / "demo"
    env = {**os.environ, "GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if k != "GARDEN_DATA_DIR"}
    argv = [sys.executable, "-m", "garden", "demo", "--peers", "3", "--prompts", "24", "--epochs", "1",
            "--target-batch-size", "16", "--http-port", "0", "--dir", str(work), "--keep"]  # fmt: skip
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        # Ctrl+C's default even where the test runs in the background of a non-interactive shell, which starts it
        # with SIGINT ignored (and Python then never raises KeyboardInterrupt)
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        held = wait_until(lambda: _held(log, demo), 840, 2.0, "the demo's swarm held up (--keep)")
        check_the_harvest(work, held, env)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # Ctrl+C: the demo stops its peers, in order
        code = demo.wait(timeout=120)
    stdout = log.read_text()
    assert code == 0, stdout[-6000:]
    assert "watch it at http://127.0.0.1:" in stdout
    assert "starting 3 peers" in stdout and "pulled the trained student" in stdout
    result = json.loads((work / "demo-result.json").read_text())
    assert result["heldout_kl_after"] < result["heldout_kl_before"], result
    # the trained student generates through `garden generate`; what it says is up to a minute of training
    # (in one of six runs of this small demo, its first token was already the end of its turn)
    assert result["sample_finish"] in ("stop", "length") and isinstance(result["sample_answer"], str), result
    assert (work / "student" / "model.safetensors").is_file()
    # the harvest: published as mission:<id>, served by a peer that never trained it, asked through /v1, rated,
    # exported to one GGUF file
    assert result["model"] == f"mission:{result['mission_id']}" and result["answer_id"].startswith("chatcmpl-")
    assert "published the student" in stdout and "rated it: accept" in stdout
    gguf = Path(result["gguf"])
    assert gguf.read_bytes()[:4] == b"GGUF" and result["gguf_bytes"] == gguf.stat().st_size > 10_000_000
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(work) in cmdline:
            leftovers.append(f"{proc.pid} {cmdline[:120]}")
    assert not leftovers, leftovers


def _held(log: Path, demo: subprocess.Popen[str]) -> str | None:
    """The URL of the peer the demo's hints name, once it holds the swarm up; fails if the demo ended first."""
    text = log.read_text()
    assert demo.poll() is None or "the swarm stays up" in text, text[-6000:]
    if "the swarm stays up" not in text or "the dashboard, with its chat panel:" not in text:
        return None
    return text.split("garden models --url ", 1)[1].split()[0]


def check_the_harvest(work: Path, url: str, env: dict[str, str]) -> None:
    """What the README says to try once the demo holds its swarm up."""
    from openai import OpenAI

    result = json.loads((work / "demo-result.json").read_text())
    model, mission_id = result["model"], result["mission_id"]

    def garden(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "garden", *args, "--url", url], input=stdin, capture_output=True,
                              text=True, timeout=300, env=env | {"COLUMNS": "200"}, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    # garden models: the student, with the lead's evaluation of it, served whole by the fourth peer
    (entry,) = [m for m in json.loads(garden("models", "--json").stdout) if m["model"] == model]
    assert entry["complete"] and entry["servers"] >= 1, entry
    assert {"kl", "nll", "top1", "base_kl"} <= set(entry["student"]["metrics"]), entry["student"]
    assert entry["student"]["layers"] == 10 and entry["student"]["name"] == "demo-capitals"
    listed = garden("models").stdout
    assert f"mission:{mission_id[:12]}" in listed and "demo-capitals" in listed, listed
    # chat with it through the swarm, with the official client; rate the answer from the terminal
    client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
    assert model in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(
        model=f"mission:{mission_id[:12]}", messages=[{"role": "user", "content": "What is the capital of Peru?"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    # what it says is up to a minute of training: an empty answer (its turn ended at once) is an answer too
    assert chat.model == model and chat.id.startswith("chatcmpl-") and chat.usage is not None
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.prompt_tokens > 0
    edited = " ".join(garden("feedback", "edit", chat.id, "--text", "Lima.").stdout.split())  # the console wraps
    assert f"edit: {chat.id} (1 pair(s) kept on this machine)" in edited, edited
    # the next mission, from that feedback: the published student learns the edit; of the two rated prompts (the
    # demo accepted its own answer to another), the owner lets only this one leave (the newest is numbered 1)
    created = garden("mission", "create", "--from-feedback", str(work / "next.toml"), stdin="1\n")
    assert "What is the capital of Peru?" in created.stdout and "Lima." in created.stdout, created.stdout
    next_id = printed_mission_id(created.stdout)
    shown = json.loads(garden("mission", "show", next_id[:12], "--json").stdout)
    assert shown["prompts"] == 1 and shown["spec"]["prompts"] == "feedback", shown
    assert shown["spec"]["student"]["base"] == model, shown["spec"]
