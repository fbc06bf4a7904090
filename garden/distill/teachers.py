"""Several teachers, one shake: the first teacher that loads and answers a prompt is used for it.

A volunteer names teachers in order of preference (``garden shake --teacher big --teacher builtin:...``).
A teacher that cannot be loaded (a missing file, a hub id with no internet, a model that is not a causal
LM) is skipped for the whole run, with the reason recorded. For each batch of prompts, the prompts the
current teacher could not answer go on to the next teacher: the judge found no usable answer among its
samples, the prompt does not fit its context, or generating for the batch raised (a teacher with a
smaller context or less memory fails where the next one may not). Teachers are loaded lazily, when a
prompt first reaches them, so a fallback that is never needed costs nothing.

Each row names the teacher that produced it (``DorpoRow.teacher``) and that teacher's tokenizer
fingerprint (``DorpoRow.tokenizer``): a trainer whose student tokenizes differently skips the KL term
for those rows (hard labels) instead of reading another vocabulary's top-k ids.

Loaded teachers stay in memory until the process ends (``garden.models.loading.load_model`` caches them), so
list small fallbacks after big ones, not many big ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from garden.models.loading import LoadedModel, load_model
from garden.protocol.rows import DorpoRow, PromptRow
from garden.distill.judges import Judge
from garden.distill.shaker import ShakeCancelled, ShakeConfig, shake

logger = logging.getLogger(__name__)

JudgeFactory = Callable[[LoadedModel], Judge]
"""Builds the judge for one loaded teacher (the ``teacher`` judge grades with the teacher itself)."""


class NoTeacherError(ValueError):
    """None of the named teachers could be loaded; the message lists each one and why."""


@dataclass
class TeacherReport:
    """What one teacher did in a fallback shake.

    :param ref: the reference as the user gave it (rows name the resolved one: ``str(ModelRef)``, e.g. an
        absolute path)
    :param error: why the teacher was skipped for the whole run (it failed to load, or its judge could
        not be built); None when it loaded or was never needed
    :param loaded: the teacher was loaded (a prompt reached it)
    :param prompts: prompts handed to it (its share of each batch that reached it)
    :param rows: rows it produced
    :param passed_on: prompts it did not answer (handed to the next teacher, or dropped if it was the last)
    :param failed_batches: batches whose generation or judging raised; their prompts were passed on
    :param samples: candidate answers it generated
    """

    ref: str
    error: str | None = None
    loaded: bool = False
    prompts: int = 0
    rows: int = 0
    passed_on: int = 0
    failed_batches: int = 0
    samples: int = 0

    @property
    def usable(self) -> bool:
        return self.error is None


@dataclass
class FallbackShakeResult:
    """The rows of every teacher, in prompt-batch order; ``dropped`` holds the prompts no teacher answered,
    with each tried teacher's reason (``"ref: why; ref: why"``)."""

    rows: list[DorpoRow] = field(default_factory=list)
    dropped: list[tuple[PromptRow, str]] = field(default_factory=list)
    samples: int = 0
    teachers: list[TeacherReport] = field(default_factory=list)

    def rows_by_teacher(self) -> dict[str, int]:
        """Rows per teacher reference, every named teacher included (0 for those that produced none)."""
        return {report.ref: report.rows for report in self.teachers}


class _Teacher:
    """One named teacher: loaded (with its judge) on first use; once it fails to load it stays failed."""

    def __init__(self, ref: str, load: Callable[[str], LoadedModel], judge: Judge | JudgeFactory):
        self.report = TeacherReport(ref=ref)
        self._load, self._judge_spec = load, judge
        self._ready: tuple[LoadedModel, Judge] | None = None

    def ready(self) -> tuple[LoadedModel, Judge] | None:
        """The teacher and its judge, loaded and built on first use; None when it cannot be used."""
        if self.report.error is not None or self._ready is not None:
            return self._ready
        try:
            loaded = self._load(self.report.ref)
        # ModelRefError is a ValueError; transformers raises ValueError for malformed configs and OSError
        # for unreadable files: each means this teacher is unusable, not that the shake must stop
        except (ValueError, OSError) as e:
            self.report.error = f"cannot load: {e}"
            logger.warning("teacher %s skipped: %s", self.report.ref, e)
            return None
        try:
            judge = self._judge_spec if isinstance(self._judge_spec, Judge) else self._judge_spec(loaded)
        except ValueError as e:  # e.g. the teacher judge's verdict words are not single tokens of this teacher
            self.report.error = f"no judge for this teacher: {e}"
            logger.warning("teacher %s skipped: %s", self.report.ref, e)
            return None
        self._ready = (loaded, judge)
        self.report.loaded = True
        return self._ready


def shake_with_fallback(
    teachers: Sequence[str],
    prompts: Sequence[PromptRow],
    judge: Judge | JudgeFactory,
    config: ShakeConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
    load: Callable[[str], LoadedModel] = load_model,
) -> FallbackShakeResult:
    """Shake ``prompts`` with the first teacher in ``teachers`` that loads and answers each prompt.

    Batches are formed as :func:`~garden.distill.shaker.shake` forms them and seeded the same way
    (``seed + batch index``, for every teacher a batch reaches), so with one teacher, or when the first
    teacher answers everything, the rows are exactly those of ``shake(first teacher, ...)``.

    :param teachers: model references, in order of preference; at least one
    :param judge: one judge for every teacher, or a factory called once per loaded teacher (needed for
        the ``teacher`` judge, which grades with the teacher itself)
    :param on_batch: called with a batch's prompt count once every teacher it needed has seen it
    :param load: loads a reference (``garden.models.loading.load_model``; a wrapper may report progress)
    :raises NoTeacherError: when prompts remain and no named teacher can be loaded
    """
    if not teachers:
        raise ValueError("name at least one teacher")
    config = config or ShakeConfig()
    named = [_Teacher(ref, load, judge) for ref in teachers]
    result = FallbackShakeResult(teachers=[t.report for t in named])
    for index, start in enumerate(range(0, len(prompts), config.batch_prompts)):
        batch = list(prompts[start : start + config.batch_prompts])
        # the same seed as shake() gives this batch, although each call below sees it as batch 0
        batch_config = dataclasses.replace(config, seed=config.seed + index)
        pending = batch
        # keyed by object: shake() hands back the very PromptRow objects it drops, and two prompts may be equal
        reasons: dict[int, list[str]] = {id(p): [] for p in batch}
        for teacher in named:
            if not pending:
                break
            usable = teacher.ready()
            if usable is None:
                continue
            loaded, teacher_judge = usable
            report = teacher.report
            report.prompts += len(pending)
            try:
                shaken = shake(loaded, pending, teacher_judge, batch_config)
            except ShakeCancelled:  # not the teacher's failure: the whole shake stops
                raise
            # any failure of one teacher on one batch (out of memory, a judge error, a model bug) passes
            # the batch on; it is logged and counted, and each prompt's drop reason names it
            except Exception as e:
                logger.warning("teacher %s failed on a batch of %d prompts: %r", report.ref, len(pending), e)
                report.failed_batches += 1
                report.passed_on += len(pending)
                for prompt in pending:
                    reasons[id(prompt)].append(f"{report.ref}: {type(e).__name__}: {e}")
                continue
            report.rows += len(shaken.rows)
            report.samples += shaken.samples
            report.passed_on += len(shaken.dropped)
            result.rows.extend(shaken.rows)
            result.samples += shaken.samples
            for prompt, why in shaken.dropped:
                reasons[id(prompt)].append(f"{report.ref}: {why}")
            pending = [prompt for prompt, _ in shaken.dropped]
        if pending and not any(t.report.loaded for t in named):
            raise NoTeacherError(
                "no teacher could be used: "
                + "; ".join(f"{t.report.ref}: {t.report.error}" for t in named)
                + " (check each --teacher reference: builtin:NAME, a hub id, a model directory or a .gguf file)"
            )
        for prompt in pending:
            result.dropped.append((prompt, "; ".join(reasons[id(prompt)]) or "no usable teacher"))
        if on_batch is not None:
            on_batch(len(batch))
    return result
