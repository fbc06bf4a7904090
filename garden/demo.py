"""``garden demo`` (``make demo``): the whole job on one machine, end to end, with nothing to download.

Three peers on 127.0.0.1 (their own data dirs, ``--max-threads 1`` each) form a new swarm; the first
creates a mission that distils the built-in SmolLM2-135M into a 10-layer student on the built-in demo
prompts; the swarm shakes the teacher, trains the student together (hivemind averaging), and
checkpoints; the demo pulls the checkpoint through a peer; the lead publishes the student as the swarm's
model ``mission:<id>``, a fourth peer that never trained it serves it, the demo asks it through ``/v1``, rates
the answer and exports the student to GGUF; it evaluates the student on the held-out prompts before and after
(KL to the teacher), prints a sample answer, and stops every peer, on Ctrl+C too (``--keep``: after Ctrl+C).
It talks to the peers only through their HTTP ports and the ``garden`` CLI, as a user would.

Why these sizes: they finish in about 10 minutes on a 2-core machine (``--prompts`` and ``--epochs``
make it longer and better).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from garden.lifecycle import STOP_WITH_ENV

TEACHER = "builtin:smollm2-135m"
STUDENT_LAYERS = (0, 1, 11, 20, 22, 23, 24, 27, 28, 29)
"""The 10 of the teacher's 30 layers the student keeps: those of highest Block Influence on the demo prompts, as
``garden mission layers`` prints them (tests/cli/test_mission_cli.py checks that it still does). Trained the
same, they end 35 % closer to the teacher than 10 evenly spaced layers (docs/training.md)."""
STUDENT = "prune:" + TEACHER + ":layers=" + ",".join(map(str, STUDENT_LAYERS))
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


@dataclass
class DemoSettings:
    peers: int = 3
    prompts: int = 64
    epochs: int = 6
    target_batch_size: int = 32
    http_port: int = 8765
    work_dir: Path | None = None
    timeout: float = 1800.0
    keep: bool = False  # the swarm stays up after the demo, until Ctrl+C


@dataclass
class _Peer:
    name: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path
    url: str = ""
    join_addr: str = ""


def say(message: str) -> None:
    print(f"garden demo: {message}", flush=True)


def mission_spec(settings: DemoSettings) -> dict[str, Any]:
    return {
        "name": "demo-capitals",
        "teachers": [TEACHER],
        "prompts": "builtin:demo",
        "shard_size": 8,
        "student": {"base": TEACHER, "layers": list(STUDENT_LAYERS)},
        "sampling": {"candidates": 2, "max_new_tokens": 24, "top_k_logprobs": 20},
        "judge": {"kind": "reference"},
        "train": {
            "lr": 6e-4, "lambda_or": 0.1, "lambda_kl": 2.0, "target_batch_size": settings.target_batch_size,
            "max_epochs": settings.epochs, "warmup_epochs": 0, "mode": "local", "compression": "fp16",
            "checkpoint_every": settings.epochs, "matchmaking_time": 3.0, "averaging_timeout": 60.0,
        },
    }  # fmt: skip


SAMPLE_PROMPT = "What is the capital of France?"


def next_mission_toml(mission_id: str) -> str:
    """The next mission of the loop (``--keep`` writes it): the published student learns your rated prompts, the
    answers you accepted or edited as references, from the built-in teacher."""
    return f"""# The next mission, made of your feedback: garden mission create --from-feedback next.toml
# (its prompts are your rated prompts, their references your accepted or edited answers; docs/missions.md)
name = "demo-next"
teachers = ["{TEACHER}"]
shard_size = 8

[student]
base = "mission:{mission_id}"                 # the student this demo published, trained one mission more

[sampling]
candidates = 2
max_new_tokens = 24
top_k_logprobs = 20

[judge]
kind = "reference"

[train]
lr = 6e-4
lambda_kl = 2.0
target_batch_size = 16
max_epochs = 2
warmup_epochs = 0
"""


def _finish_reason(stderr: str) -> str | None:
    """``stop`` or ``length`` from ``garden generate``'s closing line (``N tokens in … s (…); stop``)."""
    for line in reversed(stderr.strip().splitlines()):
        if " tokens in " in line and ";" in line:
            return line.rsplit(";", 1)[1].strip() or None
    return None


def _garden(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garden", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class Demo:
    def __init__(self, settings: DemoSettings):
        self.settings = settings
        self.peers: list[_Peer] = []
        self.base = Path(settings.work_dir or tempfile.mkdtemp(prefix="garden-demo-"))
        self.base.mkdir(parents=True, exist_ok=True)

    # --- peers -------------------------------------------------------------------------------------
    def start_peer(self, index: int, *extra: str) -> _Peer:
        name = f"peer{index + 1}"
        data_dir = self.base / name
        log = self.base / f"{name}.log"
        port = self.settings.http_port + index if self.settings.http_port else 0
        # --vouch-quiet 5: the demo's few prompts are shaken long before the last checkpoint, so the lead's judging
        # crowds nothing; the default 30 s of quiet would only make the person watching wait
        argv = [
            sys.executable, "-m", "garden", "run", "--data-dir", str(data_dir), "--http-port", str(port),
            "--host-maddr", "/ip4/127.0.0.1/tcp/0", "--max-threads", "1", "--announce-period", "2",
            "--train-batch-size", "2", "--vouch-quiet", "5", *extra,
        ]  # fmt: skip
        if self.peers:
            argv += ["--join", self.peers[0].join_addr]
        with open(log, "wb") as out:
            # a session of its own (Ctrl+C reaches the demo, which stops its peers in order), tied to the demo's
            # life: a demo killed outright leaves no peer behind
            env = {**os.environ, STOP_WITH_ENV: str(os.getpid())}
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)  # fmt: skip
        peer = _Peer(name, proc, data_dir, log)
        self.peers.append(peer)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
            try:
                info = json.loads((data_dir / "daemon.json").read_text())
            except (OSError, ValueError):
                info = None
            if info and info.get("pid") == proc.pid:
                peer.url, peer.join_addr = info["url"], info["addresses"][0]
                return peer
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start in {START_TIMEOUT:.0f} s; its log: {log}")

    def stop(self) -> None:
        for peer in self.peers:
            if peer.proc.poll() is None:
                peer.proc.send_signal(signal.SIGTERM)
        for peer in self.peers:
            try:
                peer.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(peer.proc.pid, signal.SIGKILL)  # its own session: the daemon and its children
                peer.proc.wait(timeout=10)
        self.peers.clear()

    # --- the job -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        settings = self.settings
        say("warming up the built-in model (converted once into the cache; the first time takes ~15 s)")
        from garden.data import demo_prompts
        from garden.models.loading import load_model

        load_model(TEACHER)
        say(f"starting {settings.peers} peers on 127.0.0.1 in {self.base}")
        for index in range(settings.peers):
            peer = self.start_peer(index)
            say(f"  {peer.name}: {peer.url}")
        lead = self.peers[0]
        prompts = [{"prompt": p.prompt, "reference": p.reference} for p in demo_prompts()[: settings.prompts]]
        response = httpx.post(f"{lead.url}/missions", json={"spec": mission_spec(settings), "prompts": prompts},
                              timeout=60)  # fmt: skip
        if response.status_code != 201:
            raise RuntimeError(f"creating the mission failed: {response.status_code} {response.text[:1000]}")
        mission_id = response.json()["id"]
        say(f"mission {mission_id[:12]} created; watch it at {lead.url}/missions/{mission_id}")
        say(f"  or: garden mission show {mission_id[:12]} --url {lead.url}")
        started = time.monotonic()
        self.watch(mission_id, started)
        shaking_s = round(time.monotonic() - started, 1)

        self.wait_for_checkpoint(mission_id)
        out = self.base / "student"
        pulled = _garden("mission", "pull", mission_id, "-o", str(out), "--url", self.peers[-1].url, timeout=1200)
        if pulled.returncode != 0:
            raise RuntimeError(f"pulling the checkpoint failed: {pulled.stderr[-2000:]}")
        say(f"pulled the trained student into {out} (vouched for by the lead, every file's sha256 checked)")
        harvest = self.harvest(mission_id)
        if not self.settings.keep:
            self.stop()  # the evaluation wants the CPU
        say("evaluating on the held-out demo prompts (KL to the teacher, before and after)")
        before, after = evaluate_students([STUDENT, str(out)])
        answer = _garden("generate", "--model", str(out), "--max-new-tokens", "24", SAMPLE_PROMPT)
        if answer.returncode != 0:
            raise RuntimeError(f"the trained student does not generate: {answer.stderr[-2000:]}")
        result = {
            "mission_id": mission_id,
            "seconds_to_trained": shaking_s,
            "heldout_kl_before": before.get("kl"),
            "heldout_kl_after": after.get("kl"),
            "top1_before": before.get("top1"),
            "top1_after": after.get("top1"),
            "sample_answer": answer.stdout.strip(),
            "sample_finish": _finish_reason(answer.stderr),
            "student": str(out),
            **harvest,
        }
        say(f"held-out KL(teacher || student): {before.get('kl'):.3f} before -> {after.get('kl'):.3f} after")
        say(f"top-1 agreement with the teacher: {before.get('top1'):.3f} -> {after.get('top1'):.3f}")
        if answer.stdout.strip():
            say(f"the student answers {SAMPLE_PROMPT!r}: {answer.stdout.strip()!r}")
        else:  # a student trained for a minute is still far from its teacher: it may end its turn at once
            say(f"the student ends its answer to {SAMPLE_PROMPT!r} at once (train longer: --epochs, --prompts)")
        return result

    def harvest(self, mission_id: str) -> dict[str, Any]:
        """The student as the swarm's model: published by the lead, served by a peer that never trained it, asked
        through ``/v1`` and rated, and exported to GGUF for llama.cpp and Ollama."""
        model, lead, asker = f"mission:{mission_id}", self.peers[0], self.peers[-1]
        deadline = time.monotonic() + 300
        while not any(m["model"] == model for m in httpx.get(f"{asker.url}/models", timeout=30).json()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the lead did not publish the student in 300 s; see {lead.log}")
            time.sleep(1.0)
        say(f"the lead published the student as the swarm's model {model[:20]}…: garden models --url {asker.url}")
        server = self.start_peer(len(self.peers), "--roles", "server", "--serve", f"mission:{mission_id[:12]}")
        say(f"  {server.name} ({server.url}), which never trained it, serves it (pulled and checked on first use)")
        while not any(m["id"] == model for m in httpx.get(f"{asker.url}/v1/models", timeout=30).json()["data"]):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} did not serve {model}; see {server.log}")
            time.sleep(1.0)
        body = {"model": f"mission:{mission_id[:12]}", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": SAMPLE_PROMPT}]}  # fmt: skip
        answer = httpx.post(f"{asker.url}/v1/chat/completions", json=body, timeout=300).json()
        text = answer["choices"][0]["message"]["content"]
        say(f"asked through the swarm (/v1, served by {server.name}): {text!r}")
        rated = httpx.post(f"{asker.url}/v1/feedback", json={"id": answer["id"], "verdict": "accept"}, timeout=60)
        say(f"rated it: accept ({rated.json().get('pairs')} pairs so far; garden feedback list --url {asker.url})")
        gguf = self.base / "student-q8_0.gguf"
        exported = _garden("export", f"mission:{mission_id[:12]}", "-o", str(gguf), "--quant", "q8_0", "--url",
                           asker.url, timeout=1200)  # fmt: skip
        if exported.returncode != 0:
            raise RuntimeError(f"exporting the student failed: {exported.stderr[-2000:]}")
        say(f"exported it for llama.cpp and Ollama: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB; docs/export.md)")
        return {"model": model, "swarm_answer": text, "answer_id": answer["id"], "gguf": str(gguf),
                "gguf_bytes": gguf.stat().st_size}  # fmt: skip

    def hold(self, mission_id: str) -> None:
        """Keep the swarm up (``--keep``) until Ctrl+C, saying what to try."""
        asker = self.peers[-2] if len(self.peers) > 1 else self.peers[0]
        following = self.base / "next.toml"
        following.write_text(next_mission_toml(mission_id))
        say("the swarm stays up; Ctrl+C stops every peer. Try, in another terminal:")
        for line in (
            f"garden models --url {asker.url}",
            f"garden generate --swarm mission:{mission_id[:12]} \"What is the capital of Peru?\" --url {asker.url}",
            f"garden feedback edit --text \"Lima.\" --url {asker.url}",
            f"garden mission create --from-feedback {following} --url {asker.url}",
            f"the dashboard, with its chat panel: {asker.url}/",
        ):
            say(f"  {line}")
        while all(p.proc.poll() is None for p in self.peers):
            time.sleep(1.0)
        raise RuntimeError("a peer exited; see its log in " + str(self.base))

    def watch(self, mission_id: str, started: float) -> None:
        """Until every peer's trainer is done; a line every 10 s."""
        last = 0.0
        while True:
            elapsed = time.monotonic() - started
            if elapsed > self.settings.timeout:
                raise RuntimeError(f"the mission did not finish in {self.settings.timeout:.0f} s")
            for peer in self.peers:
                if peer.proc.poll() is not None:
                    raise RuntimeError(f"{peer.name} exited with {peer.proc.returncode}; see {peer.log}")
            views = []
            for peer in self.peers:
                try:
                    views.append(httpx.get(f"{peer.url}/missions/{mission_id}", timeout=30).json())
                except (httpx.HTTPError, ValueError):
                    views.append({})
            trains = [v.get("train") or {} for v in views]
            if trains and all(t.get("state") == "done" for t in trains):
                return
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                shards = (views[0].get("shards") or {}) if views else {}
                epochs = ", ".join(f"{t.get('epoch', 0)}" for t in trains)
                loss = next((t["loss"] for t in trains if t.get("loss") is not None), None)
                say(
                    f"{elapsed:5.0f} s: shards {shards.get('done', 0)}/{shards.get('total', '?')} done, "
                    f"{views[0].get('rows', 0) if views else 0} rows; epochs per peer [{epochs}] of "
                    f"{self.settings.epochs}" + (f"; loss {loss:.3f}" if loss is not None else "")
                )
            time.sleep(2)

    def wait_for_checkpoint(self, mission_id: str, timeout: float = 300.0) -> None:
        """The last epoch's checkpoint is written when training ends; its holder announces it a moment later, and
        the lead pulls it, evaluates it and vouches for it (a pull takes verified checkpoints only)."""
        url = f"{self.peers[-1].url}/missions/{mission_id}/checkpoints"
        deadline = time.monotonic() + timeout
        said = False
        while time.monotonic() < deadline:
            try:
                listed = [c for c in httpx.get(url, timeout=30).json() if c["epoch"] >= self.settings.epochs]
            except (httpx.HTTPError, ValueError, TypeError, KeyError):
                listed = []
            if any(c.get("verified") for c in listed):
                return
            if listed and not said:
                say("the last checkpoint is announced; the lead checks it and vouches for it before anyone pulls it")
                said = True
            time.sleep(1.0)
        raise RuntimeError(
            f"the lead did not vouch for a checkpoint of epoch {self.settings.epochs} in {timeout:.0f} s "
            f"(announced: {said}); see {self.peers[0].url}/missions/{mission_id} and the lead's log"
        )



def evaluate_students(students: list[str]) -> list[dict[str, Any]]:
    """What ``garden eval --data builtin:demo`` reports, for each student, in this process: the teacher (loaded
    at warm-up) fills the held-out rows' top-k once for all of them, which saves a teacher pass and two
    interpreter starts per student."""
    from garden.models.loading import load_model
    from garden.distill.evaluate import StudentEvaluator

    evaluated = StudentEvaluator("builtin:demo", lambda: load_model(TEACHER), teacher_ref=TEACHER)
    return [evaluated(student) for student in students]


def run_demo(settings: DemoSettings) -> int:
    demo = Demo(settings)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        result = demo.run()
        (demo.base / "demo-result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        if settings.keep:
            demo.hold(result["mission_id"])
    except KeyboardInterrupt:
        if settings.keep and (demo.base / "demo-result.json").is_file():
            say("stopping the peers")
            return 0
        say("interrupted: stopping the peers")
        return 130
    except (RuntimeError, OSError, httpx.HTTPError) as e:
        say(f"error: {e}")
        return 1
    finally:
        demo.stop()
    say(f"the peers' data dirs, logs and the student are kept in {demo.base} (delete it when done)")
    return 0
