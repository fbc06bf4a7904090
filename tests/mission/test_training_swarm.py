"""Missions trained across real daemons: each trainer peer's daemon starts, supervises and stops its
trainer worker; shaking and training overlap; the swarm ends with one model.

The student is a tiny random Llama with the built-in tokenizer (an epoch takes seconds); the teacher
is the real built-in model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from garden.data import demo_prompts
from harness.daemons import Daemon, DaemonFactory, wait_until
from tests.mission.test_missions_forged import metric
from harness.trainers import make_tiny_student

pytestmark = [pytest.mark.swarm, pytest.mark.serial]
TEACHER = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    from garden.models.loading import builtin_gguf, converted_gguf

    converted_gguf(builtin_gguf("smollm2-135m"))
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


def start(factory: DaemonFactory, cache: Path, *args: str, join: Daemon | None = None, **kwargs: Any) -> Daemon:
    extra = ["--join", join.join_addr] if join is not None else []
    env = {"GARDEN_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    # a lead judges a checkpoint 5 s after its shaking pauses (30 s by default): the tests wait less, the order of
    # shaking and judging is the same
    return factory.start(*extra, "--max-threads", "1", "--train-batch-size", "2", "--vouch-quiet", "5", *args,
                         env=env, **kwargs)  # fmt: skip


EPOCHS = 2


def mission_body(
    student: Path, max_epochs: int = EPOCHS, min_trainers: int = 1, averaging_timeout: float = 15.0
) -> dict[str, Any]:
    rows = demo_prompts()[:8]
    return {
        "spec": {
            "name": "train-test",
            "teachers": [TEACHER],
            "prompts": "prompts.jsonl",
            "shard_size": 2,
            "student": {"base": str(student)},
            "sampling": {"candidates": 2, "max_new_tokens": 6, "top_k_logprobs": 4},
            "train": {"target_batch_size": 64, "max_epochs": max_epochs, "warmup_epochs": 0, "lr": 1e-2,
                      "matchmaking_time": 2.0, "averaging_timeout": averaging_timeout, "min_trainers": min_trainers},
        },
        "prompts": [{"prompt": r.prompt, "reference": r.reference} for r in rows],
    }  # fmt: skip


def create(daemon: Daemon, body: dict[str, Any]) -> str:
    response = daemon.request("POST", "/missions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def training(daemon: Daemon, mission_id: str) -> dict[str, Any]:
    response = daemon.get(f"/missions/{mission_id}")
    return (response.json().get("train") or {}) if response.status_code == 200 else {}


def final_params(daemon: Daemon, mission_id: str) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(training(daemon, mission_id)["last_checkpoint"]["path"]) / "model" / "model.safetensors"
    tensors = load_file(str(path))
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


def publish_poisoned(root: Path, mission_id: str, student: Path, epoch: int) -> None:
    """A run directory under ``root`` (as a trainer's daemon keeps one) whose checkpoint of ``epoch`` holds
    ``student``'s weights, poisoned: every parameter times -3, and the final norm's times 1000, so that its answers
    are confidently wrong (a tiny student's logits are near zero: sign and scale alone left it about as far from
    the teacher as the trained one, within the lead's 10 % margin)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from garden.distill.checkpoints import RunDir

    run = RunDir(root / "train" / mission_id / "out")
    run.create({"student": "poisoned"})
    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-3.0)
        model.model.norm.weight.mul_(1000.0)
    run.save(epoch, model, tokenizer, {"step": epoch}, {"loss": 0.0}, keep=2)


def garden_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garden", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.timeout(600)
def test_two_peers_shake_and_train_one_student(
    daemons: DaemonFactory, model_cache: Path, tiny: Path, tmp_path: Path
) -> None:
    a = start(daemons, model_cache)
    # the student is a path on this machine: b uses it only because it trusts a's missions with local models
    b = start(daemons, model_cache, "--trust-lead", a.peer_id, "--allow-local-models", join=a)
    # both train from the first step: neither worker may train the 2 epochs alone while the other is still
    # shaking its first shard or starting its process (it would then load the finished state and never average)
    mission_id = create(a, mission_body(tiny, min_trainers=2))

    states: list[str] = []  # the mission's life as its lead tells it, each state once, in the order seen

    def trained(*daemons: Daemon, epoch: int = 0) -> bool:
        state = a.get(f"/missions/{mission_id}").json()["state"]
        states.extend([state] if not states or states[-1] != state else [])
        views = [training(d, mission_id) for d in daemons]
        return all(v.get("state") == "done" if not epoch else v.get("epoch", 0) >= epoch for v in views)

    wait_until(lambda: trained(a, epoch=1), 180, 0.5, "a trained an epoch")
    assert wait_until(lambda: trained(a, b), 180, 1.0, "both trained")
    for daemon in (a, b):
        train = training(daemon, mission_id)
        assert train["epoch"] == EPOCHS and train["max_epochs"] == EPOCHS and train["restarts"] == 0
        assert train["rows"] > 0 and train["samples"] > 0 and train["skipped_steps"] == 0
        assert train["rows_held_out"] == 0  # 8 prompts: too few to hold any out (garden.protocol.rows.holds_out)
        assert train["loss"] is not None
    # both trained the same student (equal parameters after a joint round are checked at the worker level,
    # tests/trainer/test_collab_swarm.py; here two busy daemons shake beside, and a late round may be missed)
    pa, pb = (torch.tensor(training(d, mission_id)["params_probe"], dtype=torch.float64) for d in (a, b))
    assert torch.isfinite(pa).all() and torch.isfinite(pb).all()
    assert all(training(d, mission_id)["bytes_sent"] > 0 for d in (a, b))  # they averaged
    writers = [d for d in (a, b) if (training(d, mission_id).get("last_checkpoint") or {}).get("epoch") == EPOCHS]
    assert writers, "no peer wrote the last epoch's checkpoint"
    assert torch.isfinite(final_params(writers[0], mission_id)).all()
    metrics = b.get("/metrics").text
    assert f'garden_train_epoch{{mission="{mission_id}",name="train-test"}} {EPOCHS}.0' in metrics
    shown = garden_cli("mission", "show", mission_id[:12], "--url", a.url)
    assert shown.returncode == 0 and f"epoch {EPOCHS}/{EPOCHS}" in shown.stdout
    assert "training here: done" in shown.stdout
    # shaking, then training while any shard was shaken (the dashboard said "done" then), then trained, until the
    # lead publishes the student (below); never backwards
    told = state_shown(shown.stdout, mission_id)
    states.extend([told] if states[-1] != told else [])
    life = ["fetching", "shaking", "training", "trained", "published"]
    assert "training" in states and told in ("trained", "published"), states
    assert states == sorted(states, key=life.index), states

    # the checkpoint is announced, pulled through the other peer (over P2P unless it wrote one too),
    # hash-checked, and loads as a model
    writer = writers[0]
    other = b if writer is a else a

    def announced() -> set[int]:
        return {c["epoch"] for c in other.get(f"/missions/{mission_id}/checkpoints").json()}

    wait_until(lambda: EPOCHS in announced(), 30, 0.5, "the last epoch's checkpoint announced")

    # the lead (a) pulls it, evaluates it on rows it holds and vouches for it: a pull takes verified ones only
    def vouched() -> dict | None:
        listed = other.get(f"/missions/{mission_id}/checkpoints").json()
        return next((c for c in listed if c["epoch"] == EPOCHS and c["verified"]), None)

    verified = wait_until(vouched, 180, 1.0, "the lead vouched for the last epoch's checkpoint")
    assert verified["vouched_by"] == a.peer_id and verified["vouch_metrics"]["kl"] >= 0.0
    assert verified["vouch_metrics"]["kl"] <= 1.1 * verified["vouch_metrics"]["base_kl"] + 0.02
    assert verified["vouch_metrics"]["heldout_rows"] == 0 < verified["vouch_metrics"]["rows"]  # measured on, said so
    out = tmp_path / "pulled"
    pulled = garden_cli("mission", "pull", mission_id[:12], "-o", str(out), "--url", other.url)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    said = " ".join(pulled.stdout.split())  # the console wraps long lines
    assert "every sha256 checked" in said and f"vouched for by {a.peer_id}" in said, said
    from safetensors.torch import load_file

    got = torch.cat([t.reshape(-1) for _, t in sorted(load_file(str(out / "model.safetensors")).items())])
    # the last epoch's checkpoint of a writer (both may write one when the last round did not gather both)
    assert any(torch.equal(got, final_params(w, mission_id)) for w in writers)
    generated = garden_cli("generate", "--model", str(out), "--max-new-tokens", "4", "Hello")
    assert generated.returncode == 0, generated.stderr[-2000:]
    # the student becomes the swarm's model; its server (which pulled it) announces its copy too
    server = check_published_student(daemons, model_cache, a, b, other, mission_id, verified["vouch_metrics"])
    published_manifest = next(m for m in other.get("/models").json() if m["model"] == f"mission:{mission_id}")[
        "student"]["manifest_sha256"]

    # a hostile trainer announces a poisoned checkpoint of the last epoch (its own files, which it serves): the
    # lead pulls it, finds it worse than the one it vouched for, and does not vouch; pulls still take the vouched
    poisoned_root = tmp_path / "hostile"
    publish_poisoned(poisoned_root, mission_id, out, EPOCHS)
    hostile = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hostile_checkpoint.py")), a.join_addr, str(poisoned_root),
         mission_id, "garden", "student"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: "is not vouched for" in a.stderr(), 180, 1.0, "the lead refused the poisoned checkpoint")
        listed = other.get(f"/missions/{mission_id}/checkpoints").json()
        strangers = [c for c in listed if c["peer_id"] not in (a.peer_id, b.peer_id, server.peer_id)]
        assert strangers and not any(c["verified"] for c in strangers), listed
        # it also published its checkpoint as the mission's student: dropped (only the lead publishes), counted
        def dropped() -> bool:
            other.get("/models")  # the swarm's students are read (and checked) when listed
            return metric(other, 'garden_invalid_mission_records_total{kind="student"}') > 0

        wait_until(dropped, 60, 1.0, "the forged student record dropped")
        (entry,) = [m for m in other.get("/models").json() if m["model"] == f"mission:{mission_id}"]
        assert entry["student"]["lead"] == a.peer_id and entry["student"]["manifest_sha256"] == published_manifest
        # and it squats the name: its own mission "train-test" with a published student. b works for a only: the
        # name still means a's student there (the stranger's is listed, untrusted, and reachable by its id only)
        def squatter() -> dict | None:
            listed = b.get("/models").json()
            return next((m for m in listed if (m.get("student") or {}).get("lead") not in (None, a.peer_id)), None)

        squat = wait_until(squatter, 60, 1.0, "the squatter's student listed")
        assert squat["student"]["name"] == "train-test" and not squat["student"]["trusted"]
        pulled = b.request("POST", "/models/pull", json={"model": "mission:train-test"}, timeout=120)
        assert pulled.status_code == 200 and pulled.json()["model"] == f"mission:{mission_id}", pulled.text
        again = garden_cli("mission", "pull", mission_id[:12], "-o", str(tmp_path / "pulled-again"), "--url", other.url)
        assert again.returncode == 0, again.stdout + again.stderr
        from safetensors.torch import load_file as load_again

        pulled_again = load_again(str(tmp_path / "pulled-again" / "model.safetensors"))
        again_params = torch.cat([t.reshape(-1) for _, t in sorted(pulled_again.items())])
        # a vouched version of the last epoch (each writer's is judged and may be vouched for), never the poisoned
        assert any(torch.equal(again_params, final_params(w, mission_id)) for w in writers)
    finally:
        hostile.terminate()
        hostile.wait(timeout=30)
    # bad requests: a clear status, nothing fetched
    base = f"/missions/{mission_id}/checkpoints"
    assert other.request("POST", f"{base}/abc/pull").status_code == 422
    missing = other.request("POST", f"{base}/999/pull")
    assert missing.status_code == 404 and "announces" in missing.json()["detail"]
    assert other.get(f"{base}/{EPOCHS}/files/model/../../garden.sqlite3").status_code == 404
    weights = f"{base}/{EPOCHS}/files/model/model.safetensors"
    assert other.get(weights, params={"sha256": "0" * 64}).status_code == 404  # no such version held
    assert other.get(weights, params={"sha256": "not hex"}).status_code == 422
    assert other.get(f"/missions/{'0' * 64}/checkpoints").status_code == 404

    # a file that changes after it was announced is refused: nothing is written
    written = Path(training(writer, mission_id)["last_checkpoint"]["path"]) / "model" / "model.safetensors"
    damaged = bytearray(written.read_bytes())
    damaged[-1] ^= 0xFF
    written.write_bytes(bytes(damaged))
    shutil.rmtree(other.data_dir / "checkpoints", ignore_errors=True)
    if other is not writer and training(other, mission_id).get("last_checkpoint"):  # both wrote one
        own = Path(training(other, mission_id)["last_checkpoint"]["path"]) / "model" / "model.safetensors"
        own.write_bytes(bytes(damaged))
    refused = garden_cli("mission", "pull", mission_id[:12], "-o", str(tmp_path / "again"), "--url", other.url)
    assert refused.returncode == 1 and "sha256" in refused.stderr + refused.stdout, refused.stderr
    assert not (tmp_path / "again" / "model.safetensors").exists()
    assert a.get("/health").status_code == 200 and b.get("/health").status_code == 200

    # a restarted daemon does not train a finished mission again
    assert b.stop() == 0
    log = b.data_dir / "train" / mission_id / "worker.log"
    starts = log.read_text().count("training mission")
    b = start(daemons, model_cache, "--trust-lead", a.peer_id, "--allow-local-models", join=a, data_dir=b.data_dir)
    wait_until(lambda: training(b, mission_id).get("state") == "done", 30, 0.5, "b knows it is done")
    time.sleep(3)  # several supervision periods
    assert log.read_text().count("training mission") == starts


def test_the_daemon_restarts_a_killed_trainer_and_stops_it_on_exit(
    daemons: DaemonFactory, model_cache: Path, tiny: Path
) -> None:
    a = start(daemons, model_cache)
    # alone: each epoch's rounds find no group (the killed worker is still in hivemind's progress record) and
    # give up after averaging_timeout, twice (gradients, then state); 5 s keeps each new worker's first step short
    mission_id = create(a, mission_body(tiny, max_epochs=1000, averaging_timeout=5.0))
    first = wait_until(lambda: training(a, mission_id).get("pid"), 180, 0.5, "a trainer worker")
    wait_until(lambda: training(a, mission_id).get("state") == "training", 60, 0.5, "training")
    a.record_descendants()
    os.kill(first, signal.SIGKILL)  # a crash: the daemon notices and starts another after a back-off
    wait_until(lambda: training(a, mission_id).get("state", "").startswith("restarting"), 30, 0.2, "restarting")
    second = wait_until(
        lambda: (lambda t: t.get("pid") if t.get("pid") != first and t.get("state") == "training" else None)(
            training(a, mission_id)
        ),
        60, 0.5, "a new trainer worker",
    )  # fmt: skip
    assert training(a, mission_id)["restarts"] == 1
    wait_until(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE, 10)

    # the owner pauses: the trainer finishes its step and exits within 2 s; resume starts a new one (not a
    # failure: no restart counted)
    paused_at = time.monotonic()
    assert a.request("POST", "/pause").json()["paused"] is True
    wait_until(lambda: _gone(second), 10, 0.05, "the trainer stopped")
    stopped_in = time.monotonic() - paused_at
    assert stopped_in <= 2.0, f"the trainer took {stopped_in:.1f} s to stop"
    samples = training(a, mission_id)["samples"]
    time.sleep(1.5)
    assert training(a, mission_id)["samples"] == samples and training(a, mission_id)["state"] == "paused"
    assert a.request("POST", "/resume").json()["paused"] is False
    second = wait_until(
        lambda: (lambda t: t.get("pid") if t.get("pid") != second and t.get("state") == "training" else None)(
            training(a, mission_id)
        ),
        60, 0.5, "a trainer again after resume",
    )  # fmt: skip
    assert training(a, mission_id)["restarts"] == 1
    assert a.get("/contribution").json()["missions"][mission_id]["samples_trained"] >= samples > 0
    a.record_descendants()
    assert a.stop() == 0, a.stderr()[-3000:]
    assert _gone(second)
    status = json.loads((a.data_dir / "train" / mission_id / "status.json").read_text())
    assert status["state"] == "stopped"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def state_shown(stdout: str, mission_id: str) -> str:
    """The state ``garden mission show`` prints after the mission's id (``name id  (state)``; the console wraps)."""
    return " ".join(stdout.split()).split(mission_id, 1)[1].split()[0].strip("()")


def check_published_student(
    daemons: DaemonFactory, cache: Path, lead: Daemon, trainer: Daemon, other: Daemon, mission_id: str,
    vouched: dict[str, float],
) -> Daemon:  # fmt: skip
    """The lead publishes the trained student as the swarm's model ``mission:<id>`` once it vouched for the last
    epoch; a peer that never trained it serves it (pulled and checked on first use) and apps chat with it."""
    model = f"mission:{mission_id}"

    def listed() -> dict | None:
        return next((m for m in other.get("/models").json() if m["model"] == model), None)

    entry = wait_until(listed, 120, 1.0, "the lead published the student")
    student = entry["student"]
    assert student["lead"] == lead.peer_id and student["epoch"] == EPOCHS and student["name"] == "train-test"
    assert student["layers"] == 2 and student["architecture"] == "LlamaForCausalLM" and student["parameters"] > 0
    assert student["metrics"]["kl"] == vouched["kl"] and {"nll", "top1", "base_kl"} <= set(student["metrics"])
    assert entry["servers"] == 0 and not entry["complete"] and entry["missing"] == [[0, 2]]  # nobody serves it yet
    assert lead.get(f"/missions/{mission_id}").json()["state"] == "published"
    assert lead.get("/missions").json()[0]["state"] == "published"
    listing = garden_cli("models", "--url", other.url)
    assert listing.returncode == 0 and f"mission:{mission_id[:12]}" in listing.stdout, listing.stdout
    assert json.loads(garden_cli("models", "--json", "--url", other.url).stdout)[-1]["student"]["epoch"] == EPOCHS
    # the lead may promote a vouched epoch (the newest by default: the same checkpoint here), not another one;
    # only the lead publishes; a name nobody published is a clear 404
    promoted = lead.request("POST", f"/missions/{mission_id}/promote")
    assert promoted.status_code == 200 and promoted.json()["manifest_sha256"] == student["manifest_sha256"]
    never = lead.request("POST", f"/missions/{mission_id}/promote?epoch={EPOCHS + 5}")
    assert never.status_code == 404 and "vouched for no announced checkpoint" in never.json()["detail"]
    assert trainer.request("POST", f"/missions/{mission_id}/promote").status_code == 403
    assert other.request("POST", "/models/pull", json={"model": "mission:nope"}).status_code == 404

    shown = garden_cli("mission", "show", mission_id[:12], "--url", other.url)
    assert shown.returncode == 0 and state_shown(shown.stdout, mission_id) == "published", shown.stdout
    # a peer that never trained it serves it (its 2 layers, as a range) by a prefix of its id: pulled from the
    # trainers, every file checked
    server = start(daemons, cache, "--roles", "server", "--serve", f"mission:{mission_id[:10]}:0-2", join=lead)
    wait_until(lambda: "for first use; every file's sha256 checked" in server.stderr(), 120, 1.0, "pulled")
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=other.url + "/v1", api_key="-", max_retries=0, timeout=120)
    wait_until(lambda: model in [m.id for m in client.models.list().data], 120, 1.0, "served in /v1/models")
    chat = client.chat.completions.create(
        model="mission:train-test", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )  # by the mission's name
    assert chat.model == model and chat.usage is not None and chat.usage.completion_tokens > 0
    local = garden_cli("generate", "--model", f"mission:{mission_id[:12]}", "--url", other.url, "--max-new-tokens",
                       "4", "Hello")  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]
    try:
        client.chat.completions.create(model="mission:nope", messages=[{"role": "user", "content": "Hi"}])
        raise AssertionError("an unknown student answered")
    except NotFoundError as e:
        assert e.code == "model_not_found" and "no published student" in str(e)

    # distil the distilled: a mission whose teacher and student are the published student, named by its
    # mission's name and a prefix; the lead writes down the whole id, and the shakers sample it
    body = mission_body(Path("unused"), max_epochs=1)
    body["spec"] |= {"name": "second-round", "teachers": ["mission:train-test"]}
    body["spec"]["student"] = {"base": f"mission:{mission_id[:8]}"}
    second = lead.request("POST", "/missions", json=body)
    assert second.status_code == 201, second.text
    spec = lead.get(f"/missions/{second.json()['id']}").json()["spec"]
    assert spec["teachers"] == [model] and spec["student"]["base"] == model
    unknown = lead.request("POST", "/missions", json=body | {"spec": body["spec"] | {"teachers": ["mission:nope"]}})
    assert unknown.status_code == 422 and "no published student" in unknown.text
    rows = wait_until(
        lambda: [json.loads(line) for line in lead.get(f"/missions/{second.json()['id']}/rows").text.splitlines()],
        240, 2.0, "the second mission shaken from the published student",
    )  # fmt: skip
    assert {r["teacher"] for r in rows} == {model} and all(r["k"] > 0 for r in rows)
    lead.request("DELETE", f"/missions/{second.json()['id']}")
    return server
