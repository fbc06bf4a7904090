"""What the daemon runs for inference: its block servers (``--serve``) and the generators its HTTP port
uses for ``/v1`` (any peer can generate with a model the swarm covers, server role or not).

A generator per model is made on first use (the model's embeddings, head and tokenizer load once, in a
thread) and kept. ``<swarm>/models`` lists every served range of every model (the same records as the
per-model keys), so that ``/v1/models`` can list what the swarm covers in one DHT read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from garden.errors import GardenError
from garden.host.governor import Governor
from garden.inference.blocks import Ends, LayerSpan
from garden.inference.client import ChainConfig, SwarmGenerator
from garden.inference.route import Router, missing_spans
from garden.inference.server import BlockServer, ServeConfig, ServerSnapshot, push_rpc_name, rpc_names
from garden.lifecycle import Service
from garden.models.loading import ModelRefError
from garden.net.swarm import Swarm
from garden.protocol.inference_rpc import (
    ERROR_NOT_SERVED,
    MAX_METADATA_BYTES,
    OpenRequest,
    Reply,
    pack,
    unpack,
)
from garden.protocol.blocks import BlocksRecord
from garden.protocol.keys import DHTKeys
from garden.protocol.records import RecordError, check_fresh

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingSnapshot:
    """What this peer's client learned of one model's servers: how many it measured, the spot checks by
    outcome, and the servers a spot check caught (peer id -> why)."""

    model: str
    measured: int
    spot_checks: dict[str, int]
    liars: dict[str, str]


@dataclass(frozen=True)
class ModelCoverage:
    model: str
    num_layers: int
    servers: int
    missing: list[LayerSpan]
    spans: list[tuple[str, int, int, float]] = field(default_factory=list)  # (peer id, start, end, throughput)

    @property
    def complete(self) -> bool:
        return not self.missing


class BlockRpc:
    """The four block RPCs of this daemon, registered once, each call handed to the server it is for: an
    open to the server of that model and range, a forward step, push or close to the server holding the session."""

    def __init__(self, servers: list[BlockServer], namespace: str) -> None:
        self.servers, self.names = servers, (*rpc_names(namespace), push_rpc_name(namespace))

    def handlers(self) -> dict[str, Any]:
        return dict(zip(self.names, (self.open, self.forward, self.close, self.push), strict=True))

    async def register(self, p2p: Any) -> None:
        for name, handler in self.handlers().items():
            await p2p.add_protobuf_handler(name, handler, runtime_pb2.ExpertRequest)

    async def unregister(self, p2p: Any) -> None:
        for name in self.names:
            try:
                await p2p.remove_protobuf_handler(name)
            except Exception as e:  # noqa: BLE001 - the daemon may be gone already
                logger.debug("removing handler %s: %s", name, e)

    def _ready(self) -> list[BlockServer]:
        return [s for s in self.servers if s.blocks is not None]

    async def open(self, request: Any, context: Any) -> Any:
        ready = self._ready()
        try:
            meta: OpenRequest = unpack(OpenRequest, request.metadata, "open request")
            chosen = next(
                (s for s in ready if s.config.model == meta.model and s.blocks is not None
                 and s.blocks.span.start <= meta.start and meta.end <= s.blocks.span.end),
                None,
            )  # fmt: skip
        except RecordError:
            chosen = None  # the first server answers "bad request" with the reason
        server = chosen or (ready[0] if ready else None)
        return await server.rpc_open(request, context) if server else _not_ready()

    async def forward(self, request: Any, context: Any) -> Any:
        server = self._holder(request)
        return await server.rpc_forward(request, context) if server else _not_ready()

    async def close(self, request: Any, context: Any) -> Any:
        server = self._holder(request)
        return await server.rpc_close(request, context) if server else _not_ready()

    async def push(self, request: Any, context: Any) -> Any:
        server = self._holder(request)
        return await server.rpc_push(request, context) if server else _not_ready()

    def _holder(self, request: Any) -> BlockServer | None:
        ready = self._ready()
        session = _session_of(request)
        return next((s for s in ready if session in s.sessions), ready[0] if ready else None)


def _session_of(request: Any) -> str | None:
    """The session id of a forward, push or close request (each carries it), or None."""
    import msgpack

    if len(request.metadata) > MAX_METADATA_BYTES:
        return None
    try:
        obj = msgpack.unpackb(request.metadata, raw=False)
    except Exception:  # noqa: BLE001 - garbage: the server answers "bad request"
        return None
    session = obj.get("session") if isinstance(obj, dict) else None
    return session if isinstance(session, str) else None


def _not_ready() -> Any:
    return runtime_pb2.ExpertResponse(
        metadata=pack(Reply(ok=False, error=ERROR_NOT_SERVED, detail="this peer's layers are still loading"))
    )


class ModelNames(Protocol):
    """How the daemon turns a model reference a user typed into the one every peer names it by, with its files
    on this machine (``mission:<prefix>`` -> ``mission:<full id>``, pulled on first use; the mission package's
    ``SwarmStudents`` is one). A protocol: inference knows nothing of missions."""

    async def resolve(self, text: str) -> str:
        """The reference every peer names ``text`` by, ready to load here; raises ``ModelRefError`` (unknown)
        or ``GardenError`` (its files could not be fetched)."""
        ...


class SameNames:
    """No names to resolve: a reference is what it says (a daemon without missions, tests)."""

    async def resolve(self, text: str) -> str:
        return text


RESOLVE_RETRY_S = 10.0
"""Seconds between tries to resolve a served model that is not published (or reachable) yet."""


@dataclass
class InferenceService(Service):
    """:param serving: the layer ranges this peer serves (``--serve``; none without the server role)
    :param governor: the owner's switch: while serving is paused, servers refuse new sessions as busy
    :param names: how a ``--serve`` or ``/v1`` model reference becomes the swarm's name for it"""

    swarm: Swarm
    keys: DHTKeys
    private_key: Any
    peer_id: str
    chain: ChainConfig = field(default_factory=ChainConfig)
    serving: list[ServeConfig] = field(default_factory=list)
    governor: Governor | None = None
    names: ModelNames = field(default_factory=SameNames)
    servers: list[BlockServer] = field(default_factory=list)
    rpc: BlockRpc | None = None
    invalid_records: Counter[str] = field(default_factory=Counter)
    name: str = "inference"
    _p2p: Any = None
    _generators: dict[str, SwarmGenerator] = field(default_factory=dict)
    _loading: dict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    @property
    def namespace(self) -> str:
        return self.keys.swarm

    @property
    def p2p(self) -> Any:
        if self._p2p is None:
            raise RuntimeError("the inference service is not started")
        return self._p2p

    async def start(self) -> None:
        self._p2p = await self.swarm.p2p()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve every configured range until ``stop``."""
        await asyncio.gather(*(self.serve(config, stop) for config in self.serving))

    async def close(self) -> None:
        await self.stop()

    def snapshot(self) -> list[ServerSnapshot]:
        """This peer's block servers, as ``/status`` shows them."""
        return [server.snapshot() for server in self.servers]

    def refusal(self) -> str | None:
        """Why servers refuse new sessions now, or None."""
        return "paused by its owner" if self.governor is not None and self.governor.serving_paused else None

    # --- serving -----------------------------------------------------------------------------------------
    async def serve(self, config: ServeConfig, stop: asyncio.Event) -> None:
        """Start a block server and run it until ``stop``; a failure is logged and shown in its view. A model
        named by a swarm name (``mission:<id>``) is resolved and pulled first, tried again until it is published."""
        server = BlockServer(self.p2p, self.swarm, self.keys, self.private_key, self.peer_id, config)
        server.refuse = self.refusal
        self.servers.append(server)
        if self.rpc is None:
            self.rpc = BlockRpc(self.servers, self.namespace)
            await self.rpc.register(self.p2p)
        while not stop.is_set():
            try:
                server.config = replace(config, model=await self.names.resolve(config.model))
                break
            except (ModelRefError, GardenError) as e:
                if server.error is None:
                    logger.warning("cannot serve %s yet (trying every %.0f s): %s", config.model, RESOLVE_RETRY_S, e)
                server.error = f"waiting: {e}"
            try:
                await asyncio.wait_for(stop.wait(), timeout=RESOLVE_RETRY_S)
            except TimeoutError:
                pass
        if stop.is_set():
            return
        server.error = None
        try:
            await server.start()
        except Exception as e:  # noqa: BLE001 - a bad model must not stop the daemon
            server.error = f"{type(e).__name__}: {e}"
            logger.error("cannot serve %s: %s", config.model, server.error)
            return
        await server.run(stop)

    def local_handlers(self) -> dict[str, Any]:
        """The RPC handlers, called directly by this daemon's own client (a peer cannot dial itself)."""
        return self.rpc.handlers() if self.rpc is not None else {}

    async def stop(self) -> None:
        if self.rpc is not None and self._p2p is not None:
            await self.rpc.unregister(self._p2p)
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)
        for generator in self._generators.values():
            generator.close()

    # --- generating --------------------------------------------------------------------------------------
    async def generator(self, model: str) -> SwarmGenerator:
        """The generator for ``model`` (loads its embeddings and head on first use; raises ``ModelRefError``).
        ``model`` is the swarm's name for it (see :meth:`resolve`)."""
        if model not in self._generators:
            async with self._loading[model]:
                if model not in self._generators:
                    ends = await asyncio.to_thread(Ends.load, model)
                    router = Router(self.swarm, self.keys, model)
                    self._generators[model] = SwarmGenerator(
                        self.p2p, router, ends, self.chain, self.namespace, self.local_handlers
                    )
        return self._generators[model]

    async def resolve(self, model: str) -> str:
        """The swarm's name for ``model`` (``mission:<prefix>`` -> ``mission:<full id>``), with its files here."""
        return await self.names.resolve(model)

    def routing(self) -> list[RoutingSnapshot]:
        """Per model this peer generated with: its measurements, spot checks and caught servers."""
        return [
            RoutingSnapshot(model, len(g.router.current()), dict(g.router.checks), dict(g.router.liars))
            for model, g in sorted(self._generators.items())
        ]

    async def coverage(self) -> list[ModelCoverage]:
        """Every model some server announces, with the layers no one serves."""
        found = await self.swarm.get(self.keys.models, latest=True)
        items = found.value.items() if found is not None and hasattr(found.value, "items") else []
        now = get_dht_time()
        by_model: dict[str, list[BlocksRecord]] = defaultdict(list)
        for subkey, item in items:
            try:
                raw, expiration_time = item
                record = BlocksRecord.from_wire(raw, subkey, index=True)
                check_fresh(record.announced_at, expiration_time, now)
            except (RecordError, TypeError, ValueError) as e:
                self.invalid_records["models"] += 1
                logger.warning("ignored an invalid models record under %r: %s", str(subkey)[:80], e)
                continue
            if expiration_time > now:
                by_model[record.model].append(record)
        result = []
        for model, records in sorted(by_model.items()):
            layers = Counter(r.num_layers for r in records).most_common(1)[0][0]
            same = [r for r in records if r.num_layers == layers]
            spans = sorted((r.peer_id, r.start, r.end, r.throughput) for r in same)
            result.append(
                ModelCoverage(model, layers, len({r.peer_id for r in same}), missing_spans(same, layers), spans)
            )
        return result
