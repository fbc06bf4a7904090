"""``garden feedback list|accept|redo|edit|export|clear``: rate the answers you got from ``garden generate`` and
``/v1``, and turn your verdicts into preference pairs. Everything stays on this machine (the local peer's
store) until you export it or make a mission of it (``garden mission create --from-feedback``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from garden.cli.common import app, call_daemon, console, daemon_url, fail

feedback_app = typer.Typer(help="Rate answers (accept, redo, edit) and export them as preference pairs.")
app.add_typer(feedback_app, name="feedback")

URL = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's).")
DATA_DIR = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir.")
ANSWER = typer.Argument(None, metavar="[ID]", help="The answer's id, or a unique prefix (default: the newest).")


@feedback_app.command("list")
def list_(
    limit: int = typer.Option(20, "-n", "--limit", help="How many of the newest answers."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """The newest answers with your verdicts."""
    found = call_daemon("GET", daemon_url(url, data_dir, None), f"/feedback?limit={limit}").json()
    if as_json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{len(found)} answer(s), newest first")
    for column in ("id", "model", "verdict", "prompt", "answer"):
        table.add_column(column, overflow="fold" if column == "id" else "ellipsis")
    for a in found:
        table.add_row(a["id"], a["model"], a["verdict"] or "-", _short(a["prompt"]), _short(a["edit"] or a["text"]))
    console.print(table)


@feedback_app.command("accept")
def accept(answer_id: str | None = ANSWER, url: str | None = URL, data_dir: Path | None = DATA_DIR) -> None:
    """Keep the answer as a good one (chosen; the answers it replaced by redo become its rejected twins)."""
    _rate(daemon_url(url, data_dir, None), answer_id, "accept")


@feedback_app.command("edit")
def edit(
    answer_id: str | None = ANSWER,
    text: str = typer.Option(..., "--text", help="What should have been answered ('-' reads it from stdin)."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Your text is the chosen answer, the model's the rejected one."""
    _rate(daemon_url(url, data_dir, None), answer_id, "edit", sys.stdin.read() if text == "-" else text)


@feedback_app.command("redo")
def redo(answer_id: str | None = ANSWER, url: str | None = URL, data_dir: Path | None = DATA_DIR) -> None:
    """The answer is rejected; the same question is answered again (a new seed), and printed with its id."""
    base = daemon_url(url, data_dir, None)
    answer = _find(base, answer_id)
    if answer["request"].get("source") == "local":  # generated here, not by the swarm: again here
        from garden.cli.models import local_model

        text = _generate_again(answer, local_model(answer["model"], url, data_dir))
        kept = call_daemon("POST", base, "/feedback/answers", ok=(201,), json={
            "model": answer["model"], "prompt": answer["prompt"], "system": _system(answer), "text": text,
            **{k: v for k, v in answer["request"].items() if k in ("max_tokens", "top_p")},
            "temperature": answer["request"].get("temperature") or 0.8, "redo_of": answer["id"],
        }).json()  # fmt: skip
        new_id = kept["id"]
    else:
        result = call_daemon("POST", base, "/v1/feedback", timeout=600, json={"id": answer["id"], "verdict": "redo"})
        completion = result.json()["completion"]
        choice = completion["choices"][0]
        text, new_id = (choice.get("message") or {}).get("content", choice.get("text", "")), completion["id"]
    print(text)
    console.print(f"rate it: garden feedback accept|redo|edit {new_id}", soft_wrap=True, markup=False)


@feedback_app.command("export")
def export(
    output: Path = typer.Option(..., "-o", "--output", help="The JSONL file to write (prompt, chosen, rejected)."),
    model: str | None = typer.Option(None, "--model", help="Only answers of this model."),
    examples: bool = typer.Option(False, "--examples", help="Also accepted answers that replaced none (rejected "
                                  "null)."),  # fmt: skip
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Write your verdicts as preference pairs in TRL's format (datasets.load_dataset("json", ...) loads it)."""
    from garden.durable import replace_file

    base = daemon_url(url, data_dir, None)
    params: dict[str, Any] = {"examples": str(examples).lower()} | ({"model": model} if model else {})
    response = call_daemon("GET", base, "/feedback/pairs", params=params)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text(response.text)
    replace_file(tmp, output)
    console.print(f"wrote {response.headers.get('X-Garden-Pairs', '?')} pair(s) to {output}", markup=False)


@feedback_app.command("clear")
def clear(
    yes: bool = typer.Option(False, "--yes", help="Do not ask."), url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
) -> None:  # fmt: skip
    """Forget every kept answer and verdict on this peer."""
    if not yes and not typer.confirm("forget every kept answer and verdict?"):
        raise fail("nothing cleared")
    cleared = call_daemon("DELETE", daemon_url(url, data_dir, None), "/feedback").json()["cleared"]
    console.print(f"forgot {cleared} answer(s) and their verdicts")


def _rate(base: str, answer_id: str | None, verdict: str, text: str | None = None) -> None:
    answer = _find(base, answer_id)
    body = {"id": answer["id"], "verdict": verdict} | ({"text": text} if text is not None else {})
    result = call_daemon("POST", base, "/v1/feedback", json=body).json()
    console.print(f"{verdict}: {answer['id']} ({result['pairs']} pair(s) kept on this machine)", markup=False)


def _find(base: str, answer_id: str | None) -> dict[str, Any]:
    """The answer with this id (or prefix), else the newest one."""
    found = call_daemon("GET", base, "/feedback?limit=10000").json()
    if answer_id is None:
        if not found:
            raise fail("no answer is kept yet: ask something first (garden generate, /v1)")
        return dict(found[0])
    matches = [a for a in found if a["id"] == answer_id] or [a for a in found if a["id"].startswith(answer_id)]
    if len(matches) != 1:
        raise fail(f"{'no' if not matches else 'more than one'} kept answer has the id {answer_id!r}")
    return dict(matches[0])


def _system(answer: dict[str, Any]) -> str | None:
    return next((m["content"] for m in answer["request"].get("messages", []) if m.get("role") == "system"), None)


def _generate_again(answer: dict[str, Any], model: str) -> str:
    """The same question to the same local model, with a new seed (sampled even when it was greedy)."""
    import secrets

    from garden.inference.generate import GenerateConfig, TextGeneration
    from garden.models.loading import load_model

    request = answer["request"]
    config = GenerateConfig(int(request.get("max_tokens", 256)), float(request.get("temperature") or 0.8),
                            float(request.get("top_p", 1.0)), secrets.randbelow(2**31), _system(answer))  # fmt: skip
    try:
        generation = TextGeneration(load_model(model), answer["prompt"], config)
    except (ValueError, OSError) as e:
        raise fail(f"cannot answer again with {answer['model']}: {e}") from None
    with generation:
        return "".join(generation)


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"

