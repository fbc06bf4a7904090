"""Pipelined inference across real daemons on 127.0.0.1: servers hold layers 0-10, 10-20 (two of
them: a spare) and 20-30 of the built-in model; a client daemon (no layers) answers generation requests on
its port by pipelining hidden states through them. Compared with local ``model.generate`` on the same
weights. The last tests kill the 10-20 server in use mid-generation, then the other one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.daemons import Daemon, DaemonFactory, printed_mission_id, wait_until
from harness.pairs import load_with_datasets
from tests.inference.conftest import MODEL, PROMPTS

pytestmark = pytest.mark.swarm


def serve(daemons: DaemonFactory, model_cache: Path, layers: str, join: Daemon | None = None, *extra: str) -> Daemon:
    args = ["--roles", "server", "--serve", f"{MODEL}:{layers}", "--max-threads", "1", *extra]
    if join is not None:
        args += ["--join", join.join_addr]
    return daemons.start(*args, env={"GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"})


def serving(daemon: Daemon) -> list[dict[str, Any]]:
    return list(daemon.get("/status").json()["serving"])


def wait_served(daemons: list[Daemon]) -> None:
    wait_until(lambda: all(s["layers"] for d in daemons for s in serving(d)), 120, 0.5, "layers loaded")


def models(daemon: Daemon) -> list[str]:
    return [m["id"] for m in daemon.get("/v1/models").json()["data"]]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[dict[str, Any]]:
    """Servers 0-10, 10-20 (and a spare), 20-30 (capped: 2 sessions of 512 tokens) and a client peer."""
    factory = DaemonFactory(tmp_path_factory.mktemp("inference"))
    try:
        first = serve(factory, model_cache, "0-10")
        wait_served([first])
        # no range given: it takes the 10 layers no one serves yet (10-20 and 20-30 tie: the first)
        spare = factory.start(
            "--roles", "server", "--serve", MODEL, "--serve-blocks", "10", "--max-threads", "1",
            "--join", first.join_addr, env={"GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        wait_served([spare])
        assert serving(spare)[0]["layers"] == "10-20"
        second = serve(factory, model_cache, "10-20", first)
        third = serve(factory, model_cache, "20-30", first, "--max-sessions", "2", "--max-session-tokens", "512")
        client = factory.start(
            "--roles", "shaker", "--join", first.join_addr, "--inference-timeout", "5",
            env={"GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        wait_served([first, second, spare, third])
        wait_until(lambda: MODEL in models(client), 60, 0.5, "the model listed as covered")
        yield {"first": first, "second": second, "spare": spare, "third": third, "client": client}
    finally:
        orphans = factory.close()
        assert not orphans, orphans


def completion(daemon: Daemon, prompt: str, max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip
    response = daemon.request("POST", "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_pipelined_greedy_output_equals_local_generate(swarm: dict[str, Daemon], local_answers: dict) -> None:
    from garden.models.loading import load_model

    tokenizer = load_model(MODEL).tokenizer
    for prompt in PROMPTS:
        answer = completion(swarm["client"], prompt)
        expected = tokenizer.decode(local_answers[prompt], skip_special_tokens=True)
        assert answer["choices"][0]["message"]["content"] == expected, (prompt, answer)
        usage = answer["usage"]
        assert usage["completion_tokens"] == len(local_answers[prompt]) and usage["prompt_tokens"] > 0
    # every range ran for those tokens
    assert serving(swarm["first"])[0]["tokens_served"] > 0 and serving(swarm["third"])[0]["tokens_served"] > 0
    assert serving(swarm["second"])[0]["tokens_served"] + serving(swarm["spare"])[0]["tokens_served"] > 0


def test_concurrent_generations_share_passes_and_keep_their_answers(
    swarm: dict[str, Daemon], local_answers: dict
) -> None:
    """Two generations at once (the 20-30 server takes two sessions): each answers what it answers alone, and
    every server counts each decode step once, in passes that may hold both sessions' steps."""
    from concurrent.futures import ThreadPoolExecutor

    from garden.models.loading import load_model

    tokenizer = load_model(MODEL).tokenizer
    before = [serving(swarm[name])[0] for name in ("first", "third")]
    prompts = PROMPTS[:2]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: completion(swarm["client"], p), prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        expected = tokenizer.decode(local_answers[prompt], skip_special_tokens=True)
        assert answer["choices"][0]["message"]["content"] == expected, (prompt, answer)
    # a decode step feeds each answer token back in, but the last one of an answer cut at max_tokens
    fed = sum(a["usage"]["completion_tokens"] - (a["choices"][0]["finish_reason"] == "length") for a in answers)
    for name, old in zip(("first", "third"), before, strict=True):
        now = serving(swarm[name])[0]
        steps, passes = now["decode_steps"] - old["decode_steps"], now["decode_passes"] - old["decode_passes"]
        assert steps == fed, (name, now, old, answers)
        assert 0 < passes <= steps and 1 <= now["largest_batch"] <= 2, (name, now)


def test_openai_client_chat_stream_completions_models(swarm: dict[str, Daemon], local_answers: dict) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=swarm["client"].url + "/v1", api_key="-", max_retries=0, timeout=120)
    assert MODEL in [m.id for m in client.models.list().data]
    prompt = PROMPTS[0]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
    )
    text = chat.choices[0].message.content
    assert text and "Paris" in text and chat.usage is not None and chat.usage.completion_tokens > 0
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # streamed, not one blob
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert plain.choices[0].text.strip() and plain.usage is not None and plain.usage.completion_tokens == 6
    # stop strings end the answer before them
    stopped = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stop=["Paris"]
    )
    assert stopped.choices[0].message.content == text.split("Paris")[0]
    assert stopped.choices[0].finish_reason == "stop"
    # sampling with a seed is reproducible
    sampled = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=8, temperature=0.9,
            seed=7,
        ).choices[0].message.content
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_garden_generate_swarm(swarm: dict[str, Daemon], local_answers: dict) -> None:
    from garden.models.loading import load_model

    done = subprocess.run(
        [sys.executable, "-m", "garden", "generate", "--swarm", MODEL, PROMPTS[0], "--max-new-tokens", "24",
         "--url", swarm["client"].url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = load_model(MODEL).tokenizer.decode(local_answers[PROMPTS[0]], skip_special_tokens=True)
    assert done.stdout.strip() == expected.strip() and "via the swarm" in done.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "garden", "generate", "--swarm", "nope", "hi", "--url", swarm["client"].url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unknown.returncode == 1 and "not served by the swarm" in unknown.stderr
    rate = next(line for line in done.stderr.splitlines() if "garden feedback" in line)  # the answer is kept
    assert swarm["client"].get("/feedback").json()[0]["id"] == rate.split()[-1]


def garden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garden", *args], capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_feedback_becomes_pairs_and_the_next_mission(swarm: dict[str, Daemon], tmp_path: Path) -> None:
    """Accept, redo and edit through ``/v1/feedback`` and the CLI give the right pairs; the export loads with
    ``datasets``; a mission made from the feedback runs, and its edited prompt's row is the owner's text."""
    client = swarm["client"]

    def rate(answer_id: str, verdict: str, **extra: Any) -> Any:
        return client.request("POST", "/v1/feedback", json={"id": answer_id, "verdict": verdict, **extra}, timeout=120)

    client.request("DELETE", "/feedback")
    accepted = completion(client, PROMPTS[0], max_tokens=8)
    assert accepted["id"].startswith("chatcmpl-")
    first = rate(accepted["id"], "accept")
    assert first.status_code == 200 and first.json() == {"object": "feedback", "id": accepted["id"],
                                                          "verdict": "accept", "pairs": 0}  # fmt: skip
    # redo: the answer is rejected, the same request answered again (sampled: the first was greedy)
    redone = completion(client, PROMPTS[1], max_tokens=8)
    again = rate(redone["id"], "redo")
    assert again.status_code == 200, again.text
    fresh = again.json()["completion"]
    assert fresh["object"] == "chat.completion" and fresh["id"] != redone["id"] and fresh["model"] == MODEL
    assert rate(fresh["id"], "accept").json()["pairs"] == 1
    # edit: the owner's text is chosen, the answer rejected
    edited = completion(client, PROMPTS[2], max_tokens=8)
    mine = "Rain falls softly on the garden."
    assert rate(edited["id"], "edit", text=mine).json()["pairs"] == 2
    kept = {a["id"]: a for a in client.get("/feedback").json()}
    assert kept[redone["id"]]["verdict"] == "redo" and kept[fresh["id"]]["redo_of"] == redone["id"]
    assert kept[edited["id"]]["edit"] == mine

    # bad ids and bodies: OpenAI-shaped errors, nothing changes
    unknown = rate("chatcmpl-nope", "accept")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "answer_not_found"
    no_text = rate(edited["id"], "edit")
    assert no_text.status_code == 400 and "needs the text" in no_text.json()["error"]["message"]
    maybe = rate(edited["id"], "maybe")
    assert maybe.status_code == 400 and maybe.json()["error"]["param"] == "verdict"
    assert rate(edited["id"], "accept", extra=1).status_code == 400
    garbage = client.request("POST", "/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and "error" in garbage.json()
    assert client.get("/feedback").json()[0]["edit"] == mine

    # the CLI: list, accept by a prefix, export what datasets loads
    listed = garden("feedback", "list", "--url", client.url)
    assert listed.returncode == 0 and "edit" in listed.stdout and "accept" in listed.stdout, listed.stdout
    out = tmp_path / "pairs.jsonl"
    exported = garden("feedback", "export", "-o", str(out), "--url", client.url)
    assert exported.returncode == 0 and "wrote 2 pair(s)" in exported.stdout, exported.stdout + exported.stderr
    columns, pairs = load_with_datasets(out)
    assert {"prompt", "chosen", "rejected"} <= set(columns)
    got = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    fresh_text = fresh["choices"][0]["message"]["content"]
    answer = redone["choices"][0]["message"]["content"]
    assert got == {(PROMPTS[1], fresh_text, answer), (PROMPTS[2], mine, edited["choices"][0]["message"]["content"])}

    # the next mission starts from the feedback: its prompts are the rated ones, its references the chosen answers
    spec = tmp_path / "again.toml"
    spec.write_text(
        'name = "from-feedback"\nteachers = ["builtin:smollm2-135m"]\nshard_size = 3\n'
        '[student]\nbase = "builtin:smollm2-135m"\nkeep_layers = 2\n'
        '[sampling]\ncandidates = 2\nmax_new_tokens = 6\ntop_k_logprobs = 4\n'
        '[judge]\nkind = "reference"\nthreshold = 1.0\n'
    )  # a reference no sampled answer matches word for word is the chosen answer itself
    argv = [sys.executable, "-m", "garden", "mission", "create", "--from-feedback", "all", str(spec),
            "--url", client.url]  # fmt: skip
    refused = subprocess.run(argv, input="n\n", capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "leave this machine" in refused.stdout and not client.get("/missions").json()
    created = garden("mission", "create", "--from-feedback", str(spec), "--yes", "--url", client.url)  # all
    assert created.returncode == 0, created.stderr
    mission_id = printed_mission_id(created.stdout)
    shown = client.get(f"/missions/{mission_id}").json()
    assert shown["prompts"] == 3 and shown["spec"]["prompts"] == "feedback"
    wait_until(lambda: client.get(f"/missions/{mission_id}").json()["shards"]["done"] == 1, 240, 1.0, "shaken")
    rows = [json.loads(line) for line in client.get(f"/missions/{mission_id}/rows").text.splitlines()]
    by_prompt = {r["prompt"]: r for r in rows}
    assert by_prompt[PROMPTS[2]]["chosen"] == mine and by_prompt[PROMPTS[2]]["reference_used"]
    assert set(by_prompt) == set(PROMPTS)
    client.request("DELETE", f"/missions/{mission_id}")
    assert garden("feedback", "clear", "--yes", "--url", client.url).returncode == 0
    assert client.get("/feedback").json() == []


def test_the_cli_rates_what_garden_generate_answered(swarm: dict[str, Daemon]) -> None:
    """``garden feedback accept|redo|edit`` on the answers of ``garden generate``: through the swarm (redo asks
    the swarm again) and on this machine (redo answers again here, with a new seed); the newest answer when no id
    is given, a unique prefix otherwise; the pairs are what the verdicts say."""
    client = swarm["client"]
    client.request("DELETE", "/feedback")

    def kept_id(done: subprocess.CompletedProcess[str]) -> str:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        said = " ".join((done.stdout + done.stderr).split())  # the console wraps long lines
        return said.split("rate it: garden feedback accept|redo|edit ", 1)[1].split()[0]

    def rated(*args: str) -> str:
        done = garden("feedback", *args, "--url", client.url)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return " ".join(done.stdout.split())

    # through the swarm: redo by a prefix of the id (the swarm answers again, sampled), accept the new answer
    first = kept_id(garden("generate", "--swarm", MODEL, PROMPTS[0], "--max-new-tokens", "6", "--url", client.url))
    again = kept_id(garden("feedback", "redo", first[:16], "--url", client.url))
    assert again != first and "accept: " + again in rated("accept")  # the newest: the redone answer
    # on this machine: the local model's answer is kept by the peer; edit the newest, redo another here
    mine = "Name three colours: red, green, blue."
    local = kept_id(garden("generate", "--model", MODEL, PROMPTS[1], "--max-new-tokens", "6", "--url", client.url))
    assert f"edit: {local} (2 pair(s) kept on this machine)" in rated("edit", "--text", mine)
    other = kept_id(garden("generate", "--model", MODEL, PROMPTS[2], "--max-new-tokens", "6", "--url", client.url))
    fresh = kept_id(garden("feedback", "redo", other, "--url", client.url))
    assert f"accept: {fresh} (3 pair(s) kept" in rated("accept", fresh)
    wrong = garden("feedback", "accept", "chatcmpl-nope", "--url", client.url)
    assert wrong.returncode == 1 and "no kept answer has the id" in wrong.stderr, wrong.stderr

    answers = {a["id"]: a for a in client.get("/feedback").json()}
    assert answers[first]["verdict"] == "redo" and answers[again]["redo_of"] == first
    assert answers[other]["verdict"] == "redo" and answers[fresh]["redo_of"] == other
    assert answers[local]["request"]["source"] == answers[fresh]["request"]["source"] == "local"
    pairs = {(p["prompt"], p["chosen"], p["rejected"])
             for p in map(json.loads, client.get("/feedback/pairs").text.splitlines())}  # fmt: skip
    assert pairs == {
        (PROMPTS[0], answers[again]["text"], answers[first]["text"]),
        (PROMPTS[1], mine, answers[local]["text"]),
        (PROMPTS[2], answers[fresh]["text"], answers[other]["text"]),
    }
    client.request("DELETE", "/feedback")


def test_openai_errors(swarm: dict[str, Daemon]) -> None:
    client = swarm["client"]
    hello = [{"role": "user", "content": "hi"}]
    unknown = client.request("POST", "/v1/chat/completions", json={"model": "nope", "messages": hello})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    bad = client.request("POST", "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    json_type = {"content-type": "application/json"}
    garbage = client.request("POST", "/v1/completions", content=b"{not json", headers=json_type)
    assert garbage.status_code == 400 and "error" in garbage.json()
    # what `curl -d '{...}'` sends: a JSON body labelled as a form
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    curl = client.request("POST", "/v1/completions", content=body.encode(), headers=form, timeout=60)
    assert curl.status_code == 200 and curl.json()["choices"][0]["text"], curl.text
    two = client.request("POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2})
    assert two.status_code == 400
    assert client.get("/status").status_code == 200  # still answering


# --- RPCs from a stranger ------------------------------------------------------------------------------


def rpc(target: Daemon, calls: Any) -> Any:
    """Run ``calls(p2p, peer)`` (a coroutine function) on a P2P node of the test's own, joined to ``target``."""
    import asyncio

    from hivemind.p2p import P2P, PeerID

    async def main() -> Any:
        p2p = await P2P.create(initial_peers=target.addresses)
        try:
            return await calls(p2p, PeerID.from_base58(target.peer_id))
        finally:
            await p2p.shutdown()

    return asyncio.run(main())


async def call(p2p: Any, peer: Any, op: str, metadata: dict[str, Any], tensors: list[Any] | None = None) -> dict:
    import msgpack
    from hivemind.proto import runtime_pb2

    request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(metadata), tensors=tensors or [])
    response = await p2p.call_protobuf_handler(peer, f"garden.blocks.{op}", request, runtime_pb2.ExpertResponse)
    return dict(msgpack.unpackb(response.metadata)) | {"tensors": list(response.tensors)}


def test_bad_rpcs_are_refused_and_the_server_keeps_serving(swarm: dict[str, Daemon]) -> None:
    import uuid

    import torch
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    from garden.protocol.inference_rpc import serialize_hidden

    first = swarm["first"]
    session = uuid.uuid4().hex
    opened = {"session": session, "model": MODEL, "start": 0, "end": 10, "max_tokens": 64}

    async def calls(p2p: Any, peer: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        raw = runtime_pb2.ExpertRequest(metadata=b"\xc1 not msgpack")
        answer = await p2p.call_protobuf_handler(peer, "garden.blocks.open", raw, runtime_pb2.ExpertResponse)
        import msgpack

        results["garbage"] = msgpack.unpackb(answer.metadata)
        results["other layers"] = await call(p2p, peer, "open", opened | {"session": uuid.uuid4().hex, "end": 12})
        results["open"] = await call(p2p, peer, "open", opened)
        step = {"session": session, "offset": 0}

        async def forward(hidden: Any, **meta: Any) -> dict[str, Any]:
            proto = hidden if isinstance(hidden, runtime_pb2.Tensor) else serialize_hidden(hidden, "float16")
            return await call(p2p, peer, "forward", step | meta, [proto])

        results["wrong width"] = await forward(torch.zeros(1, 2, 100))
        results["nan"] = await forward(serialize_hidden(torch.full((1, 2, 576), float("nan")), "float32"))
        lying = serialize_hidden(torch.zeros(1, 2, 576), "float32")
        lying.size[:] = [1, 4, 576]  # announces more values than the buffer holds
        results["lying shape"] = await forward(lying)
        results["too many tokens"] = await forward(torch.zeros(1, 1025, 576))
        try:  # over hivemind's 4 MiB unary cap: refused before the handler
            await forward(serialize_torch_tensor(torch.zeros(1, 2000, 576)))
            results["oversized"] = "accepted"
        except Exception as e:  # noqa: BLE001
            results["oversized"] = type(e).__name__
        results["offset"] = await forward(torch.zeros(1, 2, 576), offset=5)
        results["ok"] = await forward(torch.randn(1, 3, 576))
        results["past cap"] = await forward(torch.zeros(1, 62, 576), offset=3)
        results["closed"] = await call(p2p, peer, "close", {"session": session})
        results["after close"] = await forward(torch.zeros(1, 1, 576), offset=3)
        return results

    results = rpc(first, calls)
    assert results["garbage"]["error"] == "bad request"
    assert results["other layers"]["error"] == "not served" and "0-10" in results["other layers"]["detail"]
    assert results["open"]["ok"]
    for case in ("wrong width", "nan", "lying shape", "too many tokens"):
        assert results[case]["error"] == "bad request", (case, results[case])
    assert results["oversized"] != "accepted"
    assert results["offset"]["error"] == "out of sync"
    assert results["ok"]["ok"] and results["ok"]["tokens"] == 3 and len(results["ok"]["tensors"]) == 1
    assert results["past cap"]["error"] == "too long"
    assert results["closed"]["ok"] and results["after close"]["error"] == "unknown session"
    # the server still serves: a whole generation goes through it
    assert "Paris" in completion(swarm["client"], PROMPTS[0])["choices"][0]["message"]["content"]
    refused = serving(first)[0]["refused"]
    assert refused.get("bad request", 0) >= 5


def test_a_push_from_a_peer_the_client_did_not_name_is_not_run(swarm: dict[str, Daemon]) -> None:
    """Server-to-server steps (``<swarm>.blocks.push``) against a real server: a stranger that learned a session id
    pushes a step into it; the session's client named another pusher, so its step answers "no input" and the
    stranger's states are never run. Malformed pushes are refused with a reason, and the server keeps serving."""
    import asyncio
    import time
    import uuid

    import torch
    from hivemind.p2p import P2P, PeerID

    from garden.protocol.inference_rpc import serialize_hidden

    first = swarm["first"]
    session = uuid.uuid4().hex
    opened = {"session": session, "model": MODEL, "start": 0, "end": 10, "max_tokens": 64}

    async def main() -> dict[str, Any]:
        client = await P2P.create(initial_peers=first.addresses)
        stranger = await P2P.create(initial_peers=first.addresses)
        server = PeerID.from_base58(first.peer_id)
        results: dict[str, Any] = {}
        try:
            one = serialize_hidden(torch.randn(1, 1, 576), "float16")
            results["open"] = await call(client, server, "open", opened)
            results["prompt"] = await call(client, server, "forward", {"session": session, "offset": 0},
                                           [serialize_hidden(torch.randn(1, 3, 576), "float16")])  # fmt: skip
            push = {"session": session, "offset": 3}
            results["two tokens"] = await call(stranger, server, "push", push,
                                               [serialize_hidden(torch.randn(1, 2, 576), "float16")])  # fmt: skip
            results["no session"] = await call(stranger, server, "push", push | {"session": uuid.uuid4().hex}, [one])
            results["wrong offset"] = await call(stranger, server, "push", push | {"offset": 7}, [one])
            results["pushed"] = await call(stranger, server, "push", push, [one])
            results["again"] = await call(stranger, server, "push", push, [one])
            step = {"session": session, "offset": 3, "wait": 2.0}
            results["tensor too"] = await call(client, server, "forward", step | {"pushed_by": first.peer_id}, [one])
            results["half a push"] = await call(client, server, "forward",
                                                {"session": session, "offset": 3, "push_peer": first.peer_id}, [one])
            started = time.monotonic()
            named = client.peer_id.to_base58()  # not the stranger
            results["not named"] = await call(client, server, "forward", step | {"pushed_by": named})
            results["waited"] = time.monotonic() - started
            results["still 3"] = await call(client, server, "forward", {"session": session, "offset": 4}, [one])
            results["closed"] = await call(client, server, "close", {"session": session})
        finally:
            await stranger.shutdown()
            await client.shutdown()
        return results

    results = asyncio.run(main())
    assert results["open"]["ok"] and results["prompt"]["ok"] and results["prompt"]["tokens"] == 3
    for case in ("two tokens", "again", "tensor too", "half a push"):
        assert results[case]["error"] == "bad request", (case, results[case])
    assert results["no session"]["error"] == "unknown session" and results["wrong offset"]["error"] == "out of sync"
    assert results["pushed"]["ok"]  # kept: only the client's request can say whether it runs
    assert results["not named"]["error"] == "no input" and results["not named"]["tensors"] == []
    assert results["waited"] < 2.0  # the stranger's push was there: refused at once, not waited for
    assert results["still 3"]["error"] == "out of sync" and "holds 3 tokens" in results["still 3"]["detail"]
    assert results["closed"]["ok"] and results["closed"]["tokens"] == 3  # the stranger's states never ran
    assert "Paris" in completion(swarm["client"], PROMPTS[0])["choices"][0]["message"]["content"]


def test_session_caps_are_clear_errors(swarm: dict[str, Daemon]) -> None:
    import uuid

    third = swarm["third"]

    def opening(**extra: Any) -> dict[str, Any]:
        return {"session": uuid.uuid4().hex, "model": MODEL, "start": 20, "end": 30, "max_tokens": 64} | extra

    def ask() -> Any:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        return swarm["client"].request("POST", "/v1/completions", json=body, timeout=60)

    async def calls(p2p: Any, peer: Any) -> dict[str, Any]:
        import asyncio

        results = {
            "long": await call(p2p, peer, "open", opening(max_tokens=600)),
            "one": await call(p2p, peer, "open", (one := opening())),
            "two": await call(p2p, peer, "open", (two := opening())),
            "three": await call(p2p, peer, "open", opening()),
            "client": await asyncio.to_thread(ask),  # the client peer finds the server full too
        }
        for held in (one, two):
            await call(p2p, peer, "close", {"session": held["session"]})
        return results

    results = rpc(third, calls)
    assert results["long"]["error"] == "too long" and "512" in results["long"]["detail"]
    assert results["one"]["ok"] and results["two"]["ok"]
    assert results["three"]["error"] == "busy" and "2 sessions" in results["three"]["detail"]
    busy = results["client"]
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy", busy.text
    # sessions closed: the server takes work again (once the client's short ban on it ends)
    wait_until(lambda: ask().status_code == 200, 30, 1.0, "generation after the sessions closed")


def test_layers_that_would_not_fit_in_max_memory_are_not_served(
    swarm: dict[str, Daemon], tmp_path: Path, model_cache: Path
) -> None:
    factory = DaemonFactory(tmp_path)
    try:
        small = serve(factory, model_cache, "0-10", swarm["first"], "--max-memory", "1MB")
        error = wait_until(lambda: (serving(small) or [{}])[0].get("error"), 60, 0.5, "the refusal")
        assert "not serving" in error and "--max-memory 1 MiB" in error, error
        assert small.get("/health").status_code == 200
    finally:
        assert not factory.close()


def test_a_server_killed_mid_generation_is_routed_around(swarm: dict[str, Daemon], local_answers: dict) -> None:
    """kill -9 the 10-20 server the generation goes through; the spare takes over, the tokens are the same."""
    import httpx

    from garden.models.loading import load_model

    client, prompt = swarm["client"], PROMPTS[2]
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0,
            "stream": True}  # fmt: skip
    pieces: list[str] = []
    victim: list[Daemon] = []
    with httpx.stream("POST", client.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            pieces.append(event["choices"][0]["delta"].get("content") or "")
            if len([p for p in pieces if p]) == 3 and not victim:
                used = [d for d in (swarm["second"], swarm["spare"]) if serving(d)[0]["sessions"] > 0]
                assert len(used) == 1, "exactly one 10-20 server holds the session"
                victim.append(used[0])
                os.kill(used[0].proc.pid, signal.SIGKILL)
    expected = load_model(MODEL).tokenizer.decode(local_answers[prompt], skip_special_tokens=True)
    assert victim and "".join(pieces) == expected
    survivor = swarm["spare"] if victim[0] is swarm["second"] else swarm["second"]
    assert serving(survivor)[0]["tokens_served"] > 0


def test_a_gap_is_a_503_naming_the_layers(swarm: dict[str, Daemon]) -> None:
    """After the failover test: kill the other 10-20 server too; once its record expires the layers are a gap.
    Before that: the owner of the only 0-10 server pauses its serving, and generation is refused as busy."""
    client = swarm["client"]
    covered = {m["model"]: m for m in client.get("/models").json()}
    assert covered[MODEL]["complete"] and covered[MODEL]["num_layers"] == 30 and covered[MODEL]["missing"] == []
    assert {(span["start"], span["end"]) for span in covered[MODEL]["spans"]} >= {(0, 10), (20, 30)}
    first = swarm["first"]
    assert first.request("POST", "/pause", json={"serving": True}).json()["serving"] is True
    refused = client.request("POST", "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                             timeout=60)  # fmt: skip
    assert refused.status_code == 503 and "paused by its owner" in refused.text, refused.text
    assert first.get("/status").json()["serving"][0]["refused"].get("busy", 0) >= 1
    assert first.request("POST", "/resume").json()["paused"] is False
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    wait_until(  # the client leaves a busy server out of its routes for a few seconds
        lambda: client.request("POST", "/v1/completions", json=body, timeout=60).status_code == 200, 20, 1.0,
        "generation through the resumed server",
    )  # fmt: skip
    for name in ("second", "spare"):
        if swarm[name].proc.poll() is None:
            os.kill(swarm[name].proc.pid, signal.SIGKILL)
    wait_until(lambda: MODEL not in models(client), 30, 0.5, "the model no longer fully covered")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    gap = client.request("POST", "/v1/completions", json=body, timeout=60)
    assert gap.status_code == 503, gap.text
    assert gap.json()["error"]["code"] == "layers_missing" and "10-20" in gap.json()["error"]["message"]
    assert client.get("/status").status_code == 200
