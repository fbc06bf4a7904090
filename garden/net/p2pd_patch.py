"""The one change garden makes to hivemind below the training level: flags for the p2p daemon that
``hivemind.P2P.create`` has no option for.

Reachability (``garden.net.reach``) needs two of p2pd's flags that hivemind does not pass: the relay service's
limits (``-relayMaxCircuits``, ``-relayMaxReservations``, ``-relayDataLimit``, ``-relayTimeLimit``), and
``-relayDiscovery=0`` (static relays only: with discovery on, libp2p's relay finder waits for four candidate
relays, or three minutes, before it reserves a slot on the one or two a home peer knows). hivemind builds p2pd's
command line in ``P2P._make_process_args``; :func:`install` wraps it to add :data:`FLAGS`.

Every other hivemind patch lives in ``garden.collab.hivemind_patches``, which this level may not import; this
one is fenced the same way, by the release it was written for (:data:`TESTED_HIVEMIND`, which the collab
patches share), and ``tests/collab/test_hivemind_patches.py`` checks that what it replaces is still there.
It runs in the DHT process (``GardenDHT.run``), before that process starts its p2pd, and around the relay
probe's two throwaway daemons (:func:`extra_flags`, ``garden.net.relay_probe``): no other P2P (a trainer's, the
reach check's, a test's) gets the flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TESTED_HIVEMIND = "1.1.12"
"""The hivemind release garden's patches of its internals were written for and tested with (the pin)."""
PATCHED: tuple[tuple[str, str], ...] = (("hivemind.p2p.p2p_daemon:P2P", "_make_process_args"),)
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
