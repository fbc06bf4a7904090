"""Communal Garden: volunteers' PCs distil, train and serve small language models together."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

__version__ = "0.1.0"

DEFERRED_MODULES = ("scipy.optimize",)
"""Modules that ``import hivemind`` loads and only an averaging round's load balancing uses
(``hivemind.averaging.load_balancing``): loaded at their first use instead. scipy.optimize is 38 MB of every
garden process's memory (an idle daemon's is ~410 MB, benchmarks/startup.py), and most never average."""


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module until something reads a name of it, then loads it and steps aside.

    Not importlib's ``LazyLoader``: that loads on any attribute, and torch's import reads ``__file__`` of every
    module in ``sys.modules`` (``inspect.getmodule``). This one answers the module's dunders from its spec and
    loads only for the module's own names."""

    def __init__(self, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(spec.name)
        self.__spec__, self.__file__, self.__loader__ = spec, spec.origin, spec.loader
        self.__package__ = spec.parent
        if spec.submodule_search_locations is not None:
            self.__path__ = list(spec.submodule_search_locations)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(_load(self.__name__), name)

    def __dir__(self) -> list[str]:
        return dir(_load(self.__name__))


def _load(name: str) -> types.ModuleType:
    """The real module (loaded now if only its stand-in is there), in ``sys.modules`` and on its parent."""
    if isinstance(sys.modules.get(name), _Deferred):
        del sys.modules[name]
    return _bind(name, importlib.import_module(name))


def _bind(name: str, module: types.ModuleType) -> types.ModuleType:
    """``module`` as ``name`` in ``sys.modules`` and as its parent package's attribute (what an import does)."""
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _defer(name: str) -> None:
    """Put a stand-in for ``name`` in ``sys.modules``; a module already imported, or not installed, is left be."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)  # imports the parent package (scipy's own __init__ is light)
    except ImportError:
        return
    if spec is None:
        return
    _bind(name, _Deferred(spec))


for _name in DEFERRED_MODULES:
    _defer(_name)
