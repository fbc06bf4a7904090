"""Pipelined generation through a chain of servers, surviving a server's death mid-generation.

:class:`ChainSession` holds one KV-cache session on every server of a chain (:mod:`garden.inference.route`)
and runs hidden states through them. It keeps, for every hop, the hidden states it sent there: when a
server dies, times out or loses the session, the client routes around it (a new sub-chain for exactly
that hop's layers), replays the hop's history into the new servers' caches, and sends the step again.
Greedy output is then the same as if nothing had happened: the new caches hold what the old one held.

:class:`SwarmGenerator` is the token loop on top: embeddings and the LM head run here
(:class:`garden.inference.blocks.Ends`), then greedy or sampled decoding (temperature, top-p, seed), stop
tokens and stop strings, and text streamed in pieces that never split a character or a stop string.
Long prompts go in chunks of ``max_step_tokens``; every chunk passes the whole chain before the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from garden.inference.blocks import Ends, LayerSpan
from garden.inference.route import CoverageError, Hop, Router
from garden.inference.server import rpc_names
from garden.protocol.inference_rpc import (
    ERROR_BUSY,
    ERROR_OUT_OF_SYNC,
    ERROR_UNKNOWN_SESSION,
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
)
from garden.protocol.records import RecordError

logger = logging.getLogger(__name__)

BUSY_BAN_SECONDS = 5.0
"""A busy server (all sessions taken) is left out of routing this long; a failed one for the router's
``ban_seconds``."""

LocalHandlers = Callable[[], dict[str, Callable[..., Awaitable[Any]]]]
"""This daemon's own block-server handlers by RPC name (called directly, not over P2P)."""


@dataclass(frozen=True)
class ChainConfig:
    """:param wire_dtype: dtype of hidden states on the wire
    :param call_timeout: seconds one call may take before the server counts as failed
    :param max_failovers: re-routes one generation may take before it gives up
    :param max_step_tokens: tokens per forward call (servers refuse more than their cap, 1024 by default)"""

    wire_dtype: WireDtype = "float16"
    call_timeout: float = 20.0
    max_failovers: int = 4
    max_step_tokens: int = 512


@dataclass
class _Hop:
    hop: Hop
    session: str
    history: list[Any] = field(default_factory=list)  # what was sent in, float32 [1, n, hidden] each
    tokens: int = 0

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
        self.failovers = 0
        self.failover_seconds: list[float] = []

    async def open(self) -> None:
        """Route and open a session on every hop; raises ``CoverageError`` or ``BlocksRpcError``."""
        self.hops = await self._open_chain(None)

    async def _open_chain(self, span: LayerSpan | None) -> list[_Hop]:
        """Open sessions along the best chain for ``span``; a server that fails to open is routed around
        (a dead server's record lives on for two announce periods). Raises the last server's error when no
        chain is left, else ``CoverageError``."""
        last_error: BlocksRpcError | None = None
        for _ in range(self.config.max_failovers + 1):
            try:
                chain = await self.router.chain(span)
            except CoverageError:
                if last_error is not None:
                    raise last_error from None
                raise
            opened: list[_Hop] = []
            try:
                for hop in chain:
                    opened.append(await self._open(hop))
                return opened
            except BlocksRpcError as e:
                await asyncio.gather(*(self._close(h) for h in opened), return_exceptions=True)
                if not e.server_failed:
                    raise
                self.router.ban(e.peer_id, BUSY_BAN_SECONDS if e.code == ERROR_BUSY else None)
                last_error = e
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
        await asyncio.gather(*(self._close(h) for h in self.hops), return_exceptions=True)
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
            while index < len(self.hops):
                hop = self.hops[index]
                try:
                    out = await self._forward(hop, chunk)
                except BlocksRpcError as e:
                    if not e.server_failed:
                        raise
                    await self._fail_over(index, e)
                    continue  # the same index now names the first replacement hop
                hop.history.append(chunk)
                hop.tokens += chunk.shape[1]
                chunk = out
                index += 1
            outputs.append(chunk)
        return torch.cat(outputs, dim=1)

    async def _forward(self, hop: _Hop, hidden: Any) -> Any:
        request = runtime_pb2.ExpertRequest(
            metadata=pack(ForwardRequest(session=hop.session, offset=hop.tokens)),
            tensors=[serialize_hidden(hidden, self.config.wire_dtype)],
        )
        response = await self._call(hop.peer_id, self.forward_name, request)
        if len(response.tensors) != 1:
            raise BlocksRpcError(hop.peer_id, "bad answer", f"{len(response.tensors)} tensors")
        try:
            return deserialize_hidden(response.tensors[0], self.hidden_size, hidden.shape[1])
        except RecordError as e:
            raise BlocksRpcError(hop.peer_id, "bad answer", str(e)) from None

    async def _fail_over(self, index: int, error: BlocksRpcError) -> None:
        """Replace hop ``index`` by a new sub-chain for its layers, its caches refilled from the history."""
        import torch

        if self.failovers >= self.config.max_failovers:
            raise error
        self.failovers += 1
        started = time.monotonic()
        failed = self.hops[index]
        logger.warning("layers %s on %s failed (%s); routing around it", failed.hop.span, failed.peer_id, error)
        if error.code not in (ERROR_UNKNOWN_SESSION, ERROR_OUT_OF_SYNC):  # a lost session is no reason to
            self.router.ban(failed.peer_id, BUSY_BAN_SECONDS if error.code == ERROR_BUSY else None)  # avoid it
        asyncio.ensure_future(self._close(failed))
        replacement = await self._open_chain(failed.hop.span)
        if failed.history:
            states = torch.cat(failed.history, dim=1)
            for new in replacement:
                outs = []
                for chunk in torch.split(states, self.config.max_step_tokens, dim=1):
                    outs.append(await self._forward(new, chunk))
                    new.history.append(chunk)
                    new.tokens += chunk.shape[1]
                states = torch.cat(outs, dim=1)
        self.hops[index : index + 1] = replacement
        self.failover_seconds.append(time.monotonic() - started)
        logger.info(
            "layers %s now on %s (replayed %d tokens in %.2f s)",
            failed.hop.span, ", ".join(h.peer_id for h in replacement), failed.tokens, time.monotonic() - started,
        )  # fmt: skip

    async def _call(self, peer_id: str, name: str, request: Any, timeout: float | None = None) -> Any:
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
        self.router.measured(peer_id, time.monotonic() - started)
        try:
            reply: Reply = unpack(Reply, response.metadata, "reply")
        except RecordError as e:
            raise BlocksRpcError(peer_id, "bad answer", str(e)) from None
        if not reply.ok:
            raise BlocksRpcError(peer_id, reply.error or "refused", reply.detail)
        return response


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


class SwarmGenerator:
    """Generates with a model whose layers live on the swarm: embeddings and head here, layers on a chain."""

    def __init__(self, p2p: P2P, router: Router, ends: Ends, chain: ChainConfig | None = None,
                 namespace: str = "garden", local: LocalHandlers | None = None) -> None:  # fmt: skip
        self.p2p, self.router, self.ends, self.chain_config = p2p, router, ends, chain or ChainConfig()
        self.namespace, self.local = namespace, local

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
                hidden = await asyncio.to_thread(self.ends.embed, feed)
                out = await session.step(hidden)
                logits = await asyncio.to_thread(self.ends.logits, out)
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
