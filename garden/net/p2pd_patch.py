"""The one change garden makes to hivemind below the training level: how the p2p daemon is started, where
``hivemind.P2P.create`` has no option for it.

Reachability (``garden.net.reach``) needs two of p2pd's flags that hivemind does not pass: the relay service's
limits (``-relayMaxCircuits``, ``-relayMaxReservations``, ``-relayDataLimit``, ``-relayTimeLimit``), and
``-relayDiscovery=0`` (static relays only: with discovery on, libp2p's relay finder waits for four candidate
relays, or three minutes, before it reserves a slot on the one or two a home peer knows). hivemind builds p2pd's
command line in ``P2P._make_process_args``; :func:`install` wraps it to add :data:`FLAGS`.

Every other hivemind patch lives in ``garden.collab.hivemind_patches``, which this level may not import; this
one is fenced the same way, by the release it was written for (:data:`TESTED_HIVEMIND`, which the collab
patches share), and ``tests/collab/test_hivemind_patches.py`` checks that what it replaces is still there.
It runs around the start of the daemon's DHT node (:func:`launch`, ``garden.net.dht_thread``), in a trainer's DHT
process (``GardenDHT.run``), and around the relay probe's two throwaway daemons (:func:`extra_flags`,
``garden.net.relay_probe``): no other P2P (the reach check's, a test's) gets the flags.

The daemon's own p2pd is its direct child (its DHT node runs on a thread, not in a process of its own), so
:func:`launch` also ties that p2pd to the daemon: the kernel stops it when the daemon dies, even by ``kill -9``
(``PR_SET_PDEATHSIG``, Linux), and it runs in a process group of its own, so that Ctrl+C in a terminal reaches
only the daemon, which then says goodbye to the swarm before it stops p2pd. hivemind starts p2pd with
``asyncio.subprocess.create_subprocess_exec``; :func:`launch` hands that call the extra arguments, through a
stand-in for the ``asyncio`` name of ``hivemind.p2p.p2p_daemon`` that changes nothing else.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

TESTED_HIVEMIND = "1.1.12"
"""The hivemind release garden's patches of its internals were written for and tested with (the pin)."""
PATCHED: tuple[tuple[str, str], ...] = (
    ("hivemind.p2p.p2p_daemon:P2P", "_make_process_args"),
    ("hivemind.p2p.p2p_daemon", "asyncio"),
)
FLAGS: dict[str, Any] = {}
"""What :func:`install` adds to every p2pd command line of this process (``-name=value``)."""
_installed = False


def install(flags: dict[str, Any]) -> None:
    """Add ``flags`` to the p2pd this process starts next; raises ``RuntimeError`` on another hivemind release."""
    global _installed
    import hivemind
    from hivemind.p2p import P2P

    found = getattr(hivemind, "__version__", "unknown")
    if found != TESTED_HIVEMIND:
        raise RuntimeError(
            f"garden's p2p daemon flags (garden.net.p2pd_patch) were written for hivemind {TESTED_HIVEMIND}, but "
            f"hivemind {found} is installed; install hivemind=={TESTED_HIVEMIND}"
        )
    FLAGS.update(flags)
    if _installed:
        return
    make_args = P2P._make_process_args

    def with_flags(*args: Any, **kwargs: Any) -> list[str]:
        return make_args(*args, **{**kwargs, **FLAGS})

    P2P._make_process_args = staticmethod(with_flags)  # type: ignore[method-assign]
    _installed = True


@contextmanager
def extra_flags(flags: dict[str, Any]) -> Iterator[None]:
    """Add ``flags`` to the p2p daemons this process starts inside the block only, then put back what was there
    (a process that forks the DHT afterwards must not hand it these)."""
    before = dict(FLAGS)
    install(flags)
    try:
        yield
    finally:
        FLAGS.clear()
        FLAGS.update(before)


@dataclass
class Launch:
    """How :func:`launch` starts the p2pd of the block: ``env`` added to its environment, in a process group of its
    own, stopped by the kernel when the thread that started it ends."""

    env: dict[str, str] = field(default_factory=dict)


LAUNCH: Launch | None = None
PR_SET_PDEATHSIG = 1


@contextmanager
def launch(flags: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[None]:
    """Start the p2pd of the block with ``flags``, ``env`` and tied to this process (see the module docstring).

    Not for two threads at once: the swarm's DHT node starts while the daemon waits for it (``garden.net.swarm``)."""
    global LAUNCH
    import hivemind.p2p.p2p_daemon as p2p_daemon

    if not isinstance(p2p_daemon.asyncio, _AsyncioForP2PD):
        p2p_daemon.asyncio = _AsyncioForP2PD()  # type: ignore[assignment]
    before = LAUNCH
    LAUNCH = Launch(dict(env or {}))
    try:
        with extra_flags(flags):
            yield
    finally:
        LAUNCH = before


class _SubprocessForP2PD:
    """``asyncio.subprocess`` as hivemind's p2p module sees it: inside :func:`launch`, p2pd starts with its
    arguments; otherwise, and for every other name, the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio.subprocess, name)

    @staticmethod
    async def create_subprocess_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        how = LAUNCH
        if how is not None:
            kwargs["env"] = {**(kwargs.get("env") or os.environ), **how.env}
            kwargs["process_group"] = 0
            kwargs["preexec_fn"] = _die_with(os.getpid())
        return await asyncio.subprocess.create_subprocess_exec(*args, **kwargs)


class _AsyncioForP2PD:
    """``asyncio`` as hivemind's p2p module sees it: the real one, but for :class:`_SubprocessForP2PD`."""

    subprocess = _SubprocessForP2PD()

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def _die_with(parent: int) -> Any:
    """A ``preexec_fn`` that asks the kernel for SIGTERM when the starting thread ends (None off Linux). It runs
    in the forked child before p2pd: it only calls ``prctl`` (the library is looked up here, before the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def tie() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the daemon died between the fork and prctl: nobody would stop this p2pd
            os._exit(1)

    return tie
