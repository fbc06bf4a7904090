"""Serving a range of a model's decoder layers to the swarm (the ``server`` role).

The server loads only its layers (:class:`garden.inference.blocks.Blocks`), measures how fast it runs
them, and announces a :class:`garden.protocol.blocks.BlocksRecord` every announce period. Clients open a
session (a KV cache on this server for a sub-range of its layers), send forward steps (hidden states in,
hidden states out) and close it. Sessions are capped in number, in tokens each, and in total cache tokens,
and an idle one is dropped after ``idle_timeout``: a client that vanished never holds memory for long.

Without a fixed range the server picks the ``blocks`` consecutive layers that the swarm covers least
(fewest servers, then least throughput) and moves when it is redundant while some layers have no server
at all (only while it holds no session, so no client loses its cache to a move).

One daemon may serve several models or ranges: :class:`garden.inference.service.BlockRpc` registers the
three RPCs once and hands each call to the server it is for.

The layers run on one worker thread: the event loop (DHT, HTTP, other RPCs) never waits for a forward
pass, and two sessions' passes never compete for the same cores. Concurrent sessions' decode steps share
passes (:mod:`garden.inference.batching`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from garden.host.memory import memory_shortfall
from garden.inference.batching import PassQueue
from garden.inference.blocks import Blocks, LayerSpan, load_config
from garden.inference.route import bounded_priors, read_blocks
from garden.protocol.inference_rpc import (
    ERROR_BAD_REQUEST,
    ERROR_BUSY,
    ERROR_INTERNAL,
    ERROR_NO_INPUT,
    ERROR_NOT_SERVED,
    ERROR_OUT_OF_SYNC,
    ERROR_TOO_LONG,
    ERROR_UNKNOWN_SESSION,
    CloseRequest,
    ForwardRequest,
    OpenRequest,
    PushRequest,
    Reply,
    WireDtype,
    deserialize_hidden,
    pack,
    serialize_hidden,
    unpack,
    wire_digest,
)
from garden.protocol.blocks import BlocksRecord, models_subkey
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError

logger = logging.getLogger(__name__)

THROUGHPUT_PROBE_STEPS = 8
"""One-token forward passes timed at start (after one warm-up) to announce the range's throughput."""
PUSH_TIMEOUT = 10.0
"""Seconds a server gives the push of its output to the next server of a chain (the client's own wait for that
server's answer is what fails the step, and routes around whoever failed)."""


@dataclass
class ServeConfig:
    """:param model: the model reference served (``builtin:smollm2-135m``)
    :param span: a fixed layer range; None picks the least covered ``blocks`` layers
    :param blocks: layers to serve when ``span`` is None (default: the whole model)
    :param max_sessions: open sessions at once
    :param max_session_tokens: tokens one session may hold (prompt + answer)
    :param cache_tokens: tokens all sessions together may reserve
    :param max_step_tokens: tokens one forward call may carry (clients split longer prompts)
    :param idle_timeout: seconds after which a session nobody used is dropped
    :param announce_period: seconds between announcements; a record lives twice that
    :param namespace: prefix of the RPC names (the swarm's name)
    :param max_memory: bytes the layers may take (``--max-memory``); a range that would not fit (in this or
        in the available RAM) is not loaded, and ``/status`` says why
    :param max_batch: most sessions' decode steps run as one forward pass (:mod:`garden.inference.batching`)
    :param batch_linger_s: longest a pass waits for the other sessions that stepped in the last second (none
        when no other did: a lone client never waits)"""

    model: str
    span: LayerSpan | None = None
    blocks: int | None = None
    max_sessions: int = 16
    max_session_tokens: int = 4096
    cache_tokens: int = 32768
    max_step_tokens: int = 1024
    idle_timeout: float = 120.0
    announce_period: float = 30.0
    rebalance_period: float = 60.0
    namespace: str = "garden"
    max_memory: int | None = None
    max_batch: int = 16
    batch_linger_s: float = 0.004


@dataclass
class Session:
    id: str
    owner: str  # the client's peer id: only it may use or close the session
    sub: LayerSpan
    cache: Any
    max_tokens: int
    wire_dtype: WireDtype
    tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inbox: Pushed | None = None  # the hidden states pushed for the next step, before or while its request waits
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class Pushed(NamedTuple):
    offset: int
    sender: str
    hidden: Any
    digest: str


@dataclass
class ServerStats:
    sessions_opened: int = 0
    tokens_served: int = 0  # tokens run through this server's layers
    refused: Counter[str] = field(default_factory=Counter)  # by error code
    pushed: int = 0  # outputs sent on to the next server of a chain
    push_failures: int = 0


@dataclass(frozen=True)
class ServerSnapshot:
    """One block server as ``/status`` shows it.

    :param layers: ``START-END`` (half-open); None while loading or after a failure
    :param throughput: layer-tokens per second measured at start, one token at a time
    :param refused: RPCs refused, by error code
    :param decode_steps: one-token steps run; ``decode_passes``: the forward passes that ran them (several
        sessions' steps share one pass); ``largest_batch``: the most steps one pass ran
    """

    model: str
    layers: str | None
    throughput: float
    sessions: int
    max_sessions: int
    tokens_served: int
    refused: dict[str, int]
    error: str | None
    decode_steps: int = 0
    decode_passes: int = 0
    largest_batch: int = 0


def rpc_names(namespace: str) -> tuple[str, str, str]:
    return f"{namespace}.blocks.open", f"{namespace}.blocks.forward", f"{namespace}.blocks.close"


def push_rpc_name(namespace: str) -> str:
    return f"{namespace}.blocks.push"


def choose_span(records: list[BlocksRecord], num_layers: int, blocks: int, exclude: str | None = None) -> LayerSpan:
    """The ``blocks`` consecutive layers with the fewest servers (then the least throughput) over their least
    covered layer; ``exclude`` (this server) does not count as coverage. Throughputs are announcements, so
    each counts only up to the median of the others' (:func:`garden.inference.route.bounded_priors`): a
    liar announcing 1e9 cannot make its layers look served and push honest servers elsewhere."""
    blocks = min(blocks, num_layers)
    servers = [0] * num_layers
    speed = [0.0] * num_layers
    others = [r for r in records if r.peer_id != exclude]
    priors = bounded_priors(others)
    for r in others:
        for i in range(r.start, min(r.end, num_layers)):
            servers[i] += 1
            speed[i] += priors[r.peer_id]
    candidates = [
        (min(servers[s : s + blocks]), sum(servers[s : s + blocks]), sum(speed[s : s + blocks]), s)
        for s in range(num_layers - blocks + 1)
    ]
    start = min(candidates)[3]
    return LayerSpan(start, start + blocks)


def better_span(records: list[BlocksRecord], me: str, current: LayerSpan, num_layers: int) -> LayerSpan | None:
    """Where a server of ``current`` should move: the least covered span of its size, when every layer it
    holds is also served by others while some layers of that span have no server at all; else None."""
    others = [r for r in records if r.peer_id != me]

    def held(i: int) -> bool:
        return any(r.start <= i < r.end for r in others)

    best = choose_span(others, num_layers, len(current))
    redundant = all(held(i) for i in range(current.start, current.end))
    if best != current and redundant and not all(held(i) for i in range(best.start, best.end)):
        return best
    return None


class BlockServer:
    """Serves one model's layer range on ``p2p``; announces it under ``model/<ref>/blocks``."""

    def __init__(self, p2p: P2P, swarm: Any, keys: DHTKeys, private_key: Any, peer_id: str, config: ServeConfig):
        self.p2p, self.swarm, self.keys, self.private_key, self.peer_id = p2p, swarm, keys, private_key, peer_id
        self.config = config
        self.blocks: Blocks | None = None
        self.throughput = 0.0
        self.sessions: dict[str, Session] = {}
        self.stats = ServerStats()
        self.invalid_records: Counter[str] = Counter()
        self.error: str | None = None
        self.refuse: Callable[[], str | None] | None = None  # why to refuse new sessions now (a pause), or None
        self.push_name = push_rpc_name(config.namespace)
        self._pushes: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="garden-blocks")
        self.steps: PassQueue[_Step] = PassQueue(
            self._executor, _Step.run, _Step.run_many, _Step.kind, config.max_batch, config.batch_linger_s
        )  # fmt: skip
        self._num_layers = 0

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Choose the range, load it, time it and announce. Raises on a bad model. (The daemon's
        :class:`garden.inference.service.BlockRpc` routes RPCs to :meth:`rpc_open` and the others.)"""
        config = await asyncio.to_thread(load_config, self.config.model)
        self._num_layers = int(config.num_hidden_layers)
        span = self.config.span
        if span is None:
            records = await read_blocks(self.swarm, self.keys, self.config.model, self.invalid_records)
            span = choose_span(records, self._num_layers, self.config.blocks or self._num_layers, self.peer_id)
        span.check_within(self._num_layers)
        await asyncio.to_thread(self._check_memory, span)
        await self._load(span)
        await self.announce()

    def _check_memory(self, span: LayerSpan) -> None:
        """Refuse a range that would not fit: the model's estimate, scaled to the range's share of layers."""
        from garden.models.loading import model_memory_bytes

        whole = model_memory_bytes(self.config.model)
        if whole is None:
            return
        need = whole * (span.end - span.start) // max(1, self._num_layers)
        shortfall = memory_shortfall(need, self.config.max_memory)
        if shortfall is not None:
            raise MemoryError(f"not serving {self.config.model} layers {span}: they need {shortfall}")

    async def _load(self, span: LayerSpan) -> None:
        started = time.monotonic()
        blocks = await asyncio.get_running_loop().run_in_executor(self._executor, Blocks.load, self.config.model, span)
        self.throughput = await asyncio.get_running_loop().run_in_executor(self._executor, _measure, blocks)
        self.blocks = blocks
        logger.info(
            "serving layers %s of %s (%.1f s to load; %.0f layer-tokens/s)",
            span, self.config.model, time.monotonic() - started, self.throughput,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Re-announce, drop idle sessions, and move to a better range when the swarm needs it."""
        last_announce = last_rebalance = time.monotonic()
        tick = min(5.0, self.config.announce_period / 2, self.config.idle_timeout / 2)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=tick)
            except TimeoutError:
                pass
            if stop.is_set():
                break
            self.drop_idle()
            now = time.monotonic()
            if self.config.span is None and now - last_rebalance >= self.config.rebalance_period:
                last_rebalance = now
                try:
                    await self.rebalance()
                except Exception as e:  # noqa: BLE001 - a failed move keeps the old range
                    logger.warning("moving to another layer range failed: %s", e)
            if now - last_announce >= self.config.announce_period:
                last_announce = now
                await self.announce()

    async def stop(self) -> None:
        for task in list(self._pushes):
            task.cancel()
        self.sessions.clear()
        self.steps.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the swarm ---------------------------------------------------------------------------------------
    def record(self) -> BlocksRecord:
        assert self.blocks is not None
        reserved = sum(s.max_tokens for s in self.sessions.values())
        return BlocksRecord(
            peer_id=self.peer_id, model=self.config.model, start=self.blocks.span.start, end=self.blocks.span.end,
            num_layers=self._num_layers, hidden_size=self.blocks.hidden_size, throughput=max(self.throughput, 1e-3),
            free_cache_tokens=max(0, self.config.cache_tokens - reserved), max_sessions=self.config.max_sessions,
            max_session_tokens=self.config.max_session_tokens, announced_at=get_dht_time(),
        )  # fmt: skip

    async def announce(self) -> bool:
        if self.blocks is None:
            return False
        record = self.record()
        raw, expiration = record.to_wire(self.private_key), record.announced_at + 2 * self.config.announce_period
        stored = await asyncio.gather(
            self.swarm.store(self.keys.model_blocks(self.config.model), raw, expiration, subkey=self.peer_id),
            self.swarm.store(self.keys.models, raw, expiration, subkey=models_subkey(record)),
        )
        ok = all(stored)
        if not ok:
            span, model = self.blocks.span, self.config.model
            logger.warning("announcing layers %s of %s failed; retrying next period", span, model)
        return ok

    async def rebalance(self) -> bool:
        """Move when this range is held by others too while some layers have no server (and no session
        is open here). Returns whether it moved."""
        assert self.blocks is not None
        if self.sessions:
            return False
        records = await read_blocks(self.swarm, self.keys, self.config.model, self.invalid_records)
        current = self.blocks.span
        best = better_span(records, self.peer_id, current, self._num_layers)
        if best is None:
            return False
        logger.info("layers %s are served elsewhere and %s by no one: moving there", current, best)
        await self._load(best)
        await self.announce()
        return True

    def drop_idle(self) -> None:
        now = time.monotonic()
        for sid, session in list(self.sessions.items()):
            if now - session.last_used > self.config.idle_timeout and not session.lock.locked():
                logger.info("session %s idle for %.0f s: dropped", sid[:8], now - session.last_used)
                del self.sessions[sid]
                self.steps.forget(sid)

    def snapshot(self) -> ServerSnapshot:
        span = self.blocks.span if self.blocks is not None else None
        return ServerSnapshot(
            model=self.config.model, layers=str(span) if span else None, throughput=round(self.throughput, 1),
            sessions=len(self.sessions), max_sessions=self.config.max_sessions,
            tokens_served=self.stats.tokens_served, refused=dict(self.stats.refused), error=self.error,
            decode_steps=self.steps.stats.merged_calls, decode_passes=self.steps.stats.merged_passes,
            largest_batch=self.steps.stats.largest_batch,
        )  # fmt: skip

    # --- RPCs --------------------------------------------------------------------------------------------
    def _error(self, code: str, detail: str) -> runtime_pb2.ExpertResponse:
        self.stats.refused[code] += 1
        return runtime_pb2.ExpertResponse(metadata=pack(Reply(ok=False, error=code, detail=detail[:500])))

    async def rpc_open(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        client = context.remote_id.to_base58()
        try:
            meta: OpenRequest = unpack(OpenRequest, request.metadata, "open request")
            sub = LayerSpan(meta.start, meta.end)
        except (RecordError, ValueError) as e:
            logger.info("refused an open request from %s: %s", client, e)
            return self._error(ERROR_BAD_REQUEST, str(e))
        blocks = self.blocks
        if blocks is None or meta.model != self.config.model or not blocks.span.contains(sub):
            held = f"{self.config.model} layers {blocks.span}" if blocks else "nothing yet"
            return self._error(ERROR_NOT_SERVED, f"asked for {meta.model} layers {sub}; this server holds {held}")
        self.drop_idle()
        if meta.session in self.sessions:
            return self._error(ERROR_BAD_REQUEST, "session id already open")
        refusal = self.refuse() if self.refuse is not None else None
        if refusal:  # e.g. its owner paused serving: clients route around it like around a full server
            return self._error(ERROR_BUSY, refusal)
        if len(self.sessions) >= self.config.max_sessions:
            return self._error(ERROR_BUSY, f"{self.config.max_sessions} sessions open, the most this server takes")
        if meta.max_tokens > self.config.max_session_tokens:
            return self._error(
                ERROR_TOO_LONG, f"{meta.max_tokens} tokens asked, at most {self.config.max_session_tokens} a session"
            )
        reserved = sum(s.max_tokens for s in self.sessions.values())
        if reserved + meta.max_tokens > self.config.cache_tokens:
            return self._error(ERROR_BUSY, f"cache full: {self.config.cache_tokens - reserved} tokens left")
        self.sessions[meta.session] = Session(
            meta.session, client, sub, blocks.new_cache(), meta.max_tokens, meta.wire_dtype
        )
        self.stats.sessions_opened += 1
        return runtime_pb2.ExpertResponse(metadata=pack(Reply(ok=True)))

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        client = context.remote_id.to_base58()
        blocks = self.blocks
        hidden: Any = None
        try:
            meta: ForwardRequest = unpack(ForwardRequest, request.metadata, "forward request")
            if blocks is None:
                raise RecordError("no layers loaded yet")
            if meta.pushed_by:  # the hidden states come from the server before this one (rpc_push)
                if request.tensors:
                    raise RecordError(f"{len(request.tensors)} tensors in a step whose input is pushed")
            elif len(request.tensors) != 1:
                raise RecordError(f"{len(request.tensors)} tensors, expected one of hidden states")
            else:
                hidden = deserialize_hidden(request.tensors[0], blocks.hidden_size, self.config.max_step_tokens)
            if bool(meta.push_peer) != bool(meta.push_session):
                raise RecordError("a push needs both the next server and its session")
        except RecordError as e:
            logger.info("refused a forward step from %s: %s", client, e)
            return self._error(ERROR_BAD_REQUEST, str(e))
        assert blocks is not None
        session = self.sessions.get(meta.session)
        if session is None or session.owner != client:
            return self._error(ERROR_UNKNOWN_SESSION, "closed, idle too long, or never opened here")
        async with session.lock:
            if meta.offset != session.tokens:
                return self._error(ERROR_OUT_OF_SYNC, f"the session holds {session.tokens} tokens, not {meta.offset}")
            digest = ""
            if meta.pushed_by:
                pushed = await self._pushed(session, meta)
                if pushed is None:
                    return self._error(ERROR_NO_INPUT, f"nothing pushed by {meta.pushed_by} in {meta.wait:g} s")
                hidden, digest = pushed.hidden, pushed.digest
            if session.tokens + hidden.shape[1] > session.max_tokens:
                return self._error(ERROR_TOO_LONG, f"the session was opened for {session.max_tokens} tokens")
            try:
                out = await self.steps.run(_Step(blocks, hidden, session.cache, session.sub), session.id)
            except Exception as e:  # noqa: BLE001 - the cache may hold part of the step now: drop the session
                logger.exception("forward step of session %s failed", meta.session[:8])
                self.sessions.pop(meta.session, None)
                return self._error(ERROR_INTERNAL, f"{type(e).__name__}: {str(e)[:200]}")
            session.tokens += hidden.shape[1]
            session.inbox = None
            session.last_used = time.monotonic()
            self.stats.tokens_served += hidden.shape[1]
            wire = serialize_hidden(out, session.wire_dtype)
            if meta.push_peer:  # on to the next server first: the chain waits for it, the client does not
                self._push(meta, wire)
            reply = Reply(ok=True, tokens=session.tokens, input_digest=digest)
            return runtime_pb2.ExpertResponse(metadata=pack(reply), tensors=[wire])

    async def _pushed(self, session: Session, meta: ForwardRequest) -> Pushed | None:
        """The hidden states pushed for this step by ``meta.pushed_by``, waiting up to ``meta.wait`` seconds
        for them; None if none came (or another peer pushed them: the client named who would)."""
        try:
            async with asyncio.timeout(meta.wait):
                while session.inbox is None or session.inbox.offset != meta.offset:
                    session.arrived.clear()
                    await session.arrived.wait()
        except TimeoutError:
            return None
        pushed, session.inbox = session.inbox, None
        if pushed.sender != meta.pushed_by:
            logger.info("session %s: a step pushed by %s, not by %s as its client said", meta.session[:8],
                        pushed.sender, meta.pushed_by)  # fmt: skip
            return None
        return pushed

    def _push(self, meta: ForwardRequest, wire: Any) -> None:
        request = runtime_pb2.ExpertRequest(
            metadata=pack(PushRequest(session=meta.push_session, offset=meta.push_offset)), tensors=[wire]
        )
        task = asyncio.ensure_future(self._send_push(meta.push_peer, request))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    async def _send_push(self, peer: str, request: runtime_pb2.ExpertRequest) -> None:
        try:
            async with asyncio.timeout(PUSH_TIMEOUT):
                response = await self.p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), self.push_name, request, runtime_pb2.ExpertResponse
                )
            reply: Reply = unpack(Reply, response.metadata, "push reply")
            if not reply.ok:
                raise RecordError(f"{reply.error} ({reply.detail})")
            self.stats.pushed += 1
        except Exception as e:  # noqa: BLE001 - a dead or unreachable next server: its client routes around it
            self.stats.push_failures += 1
            logger.info("pushing a step on to %s failed: %s", peer[:16], str(e)[:200])

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """The hidden states of a step, from the server before this one in its client's chain (the client's
        forward request names that server: anyone else's push is kept out by :meth:`_pushed`)."""
        sender = context.remote_id.to_base58()
        blocks = self.blocks
        try:
            meta: PushRequest = unpack(PushRequest, request.metadata, "push request")
            if len(request.tensors) != 1 or blocks is None:
                raise RecordError(f"{len(request.tensors)} tensors, expected one of hidden states")
            hidden = deserialize_hidden(request.tensors[0], blocks.hidden_size, 1)  # a decoding step: one token
        except RecordError as e:
            logger.info("refused a pushed step from %s: %s", sender, e)
            return self._error(ERROR_BAD_REQUEST, str(e))
        session = self.sessions.get(meta.session)
        if session is None:
            return self._error(ERROR_UNKNOWN_SESSION, "closed, idle too long, or never opened here")
        if meta.offset != session.tokens:
            return self._error(ERROR_OUT_OF_SYNC, f"the session holds {session.tokens} tokens, not {meta.offset}")
        if session.inbox is not None and session.inbox.offset == meta.offset:
            return self._error(ERROR_BAD_REQUEST, f"the step at {meta.offset} was pushed already")
        session.inbox = Pushed(meta.offset, sender, hidden, wire_digest(request.tensors[0]))
        session.arrived.set()
        return runtime_pb2.ExpertResponse(metadata=pack(Reply(ok=True, tokens=session.tokens)))

    async def rpc_close(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta: CloseRequest = unpack(CloseRequest, request.metadata, "close request")
        except RecordError as e:
            return self._error(ERROR_BAD_REQUEST, str(e))
        session = self.sessions.get(meta.session)
        if session is None or session.owner != context.remote_id.to_base58():
            return self._error(ERROR_UNKNOWN_SESSION, "not open here")
        del self.sessions[meta.session]
        self.steps.forget(meta.session)
        return runtime_pb2.ExpertResponse(metadata=pack(Reply(ok=True, tokens=session.tokens)))


class _Step(NamedTuple):
    """A session's forward step: one-token steps of the same layers share a pass (``Blocks.forward_batch``)."""

    blocks: Blocks
    hidden: Any
    cache: Any
    sub: LayerSpan

    def run(self) -> Any:
        return self.blocks.forward(self.hidden, self.cache, self.sub)

    @staticmethod
    def run_many(steps: list[_Step]) -> list[Any]:
        return steps[0].blocks.forward_batch([s.hidden for s in steps], [s.cache for s in steps], steps[0].sub)

    def kind(self) -> tuple[int, LayerSpan] | None:
        return (id(self.blocks), self.sub) if self.hidden.shape[1] == 1 else None


def _measure(blocks: Blocks) -> float:
    """Layer-tokens per second of one-token steps (a decode step), after one warm-up."""
    import torch

    cache = blocks.new_cache()
    hidden = torch.zeros(1, 1, blocks.hidden_size)
    blocks.forward(hidden, cache)
    started = time.perf_counter()
    for _ in range(THROUGHPUT_PROBE_STEPS):
        blocks.forward(hidden, cache)
    return len(blocks.span) * THROUGHPUT_PROBE_STEPS / max(time.perf_counter() - started, 1e-6)
