"""Communal Garden: volunteers' PCs distil, train and serve small language models together."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

DEFERRED_MODULES = ("scipy.optimize",)
"""Modules that ``import hivemind`` loads and only an averaging round's load balancing uses
(``hivemind.averaging.load_balancing``): loaded at their first use instead. scipy.optimize is 38 MB of every
garden process's memory (an idle daemon's is ~410 MB, benchmarks/startup.py), and most never average."""
DEFERRED_PACKAGES = ("hivemind", "hivemind.utils", "hivemind.dht")
"""Packages whose ``__init__`` is not run: each name they export loads only the submodule it comes from. Their
``__init__`` imports torch (averaging, ``MPFuture``, ``TensorDescriptor``, the ``DHT`` process class), which is
220 MB of memory, while the DHT node, the p2p client and the records an idle daemon needs do not use it
(``garden.net.dht_thread``): with these, a daemon loads torch only when it has torch work to do."""


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


class _DeferredPackage(_Deferred):
    """Stands in ``sys.modules`` for a package whose ``__init__`` only gathers names from its submodules: a name
    read loads just its submodule. Submodules import as usual (``__path__`` is the package's). It stays the package
    for good (never swapped for a module that ran the ``__init__``): everyone holds one and the same object, so
    what is set on it (a test's ``monkeypatch``) is seen by all."""

    def __init__(self, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(spec)
        self._exports = _exports(spec)

    def __getattr__(self, name: str) -> Any:
        if name in self._exports:  # ``__version__`` among them
            module, attribute = self._exports[name]
            value = getattr(importlib.import_module(module), attribute) if module else attribute
        elif name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        else:  # a submodule; the __init__ defines nothing else
            try:
                value = importlib.import_module(f"{self.__name__}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{self.__name__}.{name}":  # the submodule is there, something it imports is not
                    raise
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted({*self._exports, *self.__dict__})


def _exports(spec: importlib.machinery.ModuleSpec) -> dict[str, tuple[str | None, Any]]:
    """What a package's ``__init__`` defines: name -> (module, name there), or (None, value) for a constant."""
    exports: dict[str, tuple[str | None, Any]] = {}
    assert spec.origin is not None
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else f"{spec.name.rsplit('.', node.level - 1)[0]}.{node.module}"
            for alias in node.names:
                exports[alias.asname or alias.name] = (base, alias.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    exports[target.id] = (None, node.value.value)
    return exports


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


def _defer(name: str, stand_in: type[_Deferred] = _Deferred) -> None:
    """Put a stand-in for ``name`` in ``sys.modules``; a module already imported, or not installed, is left be."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)  # imports the parent package (scipy's own __init__ is light)
    except ImportError:
        return
    if spec is None:
        return
    _bind(name, stand_in(spec))


for _name in DEFERRED_PACKAGES:
    _defer(_name, _DeferredPackage)
for _name in DEFERRED_MODULES:
    _defer(_name)
