"""Loading a pairs file the way TRL does, with ``datasets``, in a process of its own (``datasets`` leaves a
multiprocessing resource tracker behind, which the tests' check for stray children would count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_LOAD = (
    "import datasets, json, sys\n"
    "rows = datasets.load_dataset('json', data_files=sys.argv[1], split='train')\n"
    "print(json.dumps({'columns': rows.column_names, 'rows': rows.to_list()}))\n"
)


def load_with_datasets(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The column names and rows ``datasets.load_dataset("json", data_files=path)`` reads."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/tmp"),
           "HF_DATASETS_CACHE": str(path.parent / ".datasets-cache")}  # its cache beside the file, not in ~
    done = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, timeout=300,
                          check=False, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    return loaded["columns"], loaded["rows"]
