"""The lead's countersignature on its missions' checkpoints (issue 16: vouched checkpoints).

Any key can publish a checkpoint record for any mission, so ``garden mission pull`` takes only *verified*
checkpoints: those whose files the mission's lead (or a peer the puller trusts with ``--trust-lead``) vouched
for. The lead's daemon does it here, for each mission it leads that trains a student, every period:

1. the newest checkpoint epoch it has not judged yet, no later than the mission's ``max_epochs``, is pulled
   like any checkpoint (every file against its sha256); when holders announce different files for that
   epoch, each distinct manifest is judged on its own;
2. the model is evaluated (``garden eval`` in a child process, so the event loop never waits on a forward
   pass; in the peer's one slot for heavy work, never beside a shard, and not while the owner paused the
   peer) on up to :data:`EVAL_ROWS` rows of the mission this peer holds (winning row sets, with the
   teacher's top-k): KL(teacher || student), NLL, top-1 agreement, preference accuracy. The epoch's distinct
   manifests, and the base student when it is the bar, are evaluated by one ``garden eval`` (importing the
   libraries is most of an evaluation's time: 9 of 13 CPU seconds for 16 rows); a model that cannot be
   evaluated is retried later, and when that one process fails as a whole each model is evaluated alone;
3. it is vouched for (:meth:`CheckpointSharing.vouch`) when that KL is not worse than the last vouched
   checkpoint's, or, for the first, than the base student's, by more than :data:`WORSE_BY` (relative) plus
   :data:`WORSE_SLACK`. Otherwise the log says why and the epoch stays unverified.

What the KL is measured on: the rows of the mission's held-out prompts (one in 16:
:func:`garden.protocol.rows.held_out`), which no trainer reads (``RowFeed(split="train")``), so the published
figures say how the student does on prompts it never learnt from. A mission too small to hold prompts out
(under 64 prompts), or whose lead holds no held-out row yet, is measured on its other rows, and its vouch says
so (``heldout_rows`` 0): then the KL only checks against a poisoned or broken checkpoint (it drifts away from
the teacher). Figures are compared on the same rows only: when the evaluation rows change (more rows arrived),
the base student is measured again on them and is the bar until the next vouch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from garden.errors import GardenError
from garden.host.governor import Governor
from garden.lifecycle import Service
from garden.mission.book import Mission, MissionBook
from garden.mission.checkpoints import CheckpointSharing
from garden.models.student import section_reference
from garden.protocol.checkpoints import CheckpointRecord
from garden.protocol.rows import DorpoRow, holds_out, preference_json_line
from garden.store import RowFeed, StoreError

logger = logging.getLogger(__name__)

EVAL_ROWS = 64
"""Rows the lead evaluates each checkpoint on: enough to see a poisoned model drift, cheap on a CPU."""
WORSE_BY = 0.10
"""Relative rise in KL past which a checkpoint counts as worse than the last vouched one."""
WORSE_SLACK = 0.02
"""Absolute KL allowance on top (a nearly perfect student's KL is near 0, where relative changes are noise)."""
EVAL_TIMEOUT = 900.0
"""Seconds ``garden eval`` may take per model it evaluates before it is stopped."""
QUIET_S = 30.0
"""Seconds the peer's heavy-work slot must have stayed free before a checkpoint is judged, by default (the
``vouch_quiet_s`` setting): judging (a model load, a forward pass) waits for a lull in shaking, so it never crowds
a peer that is loading, writing and serving (on 2 cores even a nice 19 evaluation beside that held the daemon's
event loop for a second)."""
FIGURES = ("kl", "nll", "top1", "pref_acc", "rows")
"""What a vouch carries of ``garden eval``'s report (a published student shows them), with ``base_kl`` and
``heldout_rows`` (how many of the ``rows`` measured are of held-out prompts: all of them, or 0 when the lead
held none yet)."""
EXIT_SOME_FAILED = 2
"""``garden eval``'s exit status when, of several students, some could not be evaluated (each says why)."""
JUDGED_AT_ONCE = 8
"""Distinct files of one epoch judged in one go (one ``garden eval``): any key may announce files for an epoch, so
one round of judging is bounded; the rest are judged in the next periods."""
RETRY_AFTER = 300.0
"""Seconds before a checkpoint whose judging failed (its pull, its evaluation) is tried again."""


@dataclass
class MissionVouching:
    """What this lead decided for one mission (in memory: after a restart, its vouches in the DHT tell it the
    last vouched KL, and epochs not vouched are judged again)."""

    judged: set[tuple[int, str]] = field(default_factory=set)  # (epoch, manifest sha256) evaluated
    failed: dict[tuple[int, str], float] = field(default_factory=dict)  # judging failed -> when (monotonic)
    rows_digest: str | None = None  # the evaluation rows base_kl and last_kl were measured on (sha256)
    base_kl: float | None = None
    last_kl: float | None = None  # the KL of the newest epoch vouched for: the bar for every later judgement
    last_epoch: int = -1
    refused: dict[int, str] = field(default_factory=dict)  # epoch -> why it was not vouched
    restored: bool = False  # the last vouched KL was read back from this lead's vouches, or is this run's own


class CheckpointVoucher(Service):
    """:param work_root: where evaluation rows and results are written (``<data dir>/vouching``)
    :param store_path: the peer's SQLite file (read through a read-only ``RowFeed``)"""

    name = "vouching"

    def __init__(
        self,
        book: MissionBook,
        sharing: CheckpointSharing,
        store_path: Path,
        work_root: Path,
        period: float = 30.0,
        compute: asyncio.Lock | None = None,
        governor: Governor | None = None,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.book, self.sharing, self.store_path, self.work_root, self.period = (
            book, sharing, store_path, work_root, period
        )  # fmt: skip
        self.quiet_s = quiet_s
        # the peer's one slot for heavy work (shared with shaking and verification), and the owner's pause and
        # idle-only mode: a checkpoint is judged when the machine has room for it, never beside a shard
        self.compute = compute or asyncio.Lock()
        self.governor = governor
        self._busy_at = time.monotonic()  # when the heavy-work slot was last seen taken (start-up counts)
        self.missions: dict[str, MissionVouching] = {}
        self.vouched = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.governor is not None:
                await self.governor.wait_until_free(stop)
            if self.compute.locked():
                self._busy_at = time.monotonic()
            quiet = time.monotonic() - self._busy_at >= self.quiet_s
            for mission in list(self.book.missions.values()) if quiet else []:
                if stop.is_set():
                    break
                if self.book.leads_here(mission) and not mission.cancelled:
                    try:
                        await self.tend(mission)
                    except (GardenError, OSError) as e:
                        logger.warning("vouching for mission %s: %s", mission.id[:12], e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
            except TimeoutError:
                pass

    async def tend(self, mission: Mission) -> None:
        """Judge the newest checkpoint of ``mission`` not judged yet (see the module docstring)."""
        state = self.missions.setdefault(mission.id, MissionVouching())
        catalog = await self.sharing.catalog(mission.id)
        max_epoch = mission.signed.spec.train.max_epochs
        mine = [v for v in catalog.vouches if v.peer_id == self.sharing.peer_id and "kl" in v.metrics]
        if mine and not state.restored:  # once: a bar dropped later (other evaluation rows) stays dropped
            newest = max(mine, key=lambda v: v.epoch)
            state.last_kl, state.last_epoch, state.restored = newest.metrics["kl"], newest.epoch, True
        vouched = {(v.epoch, v.manifest_sha256) for v in mine}
        todo = [
            r for r in catalog.records
            if r.epoch <= max_epoch and (r.epoch, r.manifest_sha256) not in vouched | state.judged
        ]  # fmt: skip
        if not todo:
            return
        newest = max(r.epoch for r in todo)
        batch: dict[tuple[int, str], CheckpointRecord] = {}
        for record in [r for r in todo if r.epoch == newest]:
            which = (record.epoch, record.manifest_sha256)
            if which in batch or time.monotonic() - state.failed.get(which, -RETRY_AFTER) < RETRY_AFTER:
                continue  # two holders of the same files, or it failed a moment ago
            batch[which] = record
            if len(batch) == JUDGED_AT_ONCE:
                break
        if batch:
            async with self.compute:
                await self._judge(mission, state, list(batch.values()))

    async def _judge(self, mission: Mission, state: MissionVouching, records: list[CheckpointRecord]) -> None:
        """Judge ``records`` (the distinct files announced for one epoch), evaluated in one ``garden eval`` with
        the base student when it is the bar: the libraries load once, which is most of an evaluation's time."""
        if state.rows_digest is None:  # after a restart: the rows the restored last KL was measured on
            state.rows_digest = await asyncio.to_thread(self._kept_digest, mission)
        chosen = await asyncio.to_thread(self._write_rows, mission)
        if chosen is None:
            return  # no rows here yet: judged once there are
        rows, count, heldout = chosen
        digest = await asyncio.to_thread(_sha256, rows)
        if digest != state.rows_digest:  # other rows: a KL measured on the old ones is no bar for the new
            if state.rows_digest is not None or state.last_kl is not None:
                logger.info("mission %s: checkpoints are now measured on %d rows (%d held out); the base student "
                            "is measured again on them", mission.id[:12], count, heldout)  # fmt: skip
            state.rows_digest, state.base_kl, state.last_kl, state.restored = digest, None, None, True
        pulled: list[tuple[CheckpointRecord, str, Path]] = []
        try:
            for record in records:
                name = f"epoch-{record.epoch}-{record.manifest_sha256}"
                # pulled aside (never listed nor announced by this peer), a flat transformers directory
                try:
                    path, _ = await self.sharing.pull(
                        mission.id, record.epoch, unverified=True, manifest=record.manifest_sha256,
                        into=self.work_root / mission.id / name,
                    )  # fmt: skip
                except (GardenError, OSError) as e:
                    if record.epoch < state.last_epoch:
                        self._give_up(mission, state, record, e)
                    else:
                        self._could_not_judge(mission, state, record, e)
                    continue
                pulled.append((record, name, path))
            if not pulled:
                return
            students = {name: str(path) for _, name, path in pulled}
            if state.base_kl is None:  # the student the trainers start from (a fresh LoRA adapter changes nothing)
                students = {"base": section_reference(mission.signed.spec.student), **students}
            figures = await self._evaluate(students, rows)
        finally:
            for _, _, path in pulled:
                await asyncio.to_thread(shutil.rmtree, path, True)
        if "base" in students:
            base = figures["base"]
            if isinstance(base, GardenError):  # no bar: none of them is judged
                for record, _, _ in pulled:
                    self._could_not_judge(mission, state, record, base)
                return
            state.base_kl = base["kl"]
        for record, name, _ in pulled:
            result = figures[name]
            if isinstance(result, GardenError):
                self._could_not_judge(mission, state, record, result)
            else:
                await self._decide(mission, state, record, result, heldout)

    async def _decide(
        self, mission: Mission, state: MissionVouching, record: CheckpointRecord, figures: dict[str, float],
        heldout: int,
    ) -> None:  # fmt: skip
        """Vouch for ``record``, evaluated to ``figures``, unless its KL is over the bar."""
        kl = figures["kl"]
        state.judged.add((record.epoch, record.manifest_sha256))
        reference = state.last_kl if state.last_kl is not None else state.base_kl
        assert reference is not None  # the base was measured on these rows, or a vouch was
        limit = reference * (1 + WORSE_BY) + WORSE_SLACK
        if not math.isfinite(kl) or kl > limit:
            why = f"KL {kl:.4f} on the mission's rows held here, over {limit:.4f} (the last vouched or base KL, +10 %)"
            state.refused[record.epoch] = why
            logger.warning("epoch %d of mission %s (from %s) is not vouched for: %s", record.epoch, mission.id[:12],
                           record.peer_id, why)  # fmt: skip
            return
        metrics = {**figures, "base_kl": state.base_kl, "heldout_rows": float(heldout)}
        try:
            await self.sharing.vouch(record, metrics)
        except (GardenError, OSError) as e:  # no DHT peer stored it: judged again later, not left unvouched
            state.judged.discard((record.epoch, record.manifest_sha256))
            self._could_not_judge(mission, state, record, e)
            return
        if record.epoch >= state.last_epoch:  # an older epoch judged late must not lower the bar
            state.last_kl, state.last_epoch = kl, record.epoch
        self.vouched += 1
        logger.info("vouched for epoch %d of mission %s (KL %.4f, base %.4f)", record.epoch, mission.id[:12], kl,
                    state.base_kl)  # fmt: skip

    @staticmethod
    def _could_not_judge(mission: Mission, state: MissionVouching, record: CheckpointRecord, e: Exception) -> None:
        """Note that judging ``record`` failed now (it is tried again after :data:`RETRY_AFTER`), and say why."""
        state.failed[(record.epoch, record.manifest_sha256)] = time.monotonic()
        logger.warning("could not judge epoch %d of mission %s (from %s), trying again in %.0f s: %s",
                       record.epoch, mission.id[:12], record.peer_id, RETRY_AFTER, e)  # fmt: skip

    @staticmethod
    def _give_up(mission: Mission, state: MissionVouching, record: CheckpointRecord, e: Exception) -> None:
        """An epoch older than one vouched for whose files could not be pulled is not tried again: its record
        stays in the DHT until its TTL, long after its holders moved on to newer epochs and dropped its files
        (the hostile test's lead retried three such pulls every 5 minutes). The newest epoch is always retried."""
        state.judged.add((record.epoch, record.manifest_sha256))
        logger.info("gave up judging epoch %d of mission %s (from %s): epoch %d is vouched for, and its files "
                    "could not be pulled: %s", record.epoch, mission.id[:12], record.peer_id, state.last_epoch,
                    e)  # fmt: skip

    def _write_rows(self, mission: Mission) -> tuple[Path, int, int] | None:
        """Up to :data:`EVAL_ROWS` of the mission's held-out rows held here (winning sets only), or, when there
        is none, of its other rows, as ``garden eval`` reads them; and how many rows, how many held out."""
        heldout = self._read_rows(mission, "heldout") if holds_out(mission.signed.body.prompts_count) else []
        rows = heldout or self._read_rows(mission, "all")
        if not rows:
            return None
        path = self._rows_path(mission)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(preference_json_line(r) for r in rows)
        if not path.exists() or path.read_text() != text:  # kept as it is: its digest is the figures' key
            path.write_text(text)
        return path, len(rows), len(heldout)

    def _read_rows(self, mission: Mission, split: Literal["heldout", "all"]) -> list[DorpoRow]:
        try:
            feed = RowFeed(self.store_path, mission.id, split=split)
        except StoreError:
            return []
        try:
            return [r for r in feed.new_rows(limit=10 * EVAL_ROWS) if r.k > 0][:EVAL_ROWS]
        finally:
            feed.close()

    def _rows_path(self, mission: Mission) -> Path:
        return self.work_root / mission.id / "rows.jsonl"

    def _kept_digest(self, mission: Mission) -> str | None:
        path = self._rows_path(mission)
        return _sha256(path) if path.exists() else None

    async def _evaluate(self, students: dict[str, str], rows: Path) -> dict[str, dict[str, float] | GardenError]:
        """KL(teacher || student), NLL, top-1 agreement and preference accuracy on ``rows`` (and the count of the
        rows measured) of each of ``students`` (name -> model reference), or why it could not be measured. One
        ``garden eval`` evaluates them all; when that process fails as a whole (a crash, the time limit: another
        peer's files may be made to do that), each is evaluated alone, so that no checkpoint stops the judging
        of the others."""
        if len(students) > 1:
            try:
                return await self._run_eval(students, rows)
            except GardenError as e:
                logger.warning("evaluating %d models in one process failed (%s): evaluating each alone",
                               len(students), e)  # fmt: skip
        results: dict[str, dict[str, float] | GardenError] = {}
        for name, student in students.items():
            try:
                results |= await self._run_eval({name: student}, rows)
            except GardenError as e:
                results[name] = e
        return results

    async def _run_eval(self, students: dict[str, str], rows: Path) -> dict[str, dict[str, float] | GardenError]:
        """``garden eval`` of ``students`` on ``rows`` in a child process (nice 19, idle I/O, one thread). Raises
        :class:`GardenError` when the process failed as a whole; a student it could not measure is its error."""
        out = rows.parent / ("eval.json" if len(students) > 1 else f"{next(iter(students))}.json")
        out.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # the lowest CPU and disk priority: judging yields to everything else on the machine, the daemon's event
        # loop included (on 2 cores, a model load at nice 10 still held the loop for a second)
        nice = [binary, "-n", "19"] if (binary := shutil.which("nice")) else []
        if nice and (idle_io := shutil.which("ionice")):
            nice = [idle_io, "-c", "3", *nice]
        what = ", ".join(students)
        refs = [arg for student in students.values() for arg in ("--student", student)]
        process = await asyncio.create_subprocess_exec(
            *nice, sys.executable, "-m", "garden", "eval", *refs, "--data", str(rows), "--json", "--out", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        limit = EVAL_TIMEOUT * len(students)
        try:
            _, err = await asyncio.wait_for(process.communicate(), timeout=limit)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise GardenError(f"garden eval of {what} took over {limit:.0f} s") from None
        except asyncio.CancelledError:  # the daemon stops: no child outlives it
            process.kill()
            await asyncio.shield(process.wait())
            raise
        failed = GardenError(f"garden eval of {what} failed: {err.decode(errors='replace')[-300:]}")
        if process.returncode != 0 and (len(students) == 1 or process.returncode != EXIT_SOME_FAILED):
            raise failed
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            raise failed from None
        reports = [report] if len(students) == 1 else report
        if not isinstance(reports, list) or len(reports) != len(students):
            raise failed
        results: dict[str, dict[str, float] | GardenError] = {}
        for (name, student), one in zip(students.items(), reports, strict=True):
            if not isinstance(one, dict) or one.get("student") != student:
                raise failed
            if "error" in one:
                results[name] = GardenError(f"garden eval of {name} failed: {str(one['error'])[-300:]}")
            elif not isinstance(one.get("kl"), int | float):
                results[name] = GardenError(f"garden eval of {name} gave no KL (rows without the teacher's log-probs?)")
            else:
                results[name] = {k: float(one[k]) for k in FIGURES if isinstance(one.get(k), int | float)}
        return results


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

