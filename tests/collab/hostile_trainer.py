"""A hostile swarm trainer, for tests: the same mission, student and optimizer as an honest worker, but every
gradient it sends is NaN (and so, after its own updates, is every parameter it offers). It talks to
hivemind directly, without garden's checks, as a broken or malicious peer would.

Run as ``python tests/collab/hostile_trainer.py CONFIG.json`` with a worker's configuration; it writes
``{"peer_id": ..., "steps": ...}`` to the status path and runs until SIGTERM or ``max_epochs``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch
    from hivemind import DHT

    from garden.collab.trainer import make_optimizer
    from garden.models.student import StudentSpec, build_student
    from garden.collab.worker import WorkerConfig

    config = WorkerConfig.model_validate_json(Path(sys.argv[1]).read_text())

    def leave(*_: object) -> None:
        # no orderly goodbye: it may be stuck in a round that its NaN spoiled; take its children along
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    stop = threading.Event()
    torch.set_num_threads(1)
    collab = config.collab
    dht = DHT(initial_peers=config.initial_peers, host_maddrs=config.host_maddrs, start=True)
    student = build_student(StudentSpec(base=config.student.base))
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = make_optimizer(dht, config.mission_id, params, collab)
    steps = 0
    try:
        while not stop.is_set() and opt.local_epoch < collab.max_epochs:
            for p in params:
                p.grad = torch.full_like(p, float("nan"))
            opt.step()
            opt.zero_grad()
            steps += 1
            config.status_path.write_text(json.dumps({"peer_id": dht.peer_id.to_base58(), "steps": steps,
                                                       "epoch": opt.local_epoch}))
            time.sleep(0.02)  # about an honest tiny worker's pace
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
