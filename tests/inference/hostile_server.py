"""A hostile layer server, for tests: the real ``garden run`` (same daemon, same RPC handlers), except that
every layer range it serves adds noise to the hidden states it returns, runs slower than it could, and
announces a throughput of 1e9 layer-tokens per second (the most a record may claim) to attract routes.

Run as ``python tests/inference/hostile_server.py run ARGS...`` with the ``garden`` command's arguments.
``HOSTILE_NOISE`` (default 0.1): the noise's standard deviation, as a fraction of each token's spread (0.1
changes greedy answers within a few tokens; honest servers differ by under 1e-4). ``HOSTILE_SLOWDOWN``
(default 2): each forward pass takes this many times its own time (it sleeps the rest); ``HOSTILE_DELAY``
(seconds, default 0) is slept on top of that, whatever the machine's load.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    from garden.inference.blocks import Blocks, LayerSpan
    from garden.inference.server import BlockServer
    from garden.protocol.blocks import BlocksRecord

    noise = float(os.environ.get("HOSTILE_NOISE", "0.1"))
    slowdown = float(os.environ.get("HOSTILE_SLOWDOWN", "2"))
    delay = float(os.environ.get("HOSTILE_DELAY", "0"))
    honest_forward, honest_record = Blocks.forward, BlockServer.record

    def forward(self: Blocks, hidden: Any, cache: Any, sub: LayerSpan | None = None) -> Any:
        started = time.perf_counter()
        out = honest_forward(self, hidden, cache, sub)
        time.sleep(max(0.0, slowdown - 1) * (time.perf_counter() - started) + delay)
        return out + noise * out.std(dim=-1, keepdim=True) * torch.randn(out.shape) if noise else out

    def record(self: BlockServer) -> BlocksRecord:
        return honest_record(self).model_copy(update={"throughput": 1e9})

    Blocks.forward = forward  # type: ignore[method-assign]
    BlockServer.record = record  # type: ignore[method-assign]
    from garden.cli import main as garden

    sys.argv = ["garden", *sys.argv[1:]]
    garden()


if __name__ == "__main__":
    main()
