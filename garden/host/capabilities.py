"""What this machine can do: cores, memory, GPU, load; and which roles it can take.

The role thresholds are what the built-in 135M-parameter model needs with headroom: a shaker holds
the teacher (fp32 weights ~0.55 GB plus sampling activations), a trainer holds a student with its
optimizer state and activations (~4x the weights), a server holds a slice of layers and KV caches.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from garden.protocol.records import ALL_ROLES, GpuInfo, Role

logger = logging.getLogger(__name__)

GiB = 1024**3
MIN_AVAILABLE_RAM: dict[Role, int] = {"shaker": 2 * GiB, "trainer": 3 * GiB, "server": 1 * GiB}


@dataclass(frozen=True)
class MachineInfo:
    cores: int
    ram_bytes: int
    available_ram_bytes: int
    gpu: GpuInfo | None


def probe_machine() -> MachineInfo:
    memory = psutil.virtual_memory()
    return MachineInfo(
        cores=os.cpu_count() or 1,
        ram_bytes=int(memory.total),
        available_ram_bytes=int(memory.available),
        gpu=probe_gpu(),
    )


def probe_gpu() -> GpuInfo | None:
    """The first CUDA device torch sees, if any. A broken driver is reported as no GPU, not a crash.

    A CPU build of torch sees none, and is not imported to say so: an idle daemon holds no torch (220 MB)."""
    if not torch_has_gpu_build():
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return GpuInfo(name=str(props.name), memory_bytes=int(props.total_memory))
    except Exception as e:  # a half-installed CUDA stack must not stop a CPU peer
        logger.warning("GPU probe failed, continuing on the CPU: %s", e)
        return None


def torch_has_gpu_build() -> bool:
    """Whether the installed torch was built for CUDA or ROCm, read from its ``version.py`` without importing it
    (True when that cannot be read: then torch is asked)."""
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return False
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError, ImportError):
        return True
    built: dict[str, object] = {}
    for node in tree.body:  # ``cuda: Optional[str] = None`` or ``cuda = '12.4'``
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        value = getattr(node, "value", None)
        for target in targets:
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                built[target.id] = value.value
    if "cuda" not in built and "hip" not in built:
        return True
    return bool(built.get("cuda") or built.get("hip"))


def possible_roles(machine: MachineInfo) -> list[Role]:
    """Roles whose memory need fits this machine (GPU memory counts for the model-holding roles)."""
    budget = machine.available_ram_bytes + (machine.gpu.memory_bytes if machine.gpu else 0)
    return [role for role in ALL_ROLES if budget >= MIN_AVAILABLE_RAM[role]]


def choose_roles(requested: list[Role] | None, machine: MachineInfo) -> tuple[list[Role], dict[str, str]]:
    """(roles taken, reasons for roles not taken). Requested roles are honoured but warned about."""
    skipped: dict[str, str]
    possible = possible_roles(machine)
    budget = machine.available_ram_bytes + (machine.gpu.memory_bytes if machine.gpu else 0)
    if requested is None:
        skipped = {
            role: f"needs {MIN_AVAILABLE_RAM[role] / GiB:.0f} GiB of free RAM plus GPU memory, "
            f"{budget / GiB:.1f} GiB available"
            for role in ALL_ROLES
            if role not in possible
        }
        return possible, skipped
    for role in requested:
        if role not in possible:
            logger.warning("role %s was requested but this machine may not have the memory for it", role)
    return sorted(requested), {}


def machine_load() -> float:
    """Whole-machine CPU utilisation since the previous call, 0..1 (the first call returns 0)."""
    return min(1.0, max(0.0, psutil.cpu_percent(interval=None) / 100.0))
