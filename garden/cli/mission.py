"""``garden mission create|list|show|export|pull|cancel``: a community lead's commands. Thin: they read the
mission file here (so errors name the file and key before anything is sent), then ask the local daemon's
HTTP port, which signs with the peer's key and does the swarm work (``/missions``, garden.api.missions)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from garden.cli.common import EXIT_CONFIG, app, auth_headers, call_daemon, console, daemon_url, fail

mission_app = typer.Typer(help="Launch and watch missions (distil a teacher into a student, together).")
app.add_typer(mission_app, name="mission")

URL = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's).")
DATA_DIR = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir.")
CONFIG = typer.Option(None, "--config", metavar="FILE")
AS_JSON = typer.Option(False, "--json", help="Print the raw JSON.")


@mission_app.command("create")
def create(
    words: list[str] = typer.Argument(
        ..., metavar="[FILTER] FILE",
        help="The mission file (mission.toml; keys: docs/missions.md). With --from-feedback, a FILTER may come "
        "first: 'all' (the default) or 'model=REF' for one model's answers.",
    ),  # fmt: skip
    from_feedback: bool = typer.Option(
        False, "--from-feedback",
        help="The prompts are your rated answers' (garden feedback), with your accepted or edited answers as "
        "references. You pick which prompts leave this machine.",
    ),  # fmt: skip
    yes: bool = typer.Option(False, "--yes", help="With --from-feedback: every prompt leaves, without asking."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
    as_json: bool = AS_JSON,
) -> None:
    """Validate a mission file, have the local peer sign and publish it; prints the mission id."""
    from garden.data import DEMO_PROMPTS, demo_prompts
    from garden.protocol.mission import MissionSpecError, load_mission_toml
    from garden.protocol.rows import PromptRow

    if len(words) > 2 or (len(words) == 2 and not from_feedback):
        raise fail(f"one mission file, please (got {' '.join(words)}); a FILTER comes only with --from-feedback",
                   EXIT_CONFIG)  # fmt: skip
    file = Path(words[-1])
    base = daemon_url(url, data_dir, config)
    prompts = None
    if from_feedback:
        prompts = [PromptRow.model_validate(r) for r in _feedback_prompts(base, words[0] if len(words) == 2 else "all")]
        if prompts and not yes:
            _show_leaving(prompts)
            answer = typer.prompt(
                f"which of these {len(prompts)} prompts (with your answers) leave this machine with the mission? "
                "all, none, or numbers such as 1,3-5", default="all",
            )  # fmt: skip
            try:
                prompts = [prompts[i] for i in pick(answer, len(prompts))]
            except ValueError as e:
                raise fail(str(e), EXIT_CONFIG) from None
            if not prompts:
                raise fail("no mission created: no prompt may leave")
    try:
        draft = load_mission_toml(file, {DEMO_PROMPTS: demo_prompts}, prompts=prompts)
    except MissionSpecError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    body: dict[str, Any] = {"spec": draft.spec.model_dump(mode="json", by_alias=True)}
    if not draft.spec.prompts.startswith("builtin:"):
        body["prompts"] = [p.model_dump(mode="json", exclude_defaults=True) for p in draft.prompts]
    created = call_daemon("POST", base, "/missions", ok=(201,), timeout=60, json=body).json()
    if as_json:
        print(json.dumps(created, indent=2))
        return
    console.print(
        f"mission [bold]{created['name']}[/] created: {created['prompts']} prompts in {created['shards']['total']} "
        f"shards, signed by this peer ({created['lead']})"
    )
    print(created["id"])
    console.print(f"watch it: garden mission show {created['id'][:12]}   or   {base}/missions/{created['id']}")


def pick(answer: str, count: int) -> list[int]:
    """The 0-based indexes an owner's answer picks of ``count`` numbered prompts: ``all`` (or yes), ``none`` (or
    no), or 1-based numbers and ranges (``1,3-5``), each once, in order. Raises ValueError naming what is wrong."""
    text = answer.strip().lower()
    if text in ("all", "y", "yes"):
        return list(range(count))
    if text in ("none", "n", "no", ""):
        return []
    chosen: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part!r} is not a prompt number or range (all, none, or numbers such as 1,3-5)")
        low, high = int(first), int(last or first)
        if not 1 <= low <= high <= count:
            raise ValueError(f"{part!r}: the prompts are numbered 1 to {count}")
        chosen.update(range(low - 1, high))
    return sorted(chosen)


def _feedback_prompts(base: str, selection: str) -> list[dict[str, Any]]:
    """The rated prompts with their chosen answers, of every model (``all``) or one (``model=REF``)."""
    if selection == "all":
        params = {}
    elif selection.startswith("model=") and len(selection) > len("model="):
        params = {"model": selection.removeprefix("model=")}
    else:
        raise fail(f"--from-feedback {selection!r}: the FILTER is 'all' or 'model=REF'", EXIT_CONFIG)
    return list(call_daemon("GET", base, "/feedback/prompts", params=params).json())


def _show_leaving(prompts: list[Any]) -> None:
    table = Table(title="what would leave this machine (signed into the mission, fetched by every peer)")
    table.add_column("#", justify="right")
    table.add_column("prompt", overflow="ellipsis", max_width=60)
    table.add_column("reference (your answer)", overflow="ellipsis", max_width=60)
    for number, row in enumerate(prompts, 1):
        table.add_row(str(number), row.prompt, row.reference or "")
    console.print(table)


@mission_app.command("layers")
def layers(
    file: Path = typer.Argument(..., help="The mission file (mission.toml) whose student base and prompts to read."),
    keep: int = typer.Option(..., "--keep", help="Decoder layers the student keeps, the first and the last included."),
) -> None:
    """The layers a pruned student should keep, for the mission file's [student] layers = [...]: the first, the
    last, and those of highest Block Influence (the ones that change the residual stream most) on the mission's
    prompts, measured here with its base. Every trainer then builds the listed layers (docs/models.md)."""
    from garden.data import DEMO_PROMPTS, demo_prompts
    from garden.models.chat import chat_prompt_ids
    from garden.models.loading import ModelRefError, load_model
    from garden.models.student import block_influence, influence_layers, kept_layer_indices
    from garden.protocol.mission import MissionSpecError, load_mission_toml

    try:
        draft = load_mission_toml(file, {DEMO_PROMPTS: demo_prompts})
        base = load_model(draft.spec.student.base)
        kept_layer_indices(int(base.model.config.num_hidden_layers), keep)  # a count it can keep, before measuring
        texts = (chat_prompt_ids(base.tokenizer, prompt.prompt) for prompt in draft.prompts)
        with console.status(f"measuring the layers of {draft.spec.student.base} on its prompts"):
            influence = block_influence(base.model, texts)
        chosen = influence_layers(influence, keep)
    except (MissionSpecError, ModelRefError) as e:
        raise fail(str(e), EXIT_CONFIG) from None
    console.print(f"# in [student], instead of keep_layers: {keep} of {len(influence)} layers", markup=False)
    print(f"layers = [{', '.join(map(str, chosen))}]")


@mission_app.command("list")
def list_(
    url: str | None = URL, data_dir: Path | None = DATA_DIR, config: Path | None = CONFIG, as_json: bool = AS_JSON
) -> None:
    """Missions the swarm knows, with progress."""
    data = call_daemon("GET", daemon_url(url, data_dir, config), "/missions").json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"{len(data)} mission(s)")
    for column in ("id", "name", "state", "shards done", "rows", "lead"):
        table.add_column(column)
    for m in data:
        shards = m["shards"]
        table.add_row(
            m["id"][:12], m["name"], m["state"], f"{shards['done']}/{shards['total']}", str(m["rows"]), m["lead"][-8:]
        )
    console.print(table)


@mission_app.command("show")
def show(
    mission_id: str = typer.Argument(..., metavar="ID", help="Mission id (or a unique prefix of it)."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
    as_json: bool = AS_JSON,
) -> None:
    """Shards done/leased/open, rows, peers working, ETA."""
    base = daemon_url(url, data_dir, config)
    full = _resolve(base, mission_id)
    data = call_daemon("GET", base, f"/missions/{full}").json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    shards = data["shards"]
    console.print(f"[bold]{data['name']}[/] {data['id']}  ({data['state']})")
    console.print(f"{_bar(shards['done'], shards['total'])} {shards['done']}/{shards['total']} shards")
    eta = data.get("eta_s")
    console.print(
        f"shards: {shards['done']} done, {shards['leased']} leased, {shards['open']} open of {shards['total']}; "
        f"rows: {data['rows']}" + (f"; ETA {_duration(eta)}" if eta else "")
    )
    console.print(f"lead: {data['lead']}   created {time.strftime('%Y-%m-%d %H:%M', time.localtime(data['created']))}")
    if data.get("teachers"):
        console.print("teachers: " + ", ".join(f"{ref} ({rows} rows)" for ref, rows in data["teachers"].items()))
    table = Table(title="peers")
    for column in ("peer", "prompts", "row sets held", "rows held", "shards won", "leasing"):
        table.add_column(column)
    for p in data["peers"]:
        table.add_row(
            p["peer_id"], "yes" if p["has_prompts"] else "no", str(p["row_sets"]), str(p["rows_held"]),
            str(p["shards_done"]), ", ".join(map(str, p["leased"])) or "-",
        )  # fmt: skip
    console.print(table)
    here = data["this_peer"]
    console.print(f"this peer: {here['state']}; shaken {here['shards_shaken']} shards, {here['rows_shaken']} rows")
    train = data.get("train")
    if train is not None:
        _show_training(train)
    if data.get("cancel_reason") is not None:
        console.print(f"cancelled by the lead: {data['cancel_reason'] or '(no reason given)'}")
    if data.get("student"):
        _show_student(data["student"])


def _show_student(student: dict[str, Any]) -> None:
    metrics = student.get("metrics") or {}
    figures = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "rows")
    console.print(
        f"published as {student['model']} (epoch {student['epoch']}; {student['parameters'] / 1e6:.1f} M parameters, "
        f"{student['layers']} layers){'; ' + figures if figures else ''}", soft_wrap=True, markup=False,
    )  # fmt: skip
    console.print(f"chat with it: garden generate --swarm mission:{student['mission_id'][:12]} \"Hello\"  "
                  f"(a peer serves it with garden run --serve mission:{student['mission_id'][:12]})",
                  soft_wrap=True, markup=False)  # fmt: skip


@mission_app.command("promote")
def promote(
    mission_id: str = typer.Argument(..., metavar="ID"),
    epoch: int | None = typer.Option(None, "--epoch", help="A vouched epoch (default: the newest one)."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Publish a vouched checkpoint of your mission's student as the swarm's model mission:ID (the lead's peer
    does it by itself once the last epoch is vouched for; promote publishes an earlier one, or sooner)."""
    base = daemon_url(url, data_dir, config)
    full = _resolve(base, mission_id)
    query = "" if epoch is None else f"?epoch={epoch}"
    student = call_daemon("POST", base, f"/missions/{full}/promote{query}", timeout=3600).json()
    _show_student(student)


def _bar(done: float, total: float, width: int = 40) -> str:
    filled = min(width, round(width * done / max(total, 1)))
    return f"[green]{'█' * filled}[/][dim]{'░' * (width - filled)}[/]"


def _show_training(train: dict) -> None:
    """This peer's training: a bar to max_epochs, then the step's metrics."""
    console.print(f"training here: {train['state']}")
    if not train.get("max_epochs"):
        return
    console.print(f"{_bar(train['epoch'], train['max_epochs'])} epoch {train['epoch']}/{train['max_epochs']}")

    def num(key: str, digits: int = 3) -> str:
        value = train.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    console.print(
        f"loss {num('loss')}  kl {num('kl')}  pref_acc {num('pref_acc', 2)}  "
        f"{train['samples']} rows trained here ({num('samples_per_s', 1)}/s), {train['peers']} trainers in the swarm"
    )
    if train.get("skipped_steps"):
        console.print(f"[yellow]{train['skipped_steps']} steps skipped (non-finite loss or gradient)[/]")
    if train.get("last_checkpoint"):
        console.print(f"last checkpoint: epoch {train['last_checkpoint'].get('epoch')}")
    if train.get("error"):
        console.print(f"[red]trainer error: {train['error']}[/]")


@mission_app.command("export")
def export(
    mission_id: str = typer.Argument(..., metavar="ID"),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the JSONL."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """All rows so far as TRL preference JSONL (prompt, chosen, rejected) plus the teacher's log-probs."""
    from garden.durable import write_bytes

    base = daemon_url(url, data_dir, config)
    full = _resolve(base, mission_id)
    response = call_daemon("GET", base, f"/missions/{full}/rows", params={"format": "jsonl"}, timeout=600)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(output, response.content)
    missing = response.headers.get("x-garden-missing-shards", "")
    console.print(f"wrote {response.headers.get('x-garden-rows', '?')} rows to {output}")
    if missing:
        console.print(f"[yellow]shards {missing} are done but no peer served their rows now; export again later[/]")


@mission_app.command("pull")
def pull(
    mission_id: str = typer.Argument(..., metavar="ID"),
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write the model to (created)."),
    epoch: int | None = typer.Option(None, "--epoch", help="Which epoch's checkpoint (default: the newest verified)."),
    unverified: bool = typer.Option(
        False, "--unverified", help="Also take a checkpoint the mission's lead did not vouch for (anyone may publish)."
    ),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Download a checkpoint of the mission's student from a peer that has it, verify every file's sha256,
    and write it as a model directory (``garden generate --model DIR`` and ``garden eval`` load it). Only a
    checkpoint the mission's lead vouched for (it pulled, checked and evaluated it), unless ``--unverified``."""
    import hashlib

    import httpx

    from garden.durable import replace_file

    base = daemon_url(url, data_dir, config)
    full = _resolve(base, mission_id)
    which = "latest" if epoch is None else str(epoch)
    console.print(f"fetching the checkpoint ({which}) of mission {full[:12]} from the swarm ...")
    query = "?unverified=true" if unverified else ""
    record = call_daemon("POST", base, f"/missions/{full}/checkpoints/{which}/pull{query}", timeout=3600).json()
    output.mkdir(parents=True, exist_ok=True)
    for item in record["files"]:
        subdir, name = item["path"].split("/", 1)
        dest = output / (name if subdir == "model" else item["path"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        digest = hashlib.sha256()
        try:
            with httpx.stream(
                "GET", f"{base}/missions/{full}/checkpoints/{record['epoch']}/files/{item['path']}", timeout=600,
                headers=auth_headers(base), params={"sha256": item["sha256"]},
            ) as response:
                if response.status_code != 200:
                    raise fail(f"the daemon does not serve {item['path']}: {response.status_code}")
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise fail(f"download of {item['path']} broke off: {e}") from None
        if digest.hexdigest() != item["sha256"]:
            tmp.unlink(missing_ok=True)
            raise fail(
                f"{item['path']} does not match its sha256 (got {digest.hexdigest()[:12]}, the checkpoint "
                f"names {item['sha256'][:12]}): refused, nothing written for it"
            )
        replace_file(tmp, dest)  # flushed first: a crash never leaves a file that only looks pulled
    (output / "garden-checkpoint.json").write_text(json.dumps({"mission_id": full, **record}, indent=2))
    size = sum(f["size"] for f in record["files"]) / 2**20
    console.print(
        f"wrote epoch {record['epoch']} ({len(record['files'])} files, {size:.1f} MiB, every sha256 checked, "
        f"{'vouched for by ' + record['vouched_by'] if record.get('verified') else 'NOT verified'}) "
        f"to {output}; try: garden generate --model {output} \"What is the capital of France?\""
    )


@mission_app.command("cancel")
def cancel(
    mission_id: str = typer.Argument(..., metavar="ID"),
    reason: str = typer.Option("", "--reason", help="Shown to the peers (200 characters at most)."),
    url: str | None = URL,
    data_dir: Path | None = DATA_DIR,
    config: Path | None = CONFIG,
) -> None:
    """Cancel a mission; only its lead (the peer that created it) may."""
    base = daemon_url(url, data_dir, config)
    full = _resolve(base, mission_id)
    data = call_daemon("DELETE", base, f"/missions/{full}", params={"reason": reason}).json()
    console.print(f"mission {data['name']} ({data['id'][:12]}) is {data['state']}")


def _resolve(base: str, prefix: str) -> str:
    """A full mission id from a unique prefix (ids are 64 hex characters: people paste 12)."""
    if len(prefix) == 64:
        return prefix
    found = [m["id"] for m in call_daemon("GET", base, "/missions").json() if m["id"].startswith(prefix.lower())]
    if len(found) != 1:
        raise fail(f"{'no' if not found else 'more than one'} mission id starts with {prefix!r}")
    return str(found[0])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
