"""hivemind's DHT in a process of its own, for trainer workers (``garden.collab.worker``): hivemind's optimizer and
averagers want a ``hivemind.DHT``, and a worker has torch loaded anyway. The daemon runs its node on a thread
instead (``garden.net.dht_thread``)."""

from __future__ import annotations

import logging
import os
from typing import Any

import hivemind

from garden.lifecycle import watch_parent
from garden.net import p2pd_patch

logger = logging.getLogger(__name__)


class GardenDHT(hivemind.DHT):
    """hivemind's DHT process, which also dies with the process that started it (a trainer worker).

    hivemind's DHT child outlives a parent killed with SIGKILL (or the OOM killer), and keeps its
    ``p2pd`` running: an orphaned peer on a volunteer's machine, holding a port and an identity. Here
    a thread in the child watches its parent; when the parent is gone it terminates its own children
    (``p2pd``) and exits.

    It also leaves its parent's process group. Ctrl+C in a terminal signals the whole foreground
    group: ``p2pd`` would die at once, before the worker has stopped in order. Only the daemon should
    hear the terminal; it stops its children itself.
    """

    def __init__(
        self,
        *args: Any,
        p2pd_flags: dict[str, Any] | None = None,
        p2pd_env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.p2pd_flags = dict(p2pd_flags or {})  # before hivemind's __init__, which may start the process
        self.p2pd_env = dict(p2pd_env or {})
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        if self.p2pd_flags:  # relay limits, static relays (garden.net.reach): before hivemind starts p2pd
            p2pd_patch.install(self.p2pd_flags)
        os.environ.update(self.p2pd_env)  # this process's environment, which hivemind hands p2pd
        try:
            os.setpgid(0, 0)
        except OSError as e:  # e.g. a session leader; the watch below still ties us to the daemon
            logger.debug("DHT process stays in the daemon's process group: %s", e)
        watch_parent(self._parent_pid)
        super().run()
