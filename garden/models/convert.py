"""``python -m garden.models.convert GGUF OUT``: one GGUF file converted into a transformers directory, in a
process of its own (see :func:`garden.models.loading.converted_gguf`, which runs it and puts the result in
place)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from garden.lifecycle import watch_parent
from garden.models.loading import convert_gguf_here


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python -m garden.models.convert GGUF OUT", file=sys.stderr)
        return 2
    watch_parent(os.getppid())  # a daemon that stops mid-conversion leaves no converter behind
    convert_gguf_here(Path(sys.argv[1]), Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
