"""Pipelined generation across three local servers vs local ``model.generate``, on the built-in model.

Prints ONE JSON object to stdout; progress lines go to stderr (none with ``--json-only``).

What is measured, and why:

- **throughput**: the network path's overhead. Three daemons serve layers 0-10, 10-20 and 20-30
  (``--max-threads 1`` each) and a fourth, with no layers, answers ``POST /v1/completions`` by pipelining
  through them; the same prompts are generated greedily by ``model.generate`` in this process with one
  thread. ``pipelined_over_local`` = pipelined tokens/s / local tokens/s (target >= 0.9). Every request
  asks for exactly ``--tokens`` new tokens (``min_tokens`` here, ``min_new_tokens`` there: no end token).
  Decoding steps go from server to server (``--server-push``, the default); ``hop_by_hop`` is the same from a
  client started with ``--no-server-push``, which relays each step between the servers itself
  (``server_push_over_hop_by_hop``).
- **concurrent sessions**: 8 streaming completions sent at once to the client peer, against the same 8 sent
  one after another: ``aggregate_over_one`` = their tokens/s together / one stream's tokens/s alone (target
  >= 3). The servers merge the concurrent sessions' decode steps into shared passes, and the client the
  LM head's (``garden.inference.batching``); ``unchanged`` counts the answers equal to the one-at-a-time
  ones (greedy: all 8), ``servers`` shows each server's steps per pass.
- **time to first token**: from sending a streaming chat request to its first content chunk.
- **fail-over pause**: a streaming generation whose 10-20 server is killed (``kill -9``) after a few
  tokens, with a spare 10-20 server up: the longest gap between two chunks, next to the median gap.
- **wire dtype**: in this process, greedy output of 8 prompts x 48 tokens with hidden states cast to
  float16 (and, separately, bfloat16) at the two range boundaries, compared with float32 all the way.
- **spot checks**: the same requests from another client peer started with ``--spot-check F`` (F = 0.1 and
  1): each step of a hop is, with probability F, also run on the other 10-20 server after a replay of the
  session's history there. ``over_off`` = its tokens/s over the plain client's (the cost of checking).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from harness.daemons import Daemon, DaemonFactory, wait_until  # noqa: E402
from harness.machine import MachineReport  # noqa: E402

MODEL = "builtin:smollm2-135m"
TARGET_RATIO = 0.9
TARGET_CONCURRENT = 3.0
CONCURRENT = 8
quiet = False


def log(message: str) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def prompts(n: int) -> list[str]:
    from garden.data import demo_prompts

    return [p.prompt for p in demo_prompts()[:n]]


def local_rate(texts: list[str], tokens: int) -> dict[str, Any]:
    import torch

    from garden.models.loading import load_model

    torch.set_num_threads(1)
    model = load_model(MODEL)
    produced, started = 0, time.perf_counter()
    for text in texts:
        ids = model.tokenizer(text)["input_ids"]
        with torch.no_grad():
            out = model.model.generate(
                torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        produced += out.shape[1] - len(ids)
    seconds = time.perf_counter() - started
    return {"tokens": produced, "seconds": round(seconds, 2), "tokens_per_s": round(produced / seconds, 2)}


def pipelined_rate(client: Daemon, texts: list[str], tokens: int, answers: list[str] | None = None) -> dict[str, Any]:
    """Tokens/s of greedy completions of ``texts`` one after another; their texts go to ``answers``."""
    produced, started = 0, time.perf_counter()
    for text in texts:
        body = {"model": MODEL, "prompt": text, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
        answer = client.request("POST", "/v1/completions", json=body, timeout=300)
        answer.raise_for_status()
        produced += answer.json()["usage"]["completion_tokens"]
        if answers is not None:
            answers.append(answer.json()["choices"][0]["text"])
    seconds = time.perf_counter() - started
    return {"tokens": produced, "seconds": round(seconds, 2), "tokens_per_s": round(produced / seconds, 2)}


def stream_text(client: Daemon, text: str, tokens: int) -> str:
    import httpx

    body = {"model": MODEL, "prompt": text, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    pieces = []
    with httpx.stream("POST", client.url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                pieces += [c.get("text", "") for c in event["choices"]]
    return "".join(pieces)


def concurrent_rate(client: Daemon, servers: list[Daemon], texts: list[str], tokens: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    alone = [stream_text(client, text, tokens) for text in texts]
    one = len(texts) * tokens / (time.perf_counter() - started)
    before = [d.get("/status").json()["serving"][0] for d in servers]
    started = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda text: stream_text(client, text, tokens), texts))
    aggregate = len(texts) * tokens / (time.perf_counter() - started)
    after = [d.get("/status").json()["serving"][0] for d in servers]
    passes = [
        {"layers": a["layers"], "steps": a["decode_steps"] - b["decode_steps"],
         "passes": a["decode_passes"] - b["decode_passes"], "largest_batch": a["largest_batch"]}
        for a, b in zip(after, before, strict=True)
    ]  # fmt: skip
    return {
        "clients": len(texts), "one_tokens_per_s": round(one, 2), "aggregate_tokens_per_s": round(aggregate, 2),
        "aggregate_over_one": round(aggregate / one, 3), "target": TARGET_CONCURRENT,
        "unchanged": sum(a == b for a, b in zip(alone, together, strict=True)), "servers": passes,
    }  # fmt: skip


def stream_gaps(client: Daemon, text: str, tokens: int, kill_after: int | None = None,
                victims: list[Daemon] | None = None) -> dict[str, Any]:  # fmt: skip
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "min_tokens": tokens, "temperature": 0, "stream": True}  # fmt: skip
    started = time.perf_counter()
    stamps: list[float] = []
    killed = None
    with httpx.stream("POST", client.url + "/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                if kill_after is not None and len(stamps) == kill_after and victims:
                    used = [d for d in victims if d.get("/status").json()["serving"][0]["sessions"] > 0]
                    killed = used[0] if used else victims[0]
                    os.kill(killed.proc.pid, signal.SIGKILL)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "first_token_s": round(stamps[0] - started, 3) if stamps else None,
        "chunks": len(stamps),
        "median_gap_s": round(statistics.median(gaps), 3) if gaps else None,
        "max_gap_s": round(max(gaps), 3) if gaps else None,
        "killed": killed is not None,
    }


def wire_dtype_check(texts: list[str], tokens: int) -> dict[str, Any]:
    import torch

    from garden.inference.blocks import Blocks, Ends, LayerSpan
    from garden.inference.generate import prompt_ids

    ends = Ends.load(MODEL)
    spans = [Blocks.load(MODEL, LayerSpan(a, b)) for a, b in ((0, 10), (10, 20), (20, 30))]

    def greedy(ids: list[int], cast: Any) -> list[int]:
        caches = [b.new_cache() for b in spans]
        out, feed = [], ids
        for _ in range(tokens):
            hidden = ends.embed(feed)
            for i, (blocks, cache) in enumerate(zip(spans, caches, strict=True)):
                hidden = blocks.forward(cast(hidden) if i else hidden, cache)
            out.append(int(ends.logits(hidden).argmax()))
            if out[-1] in ends.eos_ids:
                break
            feed = [out[-1]]
        return out

    result: dict[str, Any] = {"prompts": len(texts), "tokens": tokens}
    exact = [greedy(prompt_ids(ends.tokenizer, t), lambda h: h) for t in texts]
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        cast = lambda h, d=dtype: h.to(d).float()  # noqa: E731
        same = [greedy(prompt_ids(ends.tokenizer, t), cast) == e for t, e in zip(texts, exact, strict=True)]
        result[f"{name}_unchanged"] = sum(same)
    return result


def main() -> int:
    global quiet
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    quiet = args.json_only
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    texts = prompts(args.prompts)
    report: dict[str, Any] = {"model": MODEL, "prompts": len(texts), "tokens": args.tokens}
    machine = MachineReport().start()
    log("wire dtype check (in process)")
    report["wire_dtype"] = wire_dtype_check(prompts(8), 48)
    log(f"local generate: {report['wire_dtype']}")
    report["local"] = local_rate(texts, args.tokens)
    log(f"local: {report['local']}")
    with tempfile.TemporaryDirectory(prefix="garden-pipeline-bench-") as tmp:
        factory = DaemonFactory(Path(tmp))
        env = {"HF_HUB_OFFLINE": "1", **({"GARDEN_CACHE_DIR": os.environ["GARDEN_CACHE_DIR"]}
                                         if "GARDEN_CACHE_DIR" in os.environ else {})}  # fmt: skip
        try:
            def serve(layers: str, join: Daemon | None = None) -> Daemon:
                extra = ["--join", join.join_addr] if join else []
                return factory.start("--roles", "server", "--serve", f"{MODEL}:{layers}", "--max-threads", "1",
                                     *extra, env=env)  # fmt: skip

            first = serve("0-10")
            middle, spare, last = serve("10-20", first), serve("10-20", first), serve("20-30", first)
            client = factory.start("--roles", "shaker", "--join", first.join_addr, "--max-threads", "1",
                                   "--inference-timeout", "5", env=env)  # fmt: skip
            servers = [first, middle, spare, last]
            wait_until(lambda: all(d.get("/status").json()["serving"][0]["layers"] for d in servers), 180, 0.5)
            wait_until(lambda: client.get("/v1/models").json()["data"], 60, 0.5, "the model covered")
            pipelined_rate(client, texts[:1], 4)  # warm-up: the client loads the embeddings and head
            pushed: list[str] = []
            report["pipelined"] = pipelined_rate(client, texts, args.tokens, pushed)
            log(f"pipelined: {report['pipelined']}")
            relaying = factory.start("--roles", "shaker", "--join", first.join_addr, "--max-threads", "1",
                                     "--inference-timeout", "5", "--no-server-push", env=env)  # fmt: skip
            wait_until(lambda: relaying.get("/v1/models").json()["data"], 60, 0.5, "the model covered")
            pipelined_rate(relaying, texts[:1], 4)  # warm-up
            relayed: list[str] = []
            report["hop_by_hop"] = pipelined_rate(relaying, texts, args.tokens, relayed)
            report["hop_by_hop"]["same_answers"] = sum(a == b for a, b in zip(pushed, relayed, strict=True))
            relaying.stop()
            log(f"hop by hop (the client relays between servers): {report['hop_by_hop']}")
            report["spot_check"] = {}
            for fraction in (0.1, 1.0):
                checking = factory.start(
                    "--roles", "shaker", "--join", first.join_addr, "--max-threads", "1", "--inference-timeout", "5",
                    "--spot-check", str(fraction), env=env,
                )  # fmt: skip
                wait_until(lambda c=checking: c.get("/v1/models").json()["data"], 60, 0.5, "the model covered")
                pipelined_rate(checking, texts[:1], 4)  # warm-up
                rate = pipelined_rate(checking, texts, args.tokens)
                rate["over_off"] = round(rate["tokens_per_s"] / report["pipelined"]["tokens_per_s"], 3)
                rate["servers_banned"] = checking.stderr().count(" banned for ")  # honest servers: none
                report["spot_check"][str(fraction)] = rate
                checking.stop()
            log(f"spot checks: {report['spot_check']}")
            report["concurrent"] = concurrent_rate(client, servers, prompts(CONCURRENT), args.tokens)
            log(f"concurrent: {report['concurrent']}")
            report["stream"] = stream_gaps(client, texts[0], args.tokens)
            report["failover"] = stream_gaps(client, texts[1 % len(texts)], args.tokens, 5, [middle, spare])
            log(f"stream: {report['stream']}; failover: {report['failover']}")
        finally:
            report["orphans"] = factory.close()
    local, piped = report["local"]["tokens_per_s"], report["pipelined"]["tokens_per_s"]
    report["pipelined_over_local"] = round(piped / local, 3) if local else None
    relayed = report["hop_by_hop"]["tokens_per_s"]
    report["hop_by_hop_over_local"] = round(relayed / local, 3) if local else None
    report["server_push_over_hop_by_hop"] = round(piped / relayed, 3) if relayed else None
    report["target_ratio"] = TARGET_RATIO
    concurrent = report["concurrent"]
    report["meets_targets"] = {
        "pipelined_over_local": (report["pipelined_over_local"] or 0) >= TARGET_RATIO,
        "concurrent": concurrent["aggregate_over_one"] >= TARGET_CONCURRENT and concurrent["unchanged"] == CONCURRENT,
    }
    report["machine"] = machine.finish()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
