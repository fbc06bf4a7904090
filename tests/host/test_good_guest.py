"""The good guest's parts on their own, with real processes, real psutil readings and a real store: the
owner's pause (kept across restarts, ending by itself), the CPU budget holding a busy thread to its
share, idle-only mode yielding to another program's load, the contribution ledger, and the disk plan
that never deletes the last copy of a row set."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from garden.cli.control import parse_duration
from garden.host.contribution import Ledger
from garden.host.disk import Prunable, plan_pruning
from garden.host.governor import Governor
from garden.host.idle import IdleConfig, IdleWatch
from garden.store import Store

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def test_a_pause_is_kept_in_the_store_and_ends_by_itself(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    governor = Governor(store)
    changes: list[bool] = []
    governor.on_change(lambda: changes.append(governor.paused))
    assert not governor.paused and governor.working_state() == "working"
    governor.pause(serving=True)
    assert governor.paused and governor.serving_paused and governor.hold() is True
    store.close()
    store = Store(tmp_path / "s.sqlite3")  # a restart
    again = Governor(store)
    assert again.paused and again.pause_state.serving and again.pause_state.until is None
    again.resume()
    assert not Governor(store).paused
    short = Governor(store).start()
    short.pause(for_s=0.3)
    assert short.paused and short.working_state().startswith("paused for")
    time.sleep(0.6)
    assert not short.paused and not Governor(store).paused  # ended by itself, and the store knows
    short.stop()
    assert changes == [True]
    with pytest.raises(ValueError):
        short.pause(for_s=-1)
    store.set_meta("pause", "{not json")
    assert not Governor(store).paused  # an unreadable pause starts unpaused (and says so in the log)
    store.close()


def test_hold_returns_at_once_when_nothing_holds_work() -> None:
    governor = Governor(None)
    started = time.monotonic()
    for _ in range(1000):
        assert governor.hold() is False
    assert time.monotonic() - started < 1.0
    assert governor.hold(lambda: True) is True


BUDGETED = """
import json, sys, threading, time
import psutil
from garden.host.cpu_budget import TreeCpu
from garden.host.governor import Governor
cap = float(sys.argv[1])
budget = Governor(None, cap, root_pid=psutil.Process().pid).start().budget
stop = threading.Event()
def work():
    while not stop.is_set():
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        budget.wait()
tree = TreeCpu(psutil.Process().pid)
tree.read()
threading.Thread(target=work, daemon=True).start()
time.sleep(4.0)
spent = tree.read()
stop.set()
print(json.dumps({"share": spent / 4.0 / (psutil.cpu_count() or 1), "held": budget.held_s, "usage": budget.usage()}))
"""


@pytest.mark.serial  # measures CPU shares: alone on the machine
def test_the_cpu_budget_holds_a_busy_thread_to_its_share() -> None:
    """A thread that burns CPU in 5 ms slices, asking the budget between slices, uses about the cap of the
    machine (here a quarter of one core). In a process of its own: another test's threads would count."""
    cores = psutil.cpu_count() or 1
    cap = 0.25 / cores
    done = subprocess.run([sys.executable, "-c", BUDGETED, str(cap)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    share = result["share"]
    assert share <= cap * 1.3 + 0.02, f"used {share:.3f} of the machine, cap {cap:.3f}"
    assert share >= cap * 0.4, f"the budget starved the work: {share:.3f} of the machine, cap {cap:.3f}"
    assert result["held"] > 1.0
    assert result["usage"] is not None and result["usage"] <= cap * 1.5 + 0.02


@pytest.mark.serial  # needs a machine nobody else loads
def test_idle_mode_holds_work_while_another_program_is_busy_and_resumes_after_quiet() -> None:
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the peer's tree: idle
    try:
        watch = IdleWatch(IdleConfig(threshold=0.3, quiet_s=1.0), root_pid=peer.pid)
        deadline = time.monotonic() + 5
        while watch.held and time.monotonic() < deadline:  # a quiet machine: work may start
            watch.sample()
            time.sleep(0.1)
        assert not watch.held, watch.reason
        cores = psutil.cpu_count() or 1
        owner = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=3)]) for _ in range(cores)]
        started = time.monotonic()
        while not watch.held and time.monotonic() - started < 5:
            watch.sample()
            time.sleep(0.1)
        held_after = time.monotonic() - started
        assert watch.held and "busy" in (watch.reason or ""), watch.reason
        assert held_after <= 2.0, f"took {held_after:.1f} s to notice the owner's work"
        for proc in owner:
            proc.wait(10)
        done = time.monotonic()
        while watch.held and time.monotonic() - done < 8:
            watch.sample()
            time.sleep(0.1)
        assert not watch.held and time.monotonic() - done >= 1.0  # only after the quiet period
    finally:
        peer.kill()
        peer.wait()


def test_the_ledger_keeps_contribution_across_restarts(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    ledger = Ledger(store)
    ledger.add("rows_shaken", 8, "m1")
    ledger.add("shards_shaken", 1, "m1")
    ledger.add("rows_shaken", 4, "m2")
    ledger.add("samples_trained", 32, "m1")
    ledger.add("tokens_served", 100)
    assert ledger.totals().rows_shaken == 12  # pending counts show before they are written
    ledger.flush()
    with pytest.raises(ValueError):
        ledger.add("karma", 1)
    store.close()
    store = Store(tmp_path / "s.sqlite3")
    again = Ledger(store)
    again.add("rows_shaken", 1, "m2")
    total = again.totals()
    assert (total.rows_shaken, total.shards_shaken, total.samples_trained, total.tokens_served) == (13, 1, 32, 100)
    assert total.hours_online > 0
    missions = again.by_mission()
    assert set(missions) == {"m1", "m2"} and missions["m2"].rows_shaken == 5 and missions["m1"].samples_trained == 32
    store.close()


def _rows(key: str, size: int, age: float, elsewhere: int, replica: bool = True, won: bool = True) -> Prunable:
    return Prunable("rows", "m", key, size, added_at=age, replica=replica, holders_elsewhere=elsewhere, won=won)


def _ckpt(key: str, size: int, age: float, newest: bool = False) -> Prunable:
    return Prunable("checkpoint", "m", key, size, added_at=age, newest=newest)


def test_disk_pruning_never_takes_the_last_copy_of_a_row_set() -> None:
    items = [
        _rows("only-here", 500, 1.0, elsewhere=0),
        _rows("own-sampled", 500, 2.0, elsewhere=3, replica=False),
        _rows("copy-old", 100, 3.0, elsewhere=1),
        _rows("copy-new", 100, 9.0, elsewhere=1),
        _rows("copy-well-held", 100, 8.0, elsewhere=2),
        _rows("lost-only-here", 50, 7.0, elsewhere=0, won=False),
        _rows("lost-held-elsewhere", 50, 6.0, elsewhere=2, won=False),
        _rows("own-lost", 50, 1.0, elsewhere=0, replica=False, won=False),
        _ckpt("ckpt-1", 1000, 1.0),
        _ckpt("ckpt-2", 1000, 2.0, newest=True),
        Prunable("model", "", "models--org--recent", 3000, added_at=5.0),
        Prunable("model", "", "models--org--old", 3000, added_at=4.0),
        Prunable("model", "", "models--org--loaded", 3000, added_at=1.0, newest=True),
    ]
    assert plan_pruning(items, used=1000, cap=2000) == []
    plan = [i.key for i in plan_pruning(items, used=20_000, cap=0)]
    # copies of sets that did not win first (oldest first: nobody trains on them, no "last copy" to keep);
    # then winning copies held most widely, then the oldest; then old checkpoints; then unused models, least
    # recent first; never the rest (the last copy of a winner, what this peer sampled, the newest checkpoint)
    assert plan == [
        "lost-held-elsewhere", "lost-only-here", "copy-well-held", "copy-old", "copy-new", "ckpt-1",
        "models--org--old", "models--org--recent",
    ]  # fmt: skip
    assert [i.key for i in plan_pruning(items, used=2250, cap=2000)] == [
        "lost-held-elsewhere", "lost-only-here", "copy-well-held", "copy-old",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d", 86400)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2x", "-5m", "0", "1h tomorrow"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_pause_endpoints_refuse_bad_bodies_and_keep_the_state(tmp_path: Path) -> None:
    """The owner's controls on the HTTP port: bad bodies are 422 and change nothing; good ones are kept."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from garden.api.control import make_control_router
    from garden.api.openai import install_openai_errors

    store = Store(tmp_path / "s.sqlite3")
    governor, ledger = Governor(store), Ledger(store)
    app = FastAPI()
    app.include_router(make_control_router(governor, ledger, False))
    install_openai_errors(app)  # as the daemon's app: a JSON body whatever its content type
    client = TestClient(app)
    for bad in ({"for_s": -5}, {"for_s": 0}, {"for_s": "soon"}, {"for_s": 10**9}, {"serving": "maybe"}):
        assert client.post("/pause", json=bad).status_code == 422, bad
    assert client.post("/pause", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.get("/pause").json()["paused"] is False and not Governor(store).paused
    paused = client.post("/pause", content=b'{"for_s": 60, "serving": true}').json()  # curl -d: no content type
    assert paused["paused"] and paused["serving"] and paused["until"] - paused["since"] == pytest.approx(60)
    assert Governor(store).paused  # kept
    assert client.post("/resume").json()["paused"] is False
    ledger.add("rows_shaken", 3, "m")
    given = client.get("/contribution").json()
    assert given["total"]["rows_shaken"] == 3 and given["missions"]["m"]["rows_shaken"] == 3
    store.close()
