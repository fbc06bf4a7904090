"""Starts the Gardener's services in order, runs them, and stops them in the reverse order, each step bounded.

hivemind's servers and Petals' ``ModuleContainer`` keep a hand-written list of what to start and a second one
of what to stop, and the two drift apart. Here the order is written once: the list the Gardener hands over.
A service whose ``run`` fails is logged (the others go on: a broken model server must not stop a peer's
missions); a ``start`` that fails undoes the services already started and re-raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from garden.lifecycle import Service

logger = logging.getLogger(__name__)

RUN_STOP_TIMEOUT = 3.0
"""Seconds each service's ``run`` may take to return once the stop event is set; then it is cancelled."""
CLOSE_TIMEOUT = 10.0
"""Seconds each service's ``close`` may take (the trainer workers get 5 s to finish their step)."""


class Supervisor:
    def __init__(self, services: Sequence[Service]):
        self.services = list(services)
        self.stop_event = asyncio.Event()
        self._started: list[Service] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Start every service in order, then their ``run`` loops; on a failure, close what started and raise."""
        try:
            for service in self.services:
                await service.start()
                self._started.append(service)
        except BaseException:
            await self._close_started()
            raise
        for service in self.services:
            self._tasks[service.name] = asyncio.create_task(self._run(service), name=f"garden-{service.name}")

    async def _run(self, service: Service) -> None:
        try:
            await service.run(self.stop_event)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the %s service failed; the peer goes on without it", service.name)

    async def stop(self) -> None:
        """Set the stop event, wait for every ``run`` (bounded), then close in the reverse order. Idempotent."""
        self.stop_event.set()
        for name, task in list(self._tasks.items()):
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=RUN_STOP_TIMEOUT)
            except TimeoutError:
                logger.info("the %s service did not stop within %.0f s; cancelled", name, RUN_STOP_TIMEOUT)
                task.cancel()
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        await self._close_started()

    async def _close_started(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                await asyncio.wait_for(service.close(), timeout=CLOSE_TIMEOUT)
            except TimeoutError:
                logger.warning("closing the %s service took over %.0f s; going on", service.name, CLOSE_TIMEOUT)
            except Exception:
                logger.exception("closing the %s service failed", service.name)
