"""The built-in demo prompt set (garden/data): shape, splits, correctness, reproducibility, packaging."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from decimal import Decimal
from importlib.resources import files
from pathlib import Path

import pytest

from garden.data import DEMO_PROMPTS, DEMO_PROMPTS_FILE, TOPICS, demo_prompts
from garden.protocol.rows import PromptRow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_demo_prompts.py"


def _topic(row: PromptRow) -> str:
    return row.meta["topic"]


def test_name_and_size() -> None:
    assert DEMO_PROMPTS == "builtin:demo"
    rows = demo_prompts("all")
    assert len(rows) >= 200
    assert len(demo_prompts("train")) + len(demo_prompts("heldout")) == len(rows)


def test_rows_are_strictly_valid_with_short_references() -> None:
    raw = files("garden.data").joinpath(DEMO_PROMPTS_FILE).read_text(encoding="utf-8")
    lines = raw.splitlines()
    assert raw.endswith("\n") and all(lines)
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"prompt", "reference", "meta"}
        assert set(record["meta"]) == {"topic", "split"}
        row = PromptRow.model_validate(record, strict=True)
        assert row.prompt.strip() == row.prompt and row.prompt.endswith("?")
        assert row.reference and row.reference.strip() == row.reference
        assert len(row.reference.split()) <= 30, row.reference
        assert row.meta["topic"] in TOPICS
        assert row.meta["split"] in ("train", "heldout")
    assert len(demo_prompts("all")) == len(lines)


def test_no_duplicate_prompts() -> None:
    prompts = [row.prompt for row in demo_prompts("all")]
    assert len(set(prompts)) == len(prompts)


def test_splits_disjoint_and_heldout_share_per_topic() -> None:
    train, heldout = demo_prompts("train"), demo_prompts("heldout")
    assert train and heldout
    assert all(row.meta["split"] == "train" for row in train)
    assert all(row.meta["split"] == "heldout" for row in heldout)
    assert not {row.prompt for row in train} & {row.prompt for row in heldout}
    totals = Counter(_topic(row) for row in demo_prompts("all"))
    held = Counter(_topic(row) for row in heldout)
    assert set(totals) == set(TOPICS) == {"capitals", "units", "arithmetic", "definitions"}
    for topic in TOPICS:
        assert 0.15 <= held[topic] / totals[topic] <= 0.25, (topic, held[topic], totals[topic])
    # roughly balanced
    assert max(totals.values()) <= 2 * min(totals.values())


def test_default_split_is_train_and_unknown_split_rejected() -> None:
    assert demo_prompts() == demo_prompts("train")
    with pytest.raises(ValueError, match="unknown split"):
        demo_prompts("test")  # type: ignore[arg-type]


def test_returned_rows_do_not_alias_the_cache() -> None:
    first = demo_prompts("all")
    first[0].meta["split"] = "tampered"
    first.clear()
    again = demo_prompts("all")
    assert again and again[0].meta["split"] in ("train", "heldout")


ARITH = re.compile(r"^What is (\d+) ([+×-]) (\d+)\?$")
ARITH_REF = re.compile(r"^(\d+) ([+×-]) (\d+) = (-?\d+)\.$")


def test_arithmetic_references_are_right() -> None:
    rows = [row for row in demo_prompts("all") if _topic(row) == "arithmetic"]
    ops = Counter()
    for row in rows:
        q = ARITH.match(row.prompt)
        r = ARITH_REF.match(row.reference or "")
        assert q and r, row
        a, op, b = int(q[1]), q[2], int(q[3])
        assert (int(r[1]), r[2], int(r[3])) == (a, op, b)
        expected = {"+": a + b, "-": a - b, "×": a * b}[op]
        assert int(r[4]) == expected, row
        ops[op] += 1
    assert set(ops) == {"+", "-", "×"}


UNITS_Q = re.compile(r"^How many ([a-z]+) are in (\d+(?:\.\d+)?) ([a-z]+)\?$")
UNITS_REF = re.compile(r"^(\d+(?:\.\d+)?) ([a-z]+) is (\d+(?:\.\d+)?) ([a-z]+)\.$")
# unit -> (quantity, size in a base unit: centimetres, grams, minutes, millilitres)
UNIT_SIZES = {
    "centimetre": ("length", Decimal(1)),
    "metre": ("length", Decimal(100)),
    "kilometre": ("length", Decimal(100_000)),
    "gram": ("mass", Decimal(1)),
    "kilogram": ("mass", Decimal(1000)),
    "minute": ("time", Decimal(1)),
    "hour": ("time", Decimal(60)),
    "millilitre": ("volume", Decimal(1)),
    "litre": ("volume", Decimal(1000)),
}


def _unit(name: str, amount: Decimal) -> tuple[str, Decimal]:
    singular = name[:-1] if name.endswith("s") else name
    assert singular in UNIT_SIZES, name
    assert (name == singular) == (amount == 1), f"{amount} {name}: wrong number"
    return UNIT_SIZES[singular]


def test_unit_references_are_right() -> None:
    rows = [row for row in demo_prompts("all") if _topic(row) == "units"]
    quantities = Counter()
    for row in rows:
        q = UNITS_Q.match(row.prompt)
        r = UNITS_REF.match(row.reference or "")
        assert q and r, row
        assert q[1].endswith("s")  # "How many <plural> ..."
        assert (r[1], r[2]) == (q[2], q[3])  # the reference restates the amount asked about
        value, result = Decimal(r[1]), Decimal(r[3])
        src_qty, src_size = _unit(r[2], value)
        dst_qty, dst_size = _unit(r[4], result)
        assert r[4].rstrip("s") == q[1].rstrip("s")
        assert src_qty == dst_qty and src_size != dst_size, row
        assert value * src_size == result * dst_size, row
        quantities[src_qty] += 1
    assert set(quantities) == {"length", "mass", "time", "volume"}


def test_capitals_and_definitions_shape() -> None:
    for row in demo_prompts("all"):
        if _topic(row) == "capitals":
            m = re.fullmatch(r"What is the capital of (.+)\?", row.prompt)
            assert m and (row.reference or "").startswith(f"The capital of {m[1]} is "), row
        elif _topic(row) == "definitions":
            assert row.prompt.startswith(("What is ", "What are ")), row
            assert (row.reference or "").endswith("."), row


def test_generator_is_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "regenerated.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True)
    packaged = files("garden.data").joinpath(DEMO_PROMPTS_FILE).read_bytes()
    assert out.read_bytes() == packaged, "garden/data/demo_prompts.jsonl is stale: run scripts/make_demo_prompts.py"


def test_found_through_importlib_resources() -> None:
    resource = files("garden.data").joinpath(DEMO_PROMPTS_FILE)
    assert resource.is_file()
    assert len(resource.read_text(encoding="utf-8").splitlines()) == len(demo_prompts("all"))


def test_shipped_in_the_wheel_and_loadable_from_it(tmp_path: Path) -> None:
    """Build a wheel from a copy of the project, then load the set from the wheel alone (zip import)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "garden", src / "garden", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(dist)], cwd=src, check=True, capture_output=True, text=True)
    wheel = dist / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        assert f"garden/data/{DEMO_PROMPTS_FILE}" in zf.namelist()
        assert (
            zf.read(f"garden/data/{DEMO_PROMPTS_FILE}") == (ROOT / "garden" / "data" / DEMO_PROMPTS_FILE).read_bytes()
        )
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import garden.data as d; "
        "assert d.__file__.startswith(sys.argv[1]), d.__file__; "
        "print(len(d.demo_prompts('all')))"
    )
    # outside the source tree, so that neither the cwd nor the editable install supplies the package
    done = subprocess.run(
        [sys.executable, "-c", probe, str(wheel)], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert int(done.stdout.strip()) == len(demo_prompts("all"))
