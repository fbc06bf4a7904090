"""Commands that run a peer or ask a running one: ``run``, ``status``, ``peers``, ``version``. Thin: they parse
flags into settings and call the runner, or ask a daemon's HTTP port and print the answer (a rich table for
people, ``--json`` for scripts)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from garden import __version__
from garden.cli.common import app, call_daemon, console, daemon_url, get_json, settings_from
from garden.config import GardenSettings


def _help(field: str) -> str:
    info = GardenSettings.model_fields[field]
    return f"{info.description} (env GARDEN_{field.upper()}; config key {field})"


@app.command()
def run(
    join: list[str] | None = typer.Option(None, "--join", metavar="MADDR", help=_help("join") + " Repeatable."),
    host_maddr: list[str] | None = typer.Option(None, "--host-maddr", metavar="MADDR", help=_help("host_maddr")),
    announce_maddr: list[str] | None = typer.Option(
        None, "--announce-maddr", metavar="MADDR", help=_help("announce_maddr")
    ),
    http_host: str | None = typer.Option(None, "--http-host", help=_help("http_host")),
    http_port: int | None = typer.Option(None, "--http-port", help=_help("http_port")),
    http_max_body: str | None = typer.Option(None, "--http-max-body", metavar="SIZE", help=_help("http_max_body")),
    http_allowed_host: list[str] | None = typer.Option(
        None, "--http-allowed-host", metavar="NAME", help=_help("http_allowed_host") + " Repeatable."
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=_help("data_dir")),
    roles: str | None = typer.Option(None, "--roles", metavar="ROLE,...", help=_help("roles")),
    max_threads: int | None = typer.Option(None, "--max-threads", help=_help("max_threads")),
    max_memory: str | None = typer.Option(None, "--max-memory", metavar="SIZE", help=_help("max_memory")),
    max_cpu: float | None = typer.Option(None, "--max-cpu", metavar="PERCENT", help=_help("max_cpu")),
    max_disk: str | None = typer.Option(None, "--max-disk", metavar="SIZE", help=_help("max_disk")),
    max_upload_rate: str | None = typer.Option(
        None, "--max-upload-rate", metavar="SIZE", help=_help("max_upload_rate")
    ),
    max_download_rate: str | None = typer.Option(
        None, "--max-download-rate", metavar="SIZE", help=_help("max_download_rate")
    ),
    max_serving_memory: str | None = typer.Option(
        None, "--max-serving-memory", metavar="SIZE", help=_help("max_serving_memory")
    ),
    when: str | None = typer.Option(None, "--when", metavar="always|idle", help=_help("when")),
    idle_threshold: float | None = typer.Option(
        None, "--idle-threshold", metavar="PERCENT", help=_help("idle_threshold")
    ),
    idle_quiet_s: float | None = typer.Option(None, "--idle-quiet", metavar="SECONDS", help=_help("idle_quiet_s")),
    pause_serving: bool | None = typer.Option(None, "--pause-serving/--no-pause-serving", help=_help("pause_serving")),
    lease_seconds: float | None = typer.Option(None, "--lease-seconds", help=_help("lease_seconds")),
    void_after: float | None = typer.Option(None, "--void-after", metavar="SECONDS", help=_help("void_after")),
    train_batch_size: int | None = typer.Option(None, "--train-batch-size", help=_help("train_batch_size")),
    vouch_quiet_s: float | None = typer.Option(
        None, "--vouch-quiet", metavar="SECONDS", help=_help("vouch_quiet_s")
    ),
    trust_lead: list[str] | None = typer.Option(
        None, "--trust-lead", metavar="PEER_ID", help=_help("trust_lead") + " Repeatable."
    ),
    allow_local_models: bool | None = typer.Option(
        None, "--allow-local-models/--no-allow-local-models", help=_help("allow_local_models")
    ),
    max_missions_per_lead: int | None = typer.Option(
        None, "--max-missions-per-lead", help=_help("max_missions_per_lead")
    ),
    max_missions: int | None = typer.Option(None, "--max-missions", help=_help("max_missions")),
    max_trainers: int | None = typer.Option(None, "--max-trainers", help=_help("max_trainers")),
    mission_max_age: float | None = typer.Option(
        None, "--mission-max-age", metavar="SECONDS", help=_help("mission_max_age")
    ),
    serve: list[str] | None = typer.Option(
        None, "--serve", metavar="REF[:START-END]", help=_help("serve") + " Repeatable."
    ),
    serve_blocks: int | None = typer.Option(None, "--serve-blocks", help=_help("serve_blocks")),
    max_sessions: int | None = typer.Option(None, "--max-sessions", help=_help("max_sessions")),
    max_session_tokens: int | None = typer.Option(None, "--max-session-tokens", help=_help("max_session_tokens")),
    session_idle_timeout: float | None = typer.Option(
        None, "--session-idle-timeout", help=_help("session_idle_timeout")
    ),
    inference_timeout: float | None = typer.Option(None, "--inference-timeout", help=_help("inference_timeout")),
    spot_check: float | None = typer.Option(None, "--spot-check", metavar="FRACTION", help=_help("spot_check")),
    server_push: bool | None = typer.Option(None, "--server-push/--no-server-push", help=_help("server_push")),
    log_level: str | None = typer.Option(None, "--log-level", help=_help("log_level")),
    client_mode: bool | None = typer.Option(None, "--client-mode/--no-client-mode", help=_help("client_mode")),
    reachability: str | None = typer.Option(
        None, "--reachability", metavar="auto|public|private", help=_help("reachability")
    ),
    relay: list[str] | None = typer.Option(None, "--relay", metavar="MADDR", help=_help("relay") + " Repeatable."),
    relay_max_circuits: int | None = typer.Option(None, "--relay-max-circuits", help=_help("relay_max_circuits")),
    relay_max_reservations: int | None = typer.Option(
        None, "--relay-max-reservations", help=_help("relay_max_reservations")
    ),
    relay_data_limit: str | None = typer.Option(
        None, "--relay-data-limit", metavar="SIZE", help=_help("relay_data_limit")
    ),
    relay_time_limit: float | None = typer.Option(
        None, "--relay-time-limit", metavar="SECONDS", help=_help("relay_time_limit")
    ),
    swarm: str | None = typer.Option(None, "--swarm", help=_help("swarm")),
    announce_period: float | None = typer.Option(None, "--announce-period", help=_help("announce_period")),
    dht_timeout: float | None = typer.Option(None, "--dht-timeout", help=_help("dht_timeout")),
    config: Path | None = typer.Option(None, "--config", metavar="FILE", help="TOML config file (env GARDEN_CONFIG)."),
) -> None:
    """Run a peer: start a new swarm, or join one with --join. Stop with Ctrl+C."""
    flags = dict(
        join=join or None,
        host_maddr=host_maddr or None,
        announce_maddr=announce_maddr or None,
        http_host=http_host,
        http_port=http_port,
        http_allowed_host=http_allowed_host or None,
        http_max_body=http_max_body,
        data_dir=data_dir,
        roles=roles,
        max_threads=max_threads,
        max_memory=max_memory,
        max_cpu=max_cpu,
        max_disk=max_disk,
        max_upload_rate=max_upload_rate,
        max_download_rate=max_download_rate,
        max_serving_memory=max_serving_memory,
        when=when,
        idle_threshold=idle_threshold,
        idle_quiet_s=idle_quiet_s,
        pause_serving=pause_serving,
        lease_seconds=lease_seconds,
        void_after=void_after,
        train_batch_size=train_batch_size,
        vouch_quiet_s=vouch_quiet_s,
        trust_lead=trust_lead or None,
        allow_local_models=allow_local_models,
        max_missions_per_lead=max_missions_per_lead,
        max_missions=max_missions,
        max_trainers=max_trainers,
        mission_max_age=mission_max_age,
        serve=serve or None,
        serve_blocks=serve_blocks,
        max_sessions=max_sessions,
        max_session_tokens=max_session_tokens,
        session_idle_timeout=session_idle_timeout,
        inference_timeout=inference_timeout,
        spot_check=spot_check,
        server_push=server_push,
        log_level=log_level,
        client_mode=client_mode,
        reachability=reachability,
        relay=relay or None,
        relay_max_circuits=relay_max_circuits,
        relay_max_reservations=relay_max_reservations,
        relay_data_limit=relay_data_limit,
        relay_time_limit=relay_time_limit,
        swarm=swarm,
        announce_period=announce_period,
        dht_timeout=dht_timeout,
    )
    settings = settings_from(flags, config)
    # hivemind makes torch share memory through files by default, which starts a torch_shm_manager
    # process (~60 MB) beside the daemon; the DHT's futures need only a few pooled buffers, which
    # file descriptors serve as well. Must be set before hivemind is first imported.
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    # both import hivemind and torch: only for `run`
    from garden.api.app import create_app
    from garden.daemon.runner import run as run_daemon

    raise typer.Exit(run_daemon(settings, create_app))


@app.command()
def status(
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """This peer: id, uptime, roles, addresses, peers seen."""
    data = get_json(daemon_url(url, data_dir, config), "/status")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    machine = data.get("machine", {})
    gpu = machine.get("gpu")
    rows = [
        ("peer", data["peer_id"]),
        ("version", data["version"]),
        ("uptime", _duration(data["uptime_s"])),
        ("swarm", f"{data['swarm']} ({'joined' if data['joined'] else 'not yet announced'})"),
        ("roles", ", ".join(data["roles"]) or "none"),
        *((f"  not {role}", why) for role, why in data.get("skipped_roles", {}).items()),
        ("peers seen", str(data["peers"])),
        (
            "machine",
            f"{machine.get('cores')} cores, {_gib(machine.get('ram_bytes', 0))} RAM"
            + (f", {gpu['name']} ({_gib(gpu['memory_bytes'])})" if gpu else ", no GPU"),
        ),
        ("reachability", _reach_text(data.get("network") or {})),
        ("addresses", "\n".join(data["addresses"]) or "none (client mode)"),
        ("state", data.get("working", "working")),
        *_caps_rows(data.get("caps") or {}),
        *_contribution_rows(data.get("contribution") or {}),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if data.get("upgrade"):
        console.print(f"[bold yellow]upgrade:[/] {data['upgrade']}")


def _caps_rows(caps: dict[str, object]) -> list[tuple[str, str]]:
    parts = []
    if caps.get("max_cpu"):
        parts.append(f"CPU {caps['max_cpu']:g} %")
    for key, label in (("max_memory", "memory"), ("max_disk", "disk")):
        if caps.get(key):
            parts.append(f"{label} {_gib(int(caps[key]))}")  # type: ignore[call-overload]
    for key, label in (("max_upload_rate", "up"), ("max_download_rate", "down")):
        if caps.get(key):
            parts.append(f"{label} {int(caps[key]) / 2**20:.1f} MiB/s")  # type: ignore[call-overload]
    if caps.get("when") == "idle":
        parts.append("only when the machine is idle")
    return [("caps", ", ".join(parts))] if parts else []


def _contribution_rows(given: dict[str, object]) -> list[tuple[str, str]]:
    if not given:
        return []
    line = (
        f"{given.get('rows_shaken', 0)} rows shaken, {given.get('samples_trained', 0)} samples trained, "
        f"{given.get('tokens_served', 0)} tokens served, {float(given.get('hours_online', 0.0)):.1f} h online"  # type: ignore[arg-type]
    )
    return [("contribution", line)]


@app.command()
def peers(
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """The swarm's peers with their capabilities."""
    data = get_json(daemon_url(url, data_dir, config), "/peers")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"{len(data)} peer(s)")
    for column in ("peer", "roles", "reach", "cores", "RAM", "GPU", "load", "version", "last seen"):
        table.add_column(column)
    now = time.time()
    for peer in data:
        gpu = peer.get("gpu")
        table.add_row(
            peer["peer_id"] + (" (this)" if peer.get("is_self") else ""),
            ", ".join(peer["roles"]) or "-",
            "client" if peer.get("client_mode") else peer.get("reachability", "unknown"),
            str(peer["cores"]),
            _gib(peer["ram_bytes"]),
            f"{gpu['name']} ({_gib(gpu['memory_bytes'])})" if gpu else "-",
            f"{peer['load'] * 100:.0f}%",
            peer["version"],
            f"{_duration(max(0.0, now - peer['last_seen']))} ago",
        )
    console.print(table)


@app.command()
def invite(
    lead: list[str] | None = typer.Option(
        None, "--lead", metavar="PEER_ID", help="A lead the newcomer should trust (--trust-lead). Repeatable."
    ),
    trust_me: bool = typer.Option(False, "--trust-me", help="Ask the newcomer to trust this peer as a lead."),
    url: str | None = typer.Option(None, "--url", help="A daemon's HTTP port (default: this machine's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Find the daemon running on this data dir."),
    config: Path | None = typer.Option(None, "--config", metavar="FILE"),
) -> None:
    """One line a newcomer pastes to join this swarm: garden run --join <line>. It holds the swarm's name, a
    few peers to join through and, if asked, leads to trust."""
    params = [("lead", x) for x in lead or []] + [("me", "true")] * trust_me
    data = call_daemon("GET", daemon_url(url, data_dir, config), "/invite", params=params).json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(data["line"])  # alone on stdout: `garden run --join "$(garden invite)"` works
    trusted = f"; it trusts {len(data['leads'])} lead(s)" if data["leads"] else ""
    typer.echo(
        f"on the new machine: garden run --join <the line above> (swarm {data['swarm']}, "
        f"{len(data['peers'])} address(es) to join through{trusted})",
        err=True,
    )


@app.command()
def version() -> None:
    """Print garden's version."""
    print(__version__)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _reach_text(net: dict) -> str:
    """public / private / unknown, how others reach this peer, and what follows (``garden.net.reach``)."""
    if not net:
        return "unknown"
    how = {"relayed": f"through {len(net.get('relays') or [])} relay(s)", "client": "dials out only"}.get(
        net.get("mode", ""), "direct"
    )
    extra = ", relays for others" if net.get("relay_service") else ""
    if net.get("relay_limits") == "libp2p-default":  # hivemind's p2pd lost its start-up race at every start
        extra += " (with libp2p's default limits: 128 KiB a relayed connection; restart to try again)"
    note = f"\n{net['note']}" if net.get("note") else ""
    return f"{net.get('reachability', 'unknown')}, {how}{extra}{note}"

