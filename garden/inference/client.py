"""Pipelined generation through a chain of servers, surviving a server's death mid-generation.

:class:`ChainSession` holds one KV-cache session on every server of a chain (:mod:`garden.inference.route`)
and runs hidden states through them. It keeps, for every hop, the hidden states it sent there: when a
server dies, times out or loses the session, the client routes around it (a new sub-chain for exactly
that hop's layers), replays the hop's history into the new servers' caches, and sends the step again.
Greedy output is then the same as if nothing had happened: the new caches hold what the old one held.

Spot checks (``ChainConfig.spot_check``, off by default): a server could return wrong hidden states (noise,
another model) and change every answer that goes through it. With probability ``spot_check`` a step of a
hop also runs on a second server of the same layers (the *witness*, picked at random; this peer's own
server if it serves them, since it is trusted), in a session of its own that first replays the hop's
history, so its cache holds what the hop's does. The two answers for the step must agree within
:data:`SPOT_TOLERANCE` (per token, relative L2). If they do not, the client cannot tell which one lied: a
third server of those layers (the *referee*) runs the step too, and the server the referee disagrees with is
banned for :data:`LIAR_BAN_SECONDS`. Without a referee (or if no two agree), every server in the dispute is
banned for :data:`SUSPECT_BAN_SECONDS`. A step whose server is banned is run again on a new route, and if
that server's earlier answers reached the next hops unchecked, those hops are rebuilt too: their caches
are refilled from the client's history through honest servers, so the rest of the answer is computed on
honest states (tokens already produced from unchecked steps cannot be taken back; ``spot_check=1`` checks
every step before its output goes on).

:class:`SwarmGenerator` is the token loop on top: embeddings and the LM head run here
(:class:`garden.inference.blocks.Ends`), then greedy or sampled decoding (temperature, top-p, seed), stop
tokens and stop strings, and text streamed in pieces that never split a character or a stop string.
Long prompts go in chunks of ``max_step_tokens``; every chunk passes the whole chain before the next.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from garden.inference.batching import PassQueue
from garden.inference.blocks import Ends, LayerSpan
from garden.inference.route import CoverageError, Hop, Router
from garden.inference.server import rpc_names
from garden.protocol.inference_rpc import (
    ERROR_BUSY,
    ERROR_MISMATCH,
    ERROR_NO_INPUT,
    ERROR_OUT_OF_SYNC,
    ERROR_UNKNOWN_SESSION,
    MAX_PUSH_WAIT,
    BlocksRpcError,
    CloseRequest,
    ForwardRequest,
    OpenRequest,
    Reply,
    WireDtype,
    deserialize_hidden,
    pack,
    serialize_hidden,
    unpack,
    wire_digest,
)
from garden.protocol.records import RecordError

logger = logging.getLogger(__name__)

BUSY_BAN_SECONDS = 5.0
"""A busy server (all sessions taken) is left out of routing this long; a failed one for the router's
``ban_seconds``."""
SPOT_TOLERANCE = 1e-3
"""Largest per-token relative L2 distance (:func:`hidden_distance`) between two servers' answers to the same
step that counts as agreement. Measured on the built-in model, layers 10-20 (6 prompts x 24 tokens, float16
on the wire, the witness replaying the history in one call, 1 vs 2 torch threads): honest servers differ by
at most 7.7e-5. Noise that changes greedy answers starts near 3e-2 (at 1e-2, 24 tokens of 4 prompts were
unchanged; at 1e-1 all 4 changed within 5 tokens). ``tests/inference/test_blocks.py`` checks both sides."""
HEAD_LINGER_S = 0.004
"""How long the LM head waits for the other generations of the last second to need it too (one pass of the
head for 8 generations costs 2.1x one generation's on CPU)."""
LIAR_BAN_SECONDS = 24 * 3600.0
"""How long a server outvoted by a referee stays out of this client's routes."""
SUSPECT_BAN_SECONDS = 600.0
"""How long the servers of an unresolved dispute (no referee, or no two agree) stay out: long enough to
route around a liar, short enough that an honest server it disputed comes back."""
DISAGREED = "disagreed"
"""``BlocksRpcError.code`` of a server banned by a spot check (never on the wire: the client's verdict)."""

NOBODY_S_FAULT = (ERROR_UNKNOWN_SESSION, ERROR_OUT_OF_SYNC, ERROR_NO_INPUT, ERROR_MISMATCH)
"""Failures that are no reason to avoid a server: a lost session (idle too long, a restart), a push gone wrong
between two servers (either may be at fault, or the path between them)."""

LocalHandlers = Callable[[], dict[str, Callable[..., Awaitable[Any]]]]
"""This daemon's own block-server handlers by RPC name (called directly, not over P2P)."""


@dataclass(frozen=True)
class ChainConfig:
    """:param wire_dtype: dtype of hidden states on the wire
    :param call_timeout: seconds one call may take before the server counts as failed
    :param max_failovers: re-routes one generation may take before it gives up
    :param max_step_tokens: tokens per forward call (servers refuse more than their cap, 1024 by default)
    :param spot_check: probability that a step of a hop is also run on a second server of its layers and
        compared (0: never, the default, for speed; 1: every step, about twice the servers' work and more
        for the replays)
    :param spot_tolerance: see :data:`SPOT_TOLERANCE`
    :param push: decoding steps go from server to server (each pushes its output on to the next), not back to
        this client between hops: a token crosses the network four times on a chain of three instead of six.
        Off while spot checks are on (each hop's answer is checked before it goes on), on chains through this
        peer's own server, and for the rest of a session after a push went wrong."""

    wire_dtype: WireDtype = "float16"
    call_timeout: float = 20.0
    max_failovers: int = 4
    max_step_tokens: int = 512
    spot_check: float = 0.0
    spot_tolerance: float = SPOT_TOLERANCE
    push: bool = True


@dataclass
class _Hop:
    hop: Hop
    session: str
    history: list[Any] = field(default_factory=list)  # what was sent in, float32 [1, n, hidden] each
    tokens: int = 0
    unchecked: int = 0  # tokens whose output from this hop went on to the next hop without a spot check

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id


class ChainSession:
    """KV-cache sessions for one generation along a chain covering all of the model's layers."""

    def __init__(self, p2p: P2P, router: Router, hidden_size: int, max_tokens: int, config: ChainConfig,
                 namespace: str = "garden", local: LocalHandlers | None = None) -> None:  # fmt: skip
        self.p2p, self.router, self.hidden_size, self.max_tokens = p2p, router, hidden_size, max_tokens
        self.config, self.local = config, local or (lambda: {})
        self.open_name, self.forward_name, self.close_name = rpc_names(namespace)
        self.hops: list[_Hop] = []
        self.push = config.push
        self.pushed_steps = 0  # decoding steps that went from server to server
        self.failovers = 0
        self.failover_seconds: list[float] = []
        self.spot_checks = 0  # steps compared with a witness
        self.caught: list[str] = []  # servers banned by this session's spot checks
        self._rng = random.Random()  # which steps are checked: the servers cannot predict it
        self._closing: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Route and open a session on every hop; raises ``CoverageError`` or ``BlocksRpcError``."""
        self.hops = await self._open_chain(None)

    async def _open_chain(self, span: LayerSpan | None) -> list[_Hop]:
        """Open sessions along the best chain for ``span``, on all its servers at once; a server that fails to open
        is routed around (a dead server's record lives on for two announce periods). Raises the last server's
        error when no chain is left, else ``CoverageError``."""
        last_error: BlocksRpcError | None = None
        for _ in range(self.config.max_failovers + 1):
            try:
                chain = await self.router.chain(span)
            except CoverageError:
                if last_error is not None:
                    raise last_error from None
                raise
            results = await asyncio.gather(*(self._open(hop) for hop in chain), return_exceptions=True)  # at once
            opened = [r for r in results if isinstance(r, _Hop)]
            if len(opened) == len(chain):
                return opened
            await asyncio.gather(*(self._close(h) for h in opened), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for error in errors:
                if not isinstance(error, BlocksRpcError) or not error.server_failed:
                    raise error
            for error in errors:
                assert isinstance(error, BlocksRpcError)
                self.router.ban(error.peer_id, BUSY_BAN_SECONDS if error.code == ERROR_BUSY else None)
                last_error = error
        assert last_error is not None
        raise last_error

    async def _open(self, hop: Hop) -> _Hop:
        session = uuid.uuid4().hex
        meta = OpenRequest(
            session=session, model=hop.record.model, start=hop.span.start, end=hop.span.end,
            max_tokens=self.max_tokens, wire_dtype=self.config.wire_dtype,
        )  # fmt: skip
        await self._call(hop.peer_id, self.open_name, runtime_pb2.ExpertRequest(metadata=pack(meta)))
        return _Hop(hop, session)

    async def close(self) -> None:
        await asyncio.gather(*(self._close(h) for h in self.hops), *self._closing, return_exceptions=True)
        self.hops = []

    async def _close(self, hop: _Hop) -> None:
        request = runtime_pb2.ExpertRequest(metadata=pack(CloseRequest(session=hop.session)))
        try:
            await self._call(hop.peer_id, self.close_name, request, timeout=5.0)
        except BlocksRpcError as e:
            logger.debug("closing session on %s: %s", hop.peer_id, e)

    # --- running -----------------------------------------------------------------------------------------
    async def step(self, hidden: Any) -> Any:
        """Hidden states after the last layer for ``hidden`` (embeddings of the next tokens)."""
        import torch

        outputs = []
        for chunk in torch.split(hidden, self.config.max_step_tokens, dim=1):
            index = 0
            if self._can_push(chunk):
                index, chunk = await self._pushed_step(chunk)
            while index < len(self.hops):
                hop = self.hops[index]
                try:
                    out, checked = await self._run_hop(hop, chunk)
                except BlocksRpcError as e:
                    if not e.server_failed:
                        raise
                    await self._fail_over(index, e)
                    continue  # the same index now names the first replacement hop
                hop.history.append(chunk)
                hop.tokens += chunk.shape[1]
                hop.unchecked += 0 if checked else chunk.shape[1]
                chunk = out
                index += 1
            outputs.append(chunk)
        return torch.cat(outputs, dim=1)

    # --- server to server ----------------------------------------------------------------------------------
    def _can_push(self, chunk: Any) -> bool:
        peers = [h.peer_id for h in self.hops]
        return (
            self.push and self.config.spot_check <= 0 and chunk.shape[1] == 1 and len(peers) > 1
            and self._me not in peers and all(a != b for a, b in zip(peers, peers[1:], strict=False))
        )  # fmt: skip

    async def _pushed_step(self, chunk: Any) -> tuple[int, Any]:
        """Run a one-token step along the chain with every server pushing its output on to the next (the
        requests go out at once; each answers with its output, so every hop's history stays here).

        Returns (hops done, their output). All of them, normally; when a server failed, the hops from it on are
        replaced (their caches may hold the step or not: they are rebuilt from the history) and the caller runs
        the step on from there one hop at a time. A push that did not arrive, or a server that ran other hidden
        states than the one before it answered, turns pushing off for this session."""
        hops = list(self.hops)
        before, after = [None, *hops[:-1]], [*hops[1:], None]
        tasks = [
            asyncio.ensure_future(self._forward_pushed(hop, chunk if i == 0 else None, before[i], after[i]))
            for i, hop in enumerate(hops)
        ]
        try:
            await _until_first_failure(tasks)
        finally:
            for task in tasks:
                task.cancel()  # those after a failure wait for a push that will not come
            await asyncio.gather(*tasks, return_exceptions=True)
        states, sent, previous = chunk, "", 0.0
        for index, (hop, task) in enumerate(zip(hops, tasks, strict=True)):
            result = task.exception() or task.result()
            if isinstance(result, BlocksRpcError):
                failure = result
            elif isinstance(result, BaseException):
                raise result
            else:
                out, wire, ran, answered = result
                failure = None
                if index and ran != sent:
                    failure = BlocksRpcError(hop.peer_id, ERROR_MISMATCH, "its input is not what the server before "
                                             "it answered")  # fmt: skip
                elif index:  # the first hop was measured as any one-token step (``_forward_pushed``)
                    self.router.measured_pushed(hop.peer_id, answered - previous, len(hop.hop.span))
                previous = answered
            if failure is not None:
                if not failure.server_failed:
                    raise failure
                if failure.code in (ERROR_MISMATCH, ERROR_NO_INPUT):
                    self.push = False
                    logger.info("server-to-server steps off for this generation: %s", failure)
                await self._fail_over(index, failure, rebuild=True)
                return index, states
            hop.history.append(states)
            hop.tokens += 1
            hop.unchecked += 1
            states, sent = out, wire
        self.pushed_steps += 1
        return len(hops), states

    async def _forward_pushed(self, hop: _Hop, hidden: Any, before: _Hop | None, after: _Hop | None) -> Any:
        """One hop's part of a pushed step: (its output, the output's wire digest, the digest of what it ran,
        ``time.monotonic()`` of its answer)."""
        meta = ForwardRequest(
            session=hop.session, offset=hop.tokens,
            push_peer=after.peer_id if after else "", push_session=after.session if after else "",
            push_offset=after.tokens if after else 0,
            pushed_by=before.peer_id if before else "",
            wait=min(self.config.call_timeout, MAX_PUSH_WAIT) if before else 0.0,
        )  # fmt: skip
        tensors = [serialize_hidden(hidden, self.config.wire_dtype)] if hidden is not None else []
        request = runtime_pb2.ExpertRequest(metadata=pack(meta), tensors=tensors)
        if before is None:  # the first hop: measured for routing as any one-token step
            response = await self._call(hop.peer_id, self.forward_name, request, work=(len(hop.hop.span), 1))
        else:  # its time includes the hops before it; it answers "no input" after ``wait``, before this gives up
            timeout = 2 * self.config.call_timeout
            response = await self._call(hop.peer_id, self.forward_name, request, timeout=timeout, work=None)
        answered = time.monotonic()
        if len(response.tensors) != 1:
            raise BlocksRpcError(hop.peer_id, "bad answer", f"{len(response.tensors)} tensors")
        try:
            out = deserialize_hidden(response.tensors[0], self.hidden_size, 1)
            reply: Reply = unpack(Reply, response.metadata, "reply")
        except RecordError as e:
            raise BlocksRpcError(hop.peer_id, "bad answer", str(e)) from None
        return out, wire_digest(response.tensors[0]), reply.input_digest, answered

    async def _forward(self, hop: _Hop, hidden: Any) -> Any:
        request = runtime_pb2.ExpertRequest(
            metadata=pack(ForwardRequest(session=hop.session, offset=hop.tokens)),
            tensors=[serialize_hidden(hidden, self.config.wire_dtype)],
        )
        work = (len(hop.hop.span), int(hidden.shape[1]))
        response = await self._call(hop.peer_id, self.forward_name, request, work=work)
        if len(response.tensors) != 1:
            raise BlocksRpcError(hop.peer_id, "bad answer", f"{len(response.tensors)} tensors")
        try:
            return deserialize_hidden(response.tensors[0], self.hidden_size, hidden.shape[1])
        except RecordError as e:
            raise BlocksRpcError(hop.peer_id, "bad answer", str(e)) from None

    # --- spot checks ---------------------------------------------------------------------------------------
    @property
    def _me(self) -> str:
        return self.p2p.peer_id.to_base58()

    async def _run_hop(self, hop: _Hop, chunk: Any) -> tuple[Any, bool]:
        """The hop's answer for ``chunk`` and whether a witness confirmed it. Raises ``BlocksRpcError`` (code
        :data:`DISAGREED` when the hop's server was caught and banned)."""
        p = self.config.spot_check
        if p <= 0 or hop.peer_id == self._me or self._rng.random() >= p:
            return await self._forward(hop, chunk), False
        witness = await self._second(hop.hop.span, {hop.peer_id})
        if witness is None:
            self.router.checks["no second server"] += 1
            return await self._forward(hop, chunk), False
        main, other = await asyncio.gather(
            self._forward(hop, chunk), self._replay(witness, hop.history, chunk), return_exceptions=True
        )
        if isinstance(main, BaseException):
            raise main
        if isinstance(other, BlocksRpcError):  # no verdict: the step stands unchecked
            self.router.checks["witness failed"] += 1
            logger.info("spot check of %s skipped: witness %s failed (%s)", hop.peer_id, witness.peer_id, other)
            if other.server_failed:
                self.router.ban(other.peer_id, BUSY_BAN_SECONDS if other.code == ERROR_BUSY else None)
            return main, False
        if isinstance(other, BaseException):
            raise other
        self.spot_checks += 1
        distance = hidden_distance(main, other)
        if distance <= self.config.spot_tolerance:
            self.router.checks["agreed"] += 1
            return main, True
        self.router.checks["disagreed"] += 1
        await self._settle(hop, chunk, main, witness, other, distance)
        return main, True  # the referee sided with the hop's server

    async def _second(self, span: LayerSpan, exclude: set[str]) -> Hop | None:
        """Another server that can run all of ``span``: this peer's own if it serves them (it is trusted),
        else one picked at random (a liar cannot count on being compared only with its friends)."""
        records = [
            r for r in await self.router.servers()
            if r.start <= span.start and span.end <= r.end and r.peer_id not in exclude
        ]  # fmt: skip
        if not records:
            return None
        own = [r for r in records if r.peer_id == self._me]
        record = own[0] if own else self._rng.choice(records)
        return Hop(record.peer_id, span, record)

    async def _replay(self, hop: Hop, history: list[Any], chunk: Any) -> Any:
        """``chunk``'s answer from a fresh session on ``hop`` after the same history: what the hop's own
        server should have answered. The last call is ``chunk`` alone, the same step the hop ran."""
        import torch

        probe = await self._open(hop)
        try:
            if history:
                for part in torch.split(torch.cat(history, dim=1), self.config.max_step_tokens, dim=1):
                    await self._forward(probe, part)
                    probe.tokens += part.shape[1]
            return await self._forward(probe, chunk)
        finally:
            task = asyncio.ensure_future(self._close(probe))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _settle(self, hop: _Hop, chunk: Any, main: Any, witness: Hop, other: Any, distance: float) -> None:
        """The hop's server and the witness disagree: ask a referee, ban whoever it outvotes (or everyone in
        an unresolved dispute). Raises ``BlocksRpcError(DISAGREED)`` when the hop's server is banned."""
        accused, tolerance = hop.peer_id, self.config.spot_tolerance
        span = hop.hop.span
        what = f"layers {span} of {self.router.model}"
        if witness.peer_id == self._me:  # this peer's own layers: the truth as far as it can know
            liars, proven = [accused], True
            why = f"its hidden states for {what} are {distance:.3g} off this peer's own (tolerance {tolerance:g})"
        else:
            referee = await self._second(span, {accused, witness.peer_id})
            third: Any = None
            if referee is not None:
                try:
                    third = await self._replay(referee, hop.history, chunk)
                except BlocksRpcError as e:
                    logger.info("referee %s failed: %s", referee.peer_id, e)
            if third is None:
                liars, proven = [accused, witness.peer_id], False
                why = (f"its hidden states for {what} and another server's differ by {distance:.3g} "
                       f"(tolerance {tolerance:g}) and no third server could tell which is right")  # fmt: skip
            else:
                assert referee is not None
                hop_ok = hidden_distance(main, third) <= tolerance
                witness_ok = hidden_distance(other, third) <= tolerance
                if hop_ok and witness_ok:  # both near the referee, not near each other: at the tolerance's edge
                    logger.warning("spot check of %s on %s: inconclusive (%.3g apart)", accused, what, distance)
                    return
                if hop_ok or witness_ok:
                    liars, proven = [witness.peer_id if hop_ok else accused], True
                    why = (f"its hidden states for {what} differ from two other servers' (by {distance:.3g}, "
                           f"tolerance {tolerance:g})")  # fmt: skip
                else:
                    liars, proven = [accused, witness.peer_id, referee.peer_id], False
                    why = f"three servers' hidden states for {what} all differ (by {distance:.3g} or more)"
        for liar in liars:
            self.router.ban(liar, LIAR_BAN_SECONDS if proven else SUSPECT_BAN_SECONDS, lied=why)
            self.caught.append(liar)
        if accused in liars:
            raise BlocksRpcError(accused, DISAGREED, why)

    # --- fail-over -----------------------------------------------------------------------------------------
    async def _fail_over(self, index: int, error: BlocksRpcError, rebuild: bool = False) -> None:
        """Replace hop ``index`` by a new sub-chain for its layers, its caches refilled from the history.

        A hop banned by a spot check whose earlier answers went on unchecked may have spoiled the next hops'
        caches, and after a failed pushed step the next hops may or may not hold it (``rebuild``): then every
        hop from ``index`` on is replaced, and the history replayed through all of them."""
        import torch

        if self.failovers >= self.config.max_failovers:
            raise error
        self.failovers += 1
        started = time.monotonic()
        failed = self.hops[index]
        rebuild = rebuild or (error.code == DISAGREED and failed.unchecked > 0)
        replaced = self.hops[index:] if rebuild else [failed]
        span = LayerSpan(failed.hop.span.start, replaced[-1].hop.span.end)
        logger.warning("layers %s on %s failed (%s); routing around it", failed.hop.span, failed.peer_id, error)
        if error.code == DISAGREED:
            pass  # banned by the spot check already
        elif error.code not in NOBODY_S_FAULT:
            self.router.ban(failed.peer_id, BUSY_BAN_SECONDS if error.code == ERROR_BUSY else None)
        for old in replaced:
            task = asyncio.ensure_future(self._close(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        try:
            replacement = await self._open_chain(span)
        except CoverageError as e:
            if error.code == DISAGREED:  # say why the layers have no server left for this peer
                raise BlocksRpcError(failed.peer_id, DISAGREED, f"{error.detail}; {e}") from None
            raise
        if failed.history:
            states = torch.cat(failed.history, dim=1)
            for new in replacement:
                outs = []
                for chunk in torch.split(states, self.config.max_step_tokens, dim=1):
                    outs.append(await self._forward(new, chunk))
                    new.history.append(chunk)
                    new.tokens += chunk.shape[1]
                new.unchecked = new.tokens  # its replayed answers went on to the next replacement unchecked
                states = torch.cat(outs, dim=1)
        self.hops[index : index + len(replaced)] = replacement
        self.failover_seconds.append(time.monotonic() - started)
        logger.info(
            "layers %s now on %s (replayed %d tokens in %.2f s)",
            span, ", ".join(h.peer_id for h in replacement), failed.tokens, time.monotonic() - started,
        )  # fmt: skip

    async def _call(
        self, peer_id: str, name: str, request: Any, timeout: float | None = None,
        work: tuple[int, int] | None = (0, 0),
    ) -> Any:  # fmt: skip
        """One RPC to ``peer_id`` (this daemon's own handlers for itself); its time is measured for routing,
        with ``work`` = (layers, tokens) it ran (None: not measured). Raises ``BlocksRpcError`` on an error or
        no answer."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout or self.config.call_timeout):
                own = self.local().get(name) if peer_id == self.p2p.peer_id.to_base58() else None
                if own is not None:  # this daemon's own server: a peer cannot dial itself
                    me = self.p2p.peer_id
                    response = await own(request, P2PContext(handle_name=name, local_id=me, remote_id=me))
                else:
                    response = await self.p2p.call_protobuf_handler(
                        PeerID.from_base58(peer_id), name, request, runtime_pb2.ExpertResponse
                    )
        except TimeoutError:
            raise BlocksRpcError(peer_id, "timeout", f"no answer in {timeout or self.config.call_timeout} s") from None
        except Exception as e:  # noqa: BLE001 - a dead peer, a refused stream, a too-large message
            raise BlocksRpcError(peer_id, "unreachable", f"{type(e).__name__}: {str(e)[:200]}") from None
        elapsed = time.monotonic() - started
        try:
            reply: Reply = unpack(Reply, response.metadata, "reply")
        except RecordError as e:
            raise BlocksRpcError(peer_id, "bad answer", str(e)) from None
        if not reply.ok:
            raise BlocksRpcError(peer_id, reply.error or "refused", reply.detail)
        if work is not None:
            self.router.measured(peer_id, elapsed, *work)  # only answers that did the work count
        return response


async def _until_first_failure(tasks: list[asyncio.Future[Any]]) -> None:
    """Wait until every task is done, or until one fails and every task before it is done (the ones after it
    are the caller's to cancel: they wait for what the failed one would have pushed)."""
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        failed = [i for i, t in enumerate(tasks) if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            pending = {t for t in pending if tasks.index(t) < min(failed)}


def hidden_distance(a: Any, b: Any) -> float:
    """How far two answers to the same step are apart: per token, the L2 norm of the difference over the
    larger of the two norms; the largest over the tokens. Relative, because hidden states of different
    layers differ in scale by orders of magnitude; per token, so one forged position is not averaged away."""
    import torch

    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return float(((a - b).norm(dim=-1) / scale).max())


@dataclass(frozen=True)
class SamplingConfig:
    """:param max_new_tokens: longest answer
    :param temperature: 0 is greedy
    :param top_p: nucleus mass when sampling
    :param seed: seeds the sampler (reproducible samples); None draws one
    :param stop: strings that end the answer (not included in it)
    :param min_tokens: end tokens are not picked before this many tokens (vLLM's ``min_tokens``)"""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = "length"  # "stop" (end token or stop string) or "length"
    first_token_s: float | None = None
    seconds: float = 0.0
    failovers: int = 0
    failover_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    spot_checks: int = 0  # steps compared with a second server
    caught: list[str] = field(default_factory=list)  # servers banned by those checks


class SwarmGenerator:
    """Generates with a model whose layers live on the swarm: embeddings and head here, layers on a chain."""

    def __init__(self, p2p: P2P, router: Router, ends: Ends, chain: ChainConfig | None = None,
                 namespace: str = "garden", local: LocalHandlers | None = None) -> None:  # fmt: skip
        self.p2p, self.router, self.ends, self.chain_config = p2p, router, ends, chain or ChainConfig()
        self.namespace, self.local = namespace, local
        # the LM head of concurrent generations runs as one pass: it reads 28 M weights per call
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="garden-ends")
        self.heads: PassQueue[Any] = PassQueue(
            self._executor, ends.logits, ends.logits_many, lambda _: "head", linger_s=HEAD_LINGER_S
        )  # fmt: skip

    def close(self) -> None:
        self.heads.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def context(self) -> int:
        return int(getattr(self.ends.config, "max_position_embeddings", 0) or 1 << 20)

    async def stream(
        self, prompt_ids: list[int], sampling: SamplingConfig, stats: GenerationStats
    ) -> AsyncIterator[str]:
        """Text pieces of the answer as they are decoded; ``stats`` is filled in as it goes."""
        import torch

        started = time.monotonic()
        stats.prompt_tokens = len(prompt_ids)
        budget = min(sampling.max_new_tokens, self.context - len(prompt_ids))
        if budget < 1:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {self.context}")
        session = ChainSession(
            self.p2p, self.router, int(self.ends.config.hidden_size), len(prompt_ids) + budget, self.chain_config,
            self.namespace, self.local,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else int(time.time_ns()))
        decoder = _TextDecoder(self.ends.tokenizer, sampling.stop)
        eos = self.ends.eos_ids
        try:
            await session.open()
            feed = prompt_ids
            for _ in range(budget):
                hidden = self.ends.embed(feed)  # a row lookup (20 us a token): no thread hop for it
                out = await session.step(hidden)
                logits = await self.heads.run(out, session)
                if stats.new_tokens < sampling.min_tokens:
                    logits = logits.clone()  # an inference-mode tensor: not writable here
                    logits[list(eos)] = -float("inf")
                token = _pick(logits, sampling, generator)
                if stats.first_token_s is None:
                    stats.first_token_s = time.monotonic() - started
                if token in eos:
                    stats.finish_reason = "stop"
                    break
                stats.tokens.append(token)
                stats.new_tokens += 1
                piece, stopped = decoder.add(token)
                if piece:
                    yield piece
                if stopped:
                    stats.finish_reason = "stop"
                    break
                feed = [token]
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            stats.seconds = time.monotonic() - started
            stats.failovers, stats.failover_seconds = session.failovers, session.failover_seconds
            stats.spot_checks, stats.caught = session.spot_checks, session.caught
            self.heads.forget(session)
            await session.close()


def _pick(logits: Any, sampling: SamplingConfig, generator: Any) -> int:
    import torch

    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _TextDecoder:
    """Turns tokens into text pieces: never half a character (a multi-byte one split over tokens decodes
    to U+FFFD until complete), never the start of a stop string that may still complete."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that could be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._take(safe), False

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def flush(self) -> str:
        return self._take(len(self.text))
