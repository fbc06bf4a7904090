"""``garden demo``: the main job end to end on this machine (see ``garden.demo``)."""

from __future__ import annotations

from pathlib import Path

import typer

from garden.cli.common import app


@app.command()
def demo(
    peers: int = typer.Option(3, "--peers", min=1, max=8, help="Local peers in the new swarm."),
    prompts: int = typer.Option(64, "--prompts", min=8, max=192, help="Demo prompts the mission shakes."),
    epochs: int = typer.Option(6, "--epochs", min=1, help="Swarm epochs the student trains."),
    target_batch_size: int = typer.Option(32, "--target-batch-size", min=2, help="Rows per epoch (swarm-wide)."),
    http_port: int = typer.Option(8765, "--http-port", help="The first peer's HTTP port; the others take the next."),
    work_dir: Path | None = typer.Option(
        None, "--dir", help="Where the peers' data dirs go (default: a new temp dir)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Keep the swarm up afterwards (Ctrl+C stops it): chat with the "
                              "student, rate answers, start the next mission."),  # fmt: skip
) -> None:
    """Start a local swarm, distil the built-in model into a 10-layer student together (shake, train,
    checkpoint), pull it, see it published as the swarm's model, served by a peer that never trained it, asked
    and rated through /v1 and exported to GGUF, and show held-out KL before and after; every peer is stopped at
    the end (unless --keep)."""
    import os

    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    from garden.demo import DemoSettings, run_demo

    settings = DemoSettings(
        peers=peers, prompts=prompts, epochs=epochs, target_batch_size=target_batch_size, http_port=http_port,
        work_dir=work_dir, keep=keep,
    )  # fmt: skip
    raise typer.Exit(run_demo(settings))
