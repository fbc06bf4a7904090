"""The owner's verdicts on the answers they got become preference pairs, and the next mission's prompts.

Every answer this peer gives its owner (``/v1``, ``garden generate``) is kept in the peer's store with an id.
The owner rates it (``POST /v1/feedback``, ``garden feedback``, the dashboard's chat panel):

- **accept**: the answer is a chosen example; when it replaced answers the owner asked to redo, each of those
  is its rejected twin (a pair);
- **redo**: the answer is rejected; the same request is answered again with a new seed, and that answer can be
  rated in turn;
- **edit**: the owner's text is chosen and the model's answer rejected (a pair).

Nothing here leaves the machine: answers may hold private prompts. The owner exports the pairs (TRL's
``prompt`` / ``chosen`` / ``rejected``) or makes a mission of the prompts with their chosen answers as
references (``garden mission create --from-feedback``), after confirming which prompts leave the machine.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from garden.errors import Conflict, NotFound
from garden.protocol.rows import MAX_PROMPT_CHARS, PromptRow
from garden.store import StoredAnswer, Store

Verdict = Literal["accept", "redo", "edit"]
VERDICTS: tuple[str, ...] = ("accept", "redo", "edit")
MAX_EDIT_CHARS = 32_768
"""The longest edited answer kept (a chat answer, not a document)."""


@dataclass(frozen=True)
class FeedbackPair:
    """One preference pair (or a chosen example, ``rejected`` None) from the owner's verdicts; the first three
    fields are TRL's preference format."""

    prompt: str
    chosen: str
    rejected: str | None
    model: str
    verdict: str
    answer_id: str
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "system": self.system,
            "model": self.model, "verdict": self.verdict, "id": self.answer_id,
        }  # fmt: skip


class Feedback:
    """The answers kept for rating and the owner's verdicts, in the peer's store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def keep(self, model: str, kind: str, request: dict[str, Any], text: str, answer_id: str | None = None,
             redo_of: str | None = None) -> StoredAnswer:  # fmt: skip
        """Keep an answer for rating; ``request`` holds ``messages`` (chat) or ``prompt`` (text) and the sampling."""
        answer = StoredAnswer(
            answer_id=answer_id or f"ans-{uuid.uuid4().hex}", model=model, kind=kind,
            request=json.dumps(request, ensure_ascii=False), prompt=prompt_of(kind, request), text=text,
            redo_of=redo_of, created_at=time.time(),
        )  # fmt: skip
        self.store.add_answer(answer)
        return answer

    def get(self, answer_id: str) -> StoredAnswer:
        answer = self.store.answer(answer_id)
        if answer is None:
            raise NotFound(f"no answer {answer_id!r} is kept on this peer (garden feedback list shows them)")
        return answer

    def rate(self, answer_id: str, verdict: str, text: str | None = None) -> StoredAnswer:
        """Record the owner's verdict; ``text`` is the edited answer (``edit`` only). Raises NotFound for an
        unknown id, Conflict for a verdict that does not fit (an edit without text, text with another verdict)."""
        answer = self.get(answer_id)
        if verdict not in VERDICTS:
            raise Conflict(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if verdict == "edit" and not (text or "").strip():
            raise Conflict("an edit needs the text that should have been answered")
        if verdict != "edit" and text is not None:
            raise Conflict(f"text goes with an edit only, not with {verdict}")
        if text is not None and len(text) > MAX_EDIT_CHARS:
            raise Conflict(f"the edited answer is {len(text)} characters; at most {MAX_EDIT_CHARS}")
        self.store.rate(answer.answer_id, verdict, text)
        return self.get(answer_id)

    def request(self, answer: StoredAnswer) -> dict[str, Any]:
        return dict(json.loads(answer.request))

    def pairs(self, model: str | None = None, examples: bool = False) -> list[FeedbackPair]:
        """The pairs of the owner's verdicts, newest first; ``examples``: accepted answers that replaced nothing
        too (``rejected`` None)."""
        found = []
        for answer in self.store.answers(limit=1_000_000, rated=True, model=model):
            system = system_of(answer.kind, self.request(answer))
            common = {"model": answer.model, "verdict": answer.verdict or "", "answer_id": answer.answer_id,
                      "system": system}  # fmt: skip
            if answer.verdict == "edit" and answer.edit is not None:
                found.append(FeedbackPair(answer.prompt, answer.edit, answer.text, **common))
            elif answer.verdict == "accept":
                redone = self._redone(answer)
                found.extend(FeedbackPair(answer.prompt, answer.text, r.text, **common) for r in redone)
                if not redone and examples:
                    found.append(FeedbackPair(answer.prompt, answer.text, None, **common))
        return found

    def _redone(self, answer: StoredAnswer) -> list[StoredAnswer]:
        """The answers ``answer`` replaced (its redo chain), nearest first."""
        chain, seen = [], {answer.answer_id}
        current = answer
        while current.redo_of is not None and current.redo_of not in seen:
            previous = self.store.answer(current.redo_of)
            if previous is None:
                break
            chain.append(previous)
            seen.add(previous.answer_id)
            current = previous
        return chain

    def prompts(self, model: str | None = None) -> list[PromptRow]:
        """The rated prompts with their chosen answer as the reference (accepted or edited; the newest verdict
        per prompt), for a mission whose reference judge prefers what the owner chose."""
        chosen: dict[str, str] = {}
        for pair in self.pairs(model, examples=True):
            if pair.prompt.strip():
                chosen.setdefault(pair.prompt, pair.chosen)
        return [PromptRow(prompt=prompt[:MAX_PROMPT_CHARS], reference=reference[:MAX_PROMPT_CHARS])
                for prompt, reference in chosen.items()]  # fmt: skip

    def clear(self) -> int:
        return self.store.clear_feedback()


def system_of(kind: str, request: dict[str, Any]) -> str | None:
    """A chat's system message, if it had one."""
    if kind != "chat":
        return None
    return next((str(m.get("content", "")) for m in request.get("messages", []) if m.get("role") == "system"), None)


def prompt_of(kind: str, request: dict[str, Any]) -> str:
    """The prompt of a pair: the last user message of a chat, or a completion's prompt."""
    if kind == "chat":
        users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
        return str(users[-1]) if users else ""
    prompt = request.get("prompt", "")
    return str(prompt[0] if isinstance(prompt, list) and prompt else prompt)
