"""The daemon's teachers load and sample in a process of their own, never in the event loop's process.

Why a process and not a thread: loading a teacher and sampling with it hold the GIL in single calls that
last long (measured with ``py-spy --gil`` on two cores: parsing a 2 MB ``tokenizer.json``, 170 ms; building the
Rust tokenizer, 100 ms; first imports of the model's modules, more). No switch interval or thread priority
breaks such a call, so in a thread they held the daemon's event loop (the HTTP port, Pause, lease renewals)
past 250 ms. In a child they cost the loop nothing.

One child per daemon, started on the first shard and kept: teachers stay loaded there between shards (the
child is the only holder of a teacher's weights) until :class:`~garden.mission.shaking.MissionWork` unloads
them when idle. It exits with the daemon (:func:`garden.lifecycle.watch_parent`) and is started again after
a crash (an out-of-memory kill): the shard that was sampling fails with a clear reason and is given back.

Control: one byte of shared memory, :data:`RUN`, :data:`HOLD` or :data:`STOP`, which the child reads before
every decoding step (``ShakeConfig.cancelled``). The parent's waiting thread sets it a few times a second from
the lease, the daemon's stop and the governor (Pause, idle-only mode, the ``--max-cpu`` share, which counts
the child: it is part of the daemon's process tree).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from garden.protocol.mission_spec import MissionSpec
from garden.protocol.rows import DorpoRow, PromptRow

logger = logging.getLogger(__name__)

RUN, HOLD, STOP = 0, 1, 2
POLL = 0.05
"""Seconds between the parent's looks at the control (the lease, the governor) while the child works."""


class SamplerCrashed(RuntimeError):
    """The sampling process died while it worked (killed, out of memory); it is started again next time."""


@dataclass(frozen=True)
class SamplerSetup:
    """What the child needs to work as the daemon would: torch's thread cap (``--max-threads``) and its
    nice level. The model directories (``--data-dir``) and offline mode come through the environment, which
    a spawned child inherits."""

    threads: int | None = None
    niceness: int = 10


@dataclass(frozen=True)
class ShardJob:
    """One shard to sample: :func:`shake_shard`'s arguments, without its callables
    (the child builds ``cancelled`` from the control byte, and ``prompt_seeds`` from ``mission_id``)."""

    spec: MissionSpec
    prompts: list[PromptRow]
    mission_id: str
    batch_prompts: int
    max_memory: int | None


@dataclass(frozen=True)
class VerifyJob:
    """Rows of one teacher to check (:func:`garden.distill.verify.verify_rows`): ``prompts[i]`` is the prompt
    ``rows[i]`` answers; the mission's judge is re-run when its verdicts are deterministic."""

    spec: MissionSpec
    teacher: str
    rows: list[DorpoRow]
    prompts: list[PromptRow]


class SamplingProcess:
    """The parent's handle on the child. Its calls block (run them in a thread) and run one at a time.

    :ivar loaded: the model references the child holds, as of its last answer
    """

    def __init__(self, setup: SamplerSetup | None = None) -> None:
        self.setup = setup or SamplerSetup()
        self.loaded: frozenset[str] = frozenset()
        self.starts = 0
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._control: Any = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def load(self, ref: str) -> None:
        """Load ``ref`` in the child (kept there); raises what ``load_model`` raises."""
        self._call("load", ref)

    def unload(self, ref: str) -> bool:
        """Let the child drop ``ref``'s weights; True if it held them. A child that is not running holds none."""
        if self.pid is None:
            return False
        return bool(self._call("unload", ref))

    def shake(self, job: ShardJob, control: Callable[[], int]) -> Any:
        """Sample a shard in the child; ``control()`` is asked every :data:`POLL` seconds for :data:`RUN`,
        :data:`HOLD` or :data:`STOP`. Returns a ``FallbackShakeResult``; raises ``ShakeCancelled`` when stopped,
        ``NoTeacherError`` when no teacher loads, :class:`SamplerCrashed` when the child died."""
        return self._call("shake", job, control=control)

    def verify(self, job: VerifyJob) -> list[Any]:
        """Check rows in the child (the teacher loaded there, kept); returns a ``RowCheck`` per row."""
        return list(self._call("verify", job))

    def close(self) -> None:
        """Stop the child (its models' memory goes back to the machine) without waiting for its work: a call
        in flight ends with :class:`SamplerCrashed`, and later calls are refused."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def _call(self, op: str, *args: Any, control: Callable[[], int] | None = None) -> Any:
        with self._lock:
            if self._closed:
                raise SamplerCrashed("the sampling process is closed (the daemon is stopping)")
            if self._proc is None or not self._proc.is_alive():
                self._start()
            assert self._conn is not None and self._control is not None
            self._control.value = RUN
            try:
                self._conn.send((op, args))
                while not self._conn.poll(POLL):
                    if not self._proc.is_alive():
                        raise EOFError
                    if control is not None:
                        self._control.value = control()
                status, value, loaded = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                code = self._proc.exitcode if self._proc is not None else None
                self._stop_child()
                raise SamplerCrashed(
                    f"the sampling process died while it worked on {op!r} (exit code {code}; killed for memory?)"
                ) from None
            self.loaded = frozenset(loaded)
        if status == "error":
            raise value
        return value

    def _start(self) -> None:
        self._stop_child()
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads and torch
        parent, child = context.Pipe()
        self._control = context.Value("b", RUN, lock=False)
        self._proc = context.Process(
            target=_child_main, args=(child, self._control, self.setup, os.getpid()), name="garden-sampler",
            daemon=True,  # ended by multiprocessing at the daemon's exit, should close() not have run
        )
        self._proc.start()
        child.close()
        self._conn = parent
        self.loaded = frozenset()
        self.starts += 1
        logger.info("started the sampling process (pid %d)", self._proc.pid)

    def _stop_child(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(timeout=5)
            self._proc = None
        self.loaded = frozenset()


# --- the child ----------------------------------------------------------------------------------------------


def _child_main(conn: Connection, control: Any, setup: SamplerSetup, parent_pid: int) -> None:
    from garden.lifecycle import watch_parent

    watch_parent(parent_pid)
    try:
        os.nice(setup.niceness)  # the owner's programs, and the daemon's own loop, go first
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s garden-sampler %(name)s: %(message)s")
    if setup.threads:
        import torch

        torch.set_num_threads(setup.threads)
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the daemon closed its end: stop
            return
        try:
            answer: tuple[str, Any] = ("ok", _OPS[op](control, *args))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the daemon, which decides
            answer = ("error", e)
        try:
            conn.send((*answer, _loaded_refs()))
        except Exception as e:  # an exception that does not pickle: send its words instead
            conn.send(("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]} ({e})"), _loaded_refs()))


def _loaded_refs() -> list[str]:
    from garden.models.loading import loaded_refs

    return loaded_refs()


def _load(control: Any, ref: str) -> None:
    from garden.models.loading import load_model

    load_model(ref)


def _unload(control: Any, ref: str) -> bool:
    from garden.models.loading import unload_model

    return unload_model(ref)


def _shake(control: Any, job: ShardJob) -> Any:
    import functools

    from garden.distill.shaker import ShakeConfig
    from garden.protocol.mission import prompt_seed

    def cancelled() -> bool:
        while control.value == HOLD:
            time.sleep(POLL)
        return bool(control.value == STOP)

    sampling = job.spec.sampling
    config = ShakeConfig(
        candidates=sampling.candidates, temperature=sampling.temperature, top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens, top_k_logprobs=sampling.top_k_logprobs,
        batch_prompts=job.batch_prompts, prompt_seeds=functools.partial(prompt_seed, job.mission_id),
        cancelled=cancelled,
    )  # fmt: skip
    return shake_shard(job.spec, job.prompts, config, job.max_memory)


def shake_shard(spec: MissionSpec, prompts: list[PromptRow], config: Any, max_memory: int | None) -> Any:
    """One shard: the judge is built here too (a teacher judge may load a grading model, after the same memory
    check as a teacher; a format judge starts its process) and let go of when the shard ends."""
    from garden.distill.judges import Judge, build_judge
    from garden.distill.teachers import NoTeacherError, shake_with_fallback
    from garden.host.memory import memory_shortfall
    from garden.models.loading import is_loaded, model_memory_bytes

    grader = getattr(spec.judge, "model", None)
    if grader is not None and not is_loaded(grader):
        need = model_memory_bytes(grader)
        shortfall = None if need is None else memory_shortfall(need, max_memory)
        if shortfall is not None:
            raise NoTeacherError(f"cannot hold the grading model {grader}: it needs {shortfall}")
    judge = build_judge(spec.judge)
    try:
        return shake_with_fallback(spec.teachers, prompts, judge, config)
    finally:
        if isinstance(judge, Judge):
            judge.close()


def _verify(control: Any, job: VerifyJob) -> list[Any]:
    from garden.distill.judges import Judge, build_judge
    from garden.distill.verify import DETERMINISTIC_JUDGES, verify_rows
    from garden.models.loading import load_model

    teacher = load_model(job.teacher)
    judge = build_judge(job.spec.judge) if job.spec.judge.kind in DETERMINISTIC_JUDGES else None
    try:
        return verify_rows(teacher, job.rows, job.prompts, judge if isinstance(judge, Judge) else None)
    finally:
        if isinstance(judge, Judge):
            judge.close()


_OPS: dict[str, Callable[..., Any]] = {"load": _load, "unload": _unload, "shake": _shake, "verify": _verify}
