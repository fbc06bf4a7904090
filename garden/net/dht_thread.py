"""hivemind's DHT node on a thread of the daemon, not in a process of its own.

``hivemind.DHT`` forks a process for its node and talks to it through a pipe and ``MPFuture`` (shared memory that
torch provides). That process held a second copy of everything the daemon had touched, and torch in both: 220 MB
of an idle daemon's 370 (``benchmarks/startup.py``). :class:`ThreadDHT` runs the same node (``DHTNode``, the same
validators, the same p2pd) on a thread with an event loop of its own, so an idle daemon never imports torch
(``garden.DEFERRED_PACKAGES``), and offers the part of ``hivemind.DHT``'s interface that garden uses (``get``,
``store``, ``run_coroutine``, ``peer_id``, ``get_visible_maddrs``, ``replicate_p2p``, ``shutdown``).

Why a thread and not the daemon's own event loop: the node answers other peers' requests and renews its
routing table on its own schedule, and nothing the daemon does on its loop (a slow HTTP handler, a burst of
records to check) should make it late. Requests cross between the loops with ``run_coroutine_threadsafe``.

The node's p2pd is the daemon's child: ``garden.net.p2pd_patch.launch`` ties it to the daemon, so it never
outlives a killed one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from garden.net import p2pd_patch

logger = logging.getLogger(__name__)

T = TypeVar("T")
NODE_STOP_TIMEOUT = 3.0
"""Seconds the node gets to stop in order (its handlers removed from p2pd, then p2pd stopped). A node whose p2pd
died waits on p2pd's socket for ever: then p2pd is killed, if it still runs, and the thread ends."""
SHUTDOWN_TIMEOUT = NODE_STOP_TIMEOUT + 5.0
"""Seconds :meth:`ThreadDHT.shutdown` waits for the node's thread to end."""
SEARCH_BEAM = 10
"""How many of a key's nearest nodes a read or a store searches for (hivemind's ``beam_size``), where hivemind
takes its bucket size, 20. A record lives on the ``num_replicas`` (5) nodes nearest its key that its writer found,
and hivemind's own advice is a beam of two to five times the nodes sought. Every node a search visits answers with
the key's whole value (every peer record, every open mission), and a ``latest`` read waits for the whole beam: at
50 peers with 100 open missions, 10 instead of 20 took an idle peer's DHT work from 2.0 to 1.3 CPU s and from 9.6 to
6.3 MB a minute, and its reads' p99 from 1.9-2.6 s to 0.6-0.9 s (``benchmarks/scale.py``, docs/architecture.md)."""


class DHTFuture(concurrent.futures.Future[T]):  # type: ignore[type-var]
    """A request's result, as ``hivemind.DHT``'s ``return_future=True`` gives it: ``result()`` from any thread,
    or ``await`` on any event loop."""

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()


class ThreadDHT:
    """A DHT node on its own thread. ``start`` blocks until the node has joined (or raises what stopped it).

    :param initial_peers: multiaddrs of peers to join through (none: a new swarm)
    :param record_validators: as ``hivemind.DHT``'s, combined the same way
    :param p2pd_flags: p2pd command-line flags hivemind has no option for (``garden.net.p2pd_patch``)
    :param p2pd_env: added to p2pd's environment
    :param kwargs: for ``DHTNode.create`` and ``hivemind.P2P.create`` (``host_maddrs``, ``client_mode``, ...)
    """

    def __init__(
        self,
        initial_peers: Sequence[str] | None = None,
        *,
        record_validators: Iterable[RecordValidatorBase] = (),
        p2pd_flags: dict[str, Any] | None = None,
        p2pd_env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.initial_peers = list(initial_peers or [])
        self.validator = CompositeValidator(list(record_validators))
        self.p2pd_flags, self.p2pd_env, self.kwargs = dict(p2pd_flags or {}), dict(p2pd_env or {}), kwargs
        self._node: DHTNode | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, name="garden-dht", daemon=True)
        self.error: BaseException | None = None  # what stopped the node, if it stopped by itself

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the node and wait until it has joined; raises its error (a bad join address, p2pd failing)."""
        self._thread.start()
        try:
            self._ready.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self.shutdown()
            raise TimeoutError(f"the DHT node did not start in {timeout} s") from None

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's: hivemind's code asks for "the" loop here and there
        try:
            loop.run_until_complete(self._run())
        except BaseException as e:  # noqa: BLE001 - whatever stopped the node is reported, never lost
            self.error = e
            if not self._ready.done():
                self._ready.set_exception(e)
            else:
                logger.exception("the DHT node stopped")
        finally:
            try:  # what the node left running (its periodic refreshes), stopped as asyncio.run stops it
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                if left:
                    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        with p2pd_patch.launch(self.p2pd_flags, self.p2pd_env):
            node = await DHTNode.create(
                initial_peers=self.initial_peers or None, record_validator=self.validator, **self.kwargs
            )
        self._node = node
        self._ready.set_result(None)
        try:
            await self._stop.wait()
        finally:
            try:
                await asyncio.wait_for(node.shutdown(), NODE_STOP_TIMEOUT)  # leaves the swarm and stops p2pd
            except Exception as e:  # noqa: BLE001 - a dead p2pd, typically: nothing left to stop in order
                logger.info("the DHT node did not stop in order (%s): stopping its p2pd", type(e).__name__)
                child = _p2pd(node)
                if child is not None and child.returncode is None:
                    child.kill()

    def shutdown(self) -> None:
        """Stop the node and its p2pd; returns once they have stopped (or after :data:`SHUTDOWN_TIMEOUT`)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(SHUTDOWN_TIMEOUT)
            if self._thread.is_alive():
                logger.warning("the DHT node did not stop within %.0f s", SHUTDOWN_TIMEOUT)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._node is not None and self.error is None

    @property
    def p2pd_pid(self) -> int | None:
        """The node's p2pd (a child of this process), while it runs."""
        child = _p2pd(self._node) if self._node is not None else None
        return getattr(child, "pid", None)

    # --- hivemind.DHT's interface ------------------------------------------------------------------------
    def run_coroutine(self, coro: Callable[[ThreadDHT, DHTNode], Awaitable[T]], return_future: bool = False) -> Any:
        """Run ``coro(self, node)`` on the node's loop; its result, or a :class:`DHTFuture` of it."""
        node, loop = self._node, self._loop
        if node is None or loop is None or not self._thread.is_alive():
            raise RuntimeError("the DHT node is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("ThreadDHT's interface is for other threads; on the node's loop, use the node")
        future: DHTFuture[T] = DHTFuture()
        inner = asyncio.run_coroutine_threadsafe(_awaited(coro(self, node)), loop)
        _chain(inner, future)
        return future if return_future else future.result()

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any) -> Any:
        """As ``hivemind.DHT.get``; the search's beam is :data:`SEARCH_BEAM` unless ``beam_size`` is given."""
        kwargs.setdefault("beam_size", SEARCH_BEAM)
        return self.run_coroutine(lambda _, node: node.get(key, latest=latest, **kwargs), return_future)

    def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None, return_future: bool = False,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        """As ``hivemind.DHT.store``; the search for the key's nearest nodes has the beam of :meth:`get`."""
        kwargs.setdefault("beam_size", SEARCH_BEAM)
        return self.run_coroutine(
            lambda _, node: node.store(key, value, expiration_time, subkey=subkey, **kwargs), return_future
        )

    @property
    def peer_id(self) -> PeerID:
        if self._node is None:
            raise RuntimeError("the DHT node is not running")
        return self._node.peer_id

    def get_visible_maddrs(self, latest: bool = False) -> list[Multiaddr]:
        return self.run_coroutine(lambda _, node: node.get_visible_maddrs(latest=latest))

    async def replicate_p2p(self) -> P2P:
        """A client of the node's p2pd for the calling loop (hivemind's P2P objects belong to one loop)."""
        listen = self.run_coroutine(lambda _, node: _listen_maddr(node))
        return await P2P.replicate(listen)


def _p2pd(node: DHTNode) -> Any:
    """The node's p2pd process (``asyncio.subprocess.Process``), which hivemind keeps in a private attribute."""
    return getattr(node.p2p, "_child", None)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _listen_maddr(node: DHTNode) -> Multiaddr:
    return node.p2p.daemon_listen_maddr


def _chain(inner: concurrent.futures.Future[T], outer: DHTFuture[T]) -> None:
    """``outer`` gets ``inner``'s outcome; cancelling ``outer`` (a caller's timeout) cancels the request."""

    def done(f: concurrent.futures.Future[T]) -> None:
        try:
            if f.cancelled():
                outer.cancel()
            elif f.exception() is not None:
                outer.set_exception(f.exception())
            else:
                outer.set_result(f.result())
        except concurrent.futures.InvalidStateError:  # the caller cancelled it meanwhile
            pass

    inner.add_done_callback(done)
    outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
