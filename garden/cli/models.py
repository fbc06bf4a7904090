"""``garden models``: the swarm's models (served layers, published students with their evaluation), and the
``mission:<id>`` references that the local commands (``generate``, ``export``) load through the local peer."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from garden.cli.common import app, call_daemon, console, daemon_url, fail


@app.command()
def models(
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON (GET /models)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """The swarm's models: what its servers serve (layer coverage) and the missions' published students
    (mission:ID, with the lead's evaluation). Use them with garden generate --model, garden run --serve, /v1."""
    data = call_daemon("GET", daemon_url(url, data_dir, config), "/models", timeout=60).json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"{len(data)} model(s) in the swarm")
    table.add_column("model", no_wrap=True)
    columns = ("mission", "params", "layers served", "KL (base)", "NLL", "top-1", "pref acc", "measured on", "here")
    for column in columns:
        table.add_column(column)
    for entry in data:
        student = entry.get("student") or {}
        metrics = student.get("metrics") or {}
        served = sum(b - a for a, b in _covered(entry))
        table.add_row(
            entry["model"] if not student else f"mission:{student['mission_id'][:12]}",
            f"{student['name']}, epoch {student['epoch']}" if student else "-",
            f"{student['parameters'] / 1e6:.1f} M" if student else "-",
            f"{served}/{entry['num_layers']}, {entry['servers']} peer(s)",
            _number(metrics.get("kl")) + (f" ({_number(metrics['base_kl'])})" if "base_kl" in metrics else ""),
            _number(metrics.get("nll")),
            _number(metrics.get("top1")),
            _number(metrics.get("pref_acc")),
            _measured_on(metrics),
            "yes" if student.get("local_path") else "-",
        )
    console.print(table)
    if any(e.get("student") for e in data):
        console.print("a student's full id: garden models --json; chat: garden generate --swarm mission:ID \"...\"")


def _covered(entry: dict) -> list[tuple[int, int]]:
    """The served spans, merged (each layer counted once)."""
    spans = sorted((s["start"], s["end"]) for s in entry.get("spans") or [])
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _measured_on(metrics: dict) -> str:
    """The rows the lead's figures come from: held-out prompts, or (a mission too small to hold any out yet)
    rows the student may have trained on."""
    if "rows" not in metrics:
        return "-"
    rows, heldout = int(metrics["rows"]), int(metrics.get("heldout_rows", 0))
    return f"{rows} held-out rows" if heldout else f"{rows} rows (trained on)"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def local_model(ref: str, url: str | None = None, data_dir: Path | None = None) -> str:
    """What a local command loads for ``ref``: a swarm student (``mission:<id>``, a prefix, a name) is pulled by
    the local peer, every file checked, and loaded from its data dir; any other reference is itself."""
    if not ref.strip().startswith("mission:"):
        return ref
    base = daemon_url(url, data_dir, None)
    pulled = call_daemon("POST", base, "/models/pull", json={"model": ref}, ok=(200,), timeout=3600).json()
    path = pulled.get("path")
    if not path or not Path(path).is_dir():
        raise fail(f"the peer at {base} keeps {pulled.get('model')} at {path}, not on this machine; "
                   "use garden mission pull ID -o DIR there")  # fmt: skip
    return str(path)
