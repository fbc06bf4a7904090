"""Format judges of a mission run in a child process, with a time and a memory limit.

A mission's judge is code configured by a stranger. RE2 keeps a ``regex`` judge linear, and a
``json_schema`` judge refers only to itself, but JSON Schema validation can still be slow by
construction: nested ``anyOf``/``oneOf`` and its own ``pattern`` keywords, which jsonschema runs through
Python's backtracking ``re``. Pure-Python work like that holds the GIL, so in the daemon's process it
would freeze the HTTP port, Pause and lease renewals with it. In a child process it freezes only the
child: past ``timeout`` seconds for one batch of answers (or past ``memory`` bytes) the child is killed
and the shard fails with :class:`JudgeLimitError`, which says so.

The child (``python -m garden.distill.judge_sandbox``) speaks JSON lines on its stdin and stdout: first
the judge (``{"kind", "options"}``, answered ``{"ok": true}`` or ``{"error"}``), then one line per batch
(``{"prompts", "candidates"}``, answered ``{"judgements"}`` or ``{"error"}``). It imports no torch.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from garden.distill.judges import Judge, Judgement, make_judge
from garden.protocol.rows import PromptRow

JUDGE_TIMEOUT = 10.0
"""Seconds one batch of answers may take to judge (a few milliseconds is usual)."""
JUDGE_START_TIMEOUT = 60.0
"""Seconds the child may take to start and build its judge (Python, jsonschema: about half a second)."""
JUDGE_MEMORY = 1 << 30
"""Bytes of address space the child may map (it needs about 150 MiB)."""
MAX_REPLY_BYTES = 64 << 20
"""A reply line past this is a broken child, not a verdict."""


class JudgeLimitError(RuntimeError):
    """The judge ran past its time or memory limit, or its process died: the shard fails with this reason."""


class IsolatedJudge(Judge):
    """A judge (by kind and options, as :func:`~garden.distill.judges.make_judge` takes them) that runs in a
    child process. The options are checked here first, in this process, so a bad spec fails as before
    (``ValueError``). The child starts on the first batch and lives until :meth:`close` (or until this
    object is collected); a batch past ``timeout`` kills it, and the next batch starts a new one."""

    def __init__(
        self, kind: str, options: Mapping[str, Any], timeout: float = JUDGE_TIMEOUT, memory: int = JUDGE_MEMORY
    ) -> None:
        make_judge(kind, **options)  # raises ValueError naming the problem; thrown away
        self.name = kind  # type: ignore[misc]  # the kind it stands in for, as the rows record it
        self.kind, self.options = kind, dict(options)
        self.timeout, self.memory = timeout, memory
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._finalizer: weakref.finalize | None = None

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        return self.judge_many([prompt], [candidates])[0]

    def judge_many(
        self, prompts: Sequence[PromptRow], candidates_per_prompt: Sequence[Sequence[str]]
    ) -> list[Judgement]:
        self._check_batch(prompts, candidates_per_prompt)
        if not prompts:
            return []
        self._start()
        batch = {"prompts": [p.model_dump() for p in prompts], "candidates": [list(c) for c in candidates_per_prompt]}
        answers = sum(len(c) for c in candidates_per_prompt)
        reply = self._ask(batch, self.timeout, f"{answers} answer(s)")
        if "limit" in reply:
            self.close()
            raise JudgeLimitError(f"the {self.name} judge {reply['limit']} ({answers} answer(s))")
        if "error" in reply:
            raise ValueError(f"{self.name} judge: {reply['error']}")
        judgements = [_judgement(j) for j in reply.get("judgements", [])]
        if len(judgements) != len(prompts):
            self.close()
            raise JudgeLimitError(f"the {self.name} judge's process answered {len(judgements)} of {len(prompts)}")
        return judgements

    def close(self) -> None:
        """Stop the child (if any); the next batch starts a new one."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._buffer, self._finalizer = None, b"", None

    def __enter__(self) -> IsolatedJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the child ---------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "garden.distill.judge_sandbox", str(self.memory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        reply = self._ask({"kind": self.kind, "options": self.options}, JUDGE_START_TIMEOUT, "starting")
        if "error" in reply:
            self.close()
            raise ValueError(f"{self.name} judge: {reply['error']}")

    def _ask(self, message: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died(what)
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.close()
                    raise JudgeLimitError(
                        f"the {self.name} judge took over {timeout:g} s ({what}) and was stopped: the mission's "
                        f"{'pattern' if self.kind == 'regex' else 'schema'} is too slow to check"
                    )
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return self._died(what)
                self._buffer += chunk
                if len(self._buffer) > MAX_REPLY_BYTES:
                    self.close()
                    raise JudgeLimitError(f"the {self.name} judge's process sent over {MAX_REPLY_BYTES} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            raise JudgeLimitError(f"the {self.name} judge's process sent something that is not JSON") from None
        if not isinstance(reply, dict):
            self.close()
            raise JudgeLimitError(f"the {self.name} judge's process sent something that is not an object")
        return reply

    def _died(self, what: str) -> dict[str, Any]:
        proc = self._proc
        code = proc.wait() if proc is not None else None
        self.close()
        raise JudgeLimitError(
            f"the {self.name} judge's process died ({what}, exit {code}): past its {self.memory >> 20} MiB memory "
            "limit, or killed"
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:  # a broken pipe on flushing what the dead child never read
                pass


def _judgement(raw: dict[str, Any]) -> Judgement:
    return Judgement(
        chosen=raw["chosen"],
        rejected=raw["rejected"],
        scores={str(k): float(v) for k, v in raw["scores"].items()},
        candidate_scores=tuple(float(s) for s in raw["candidate_scores"]),
        reference_used=bool(raw["reference_used"]),
    )


def main(argv: list[str]) -> int:
    """The child: limit its own memory, build the judge, then judge batches until stdin closes."""
    import resource

    memory = int(argv[0]) if argv else JUDGE_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    out = sys.stdout

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    judge: Judge | None = None
    for line in sys.stdin:
        try:
            message = json.loads(line)
            if judge is None:
                judge = make_judge(message["kind"], **message["options"])
                reply({"ok": True})
                continue
            prompts = [PromptRow.model_validate(p) for p in message["prompts"]]
            judgements = judge.judge_many(prompts, message["candidates"])
            reply({"judgements": [asdict(j) for j in judgements]})
        except MemoryError:
            reply({"limit": f"ran out of its {memory >> 20} MiB of memory"})
        except (ValueError, TypeError, KeyError) as e:
            reply({"error": f"{type(e).__name__}: {e}"[:2000]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
