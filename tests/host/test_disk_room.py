"""Downloads within ``--max-disk``: the room a peer has for a hub model, and the unused hub models it prunes
from its data dir when over the cap (a model being loaded or in memory stays)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from garden.host.disk import FREE_MARGIN, DiskKeeper
from garden.models import cache, loading
from garden.protocol.row_sets import RowsAnnouncement
from garden.store import Store


class NoMissions:
    peer_id = "me"
    missions: Mapping[str, object] = {}

    async def holders(self, mission_id: str) -> Mapping[str, RowsAnnouncement]:
        return {}

    def wake(self) -> None:
        pass


class NoCheckpoints:
    def local(self, mission_id: str) -> list[object]:
        return []


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir whose hub cache is garden's own (as ``garden run`` sets it up)."""
    monkeypatch.delenv(cache.HUB_CACHE_ENV, raising=False)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "conversions"))  # a user's own choice is kept
    cache.use_data_dir(tmp_path / "data" / "models")
    yield tmp_path / "data"
    os.environ.pop(cache.HUB_CACHE_ENV, None)


def fake_download(root: Path, hub_id: str, size: int) -> Path:
    """What ``from_pretrained`` leaves in a hub cache: blobs, and a snapshot linking to them."""
    entry = cache.hub_entry(hub_id, root)
    (entry / "blobs").mkdir(parents=True)
    (entry / "blobs" / "weights").write_bytes(b"\0" * size)
    (entry / "blobs" / "config").write_text("{}")
    snapshot = entry / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    (snapshot / "model.safetensors").symlink_to(entry / "blobs" / "weights")
    (snapshot / "config.json").symlink_to(entry / "blobs" / "config")
    return entry


def test_a_daemon_keeps_its_models_in_its_data_dir(data_dir: Path, tmp_path: Path) -> None:
    assert cache.hub_cache_dir() == str(data_dir / "models" / "hub")
    assert cache.cache_dir() == tmp_path / "conversions"  # GARDEN_CACHE_DIR set by the user wins
    assert not cache.is_hub_cached("org/small")
    fake_download(data_dir / "models" / "hub", "org/small", 1000)
    assert cache.is_hub_cached("org/small")
    assert loading.model_disk_bytes("org/small") == 0  # downloaded: nothing more to fill
    (found,) = cache.cached_hub_models()
    assert (found.ref, found.size) == ("org/small", 1008)  # blobs and refs; the links not at all


def test_room_is_what_the_cap_and_the_disk_leave(data_dir: Path) -> None:
    store = Store(data_dir / "garden.sqlite3")
    free = shutil.disk_usage(data_dir).free - FREE_MARGIN
    keeper = DiskKeeper(data_dir, 50_000_000, store, NoMissions(), NoCheckpoints())
    assert keeper.room() == min(free, 50_000_000)  # not measured yet: the cap is all there is
    asyncio.run(keeper.check())
    assert 0 < keeper.used < 1_000_000 and keeper.room() == min(free, 50_000_000 - keeper.used)
    assert keeper.shortfall(1000) is None
    refusal = keeper.shortfall(200 * 2**20)
    assert refusal is not None and "about 200 MiB to download" in refusal and "--max-disk 48 MiB" in refusal
    uncapped = DiskKeeper(data_dir, None, store, NoMissions(), NoCheckpoints())
    # the free space at the call, read just before and just after it: the other test workers write to this disk
    # meanwhile (a reading from the test's start was off by their files)
    before = shutil.disk_usage(data_dir).free - FREE_MARGIN
    room = uncapped.room()
    after = shutil.disk_usage(data_dir).free - FREE_MARGIN
    assert min(before, after) <= room <= max(before, after), (before, room, after)
    assert "(free disk)" in (uncapped.shortfall(shutil.disk_usage(data_dir).total + 1) or "")  # more than the disk
    store.close()


def test_over_the_cap_unused_hub_models_go_least_recent_first(
    data_dir: Path, tmp_path: Path, model_cache: Path
) -> None:
    from harness.trainers import make_tiny_student

    hub = data_dir / "models" / "hub"
    old = fake_download(hub, "org/old", 400_000)
    recent = fake_download(hub, "org/recent", 400_000)
    for path in [old, *old.rglob("*")]:
        os.utime(path, (1_000, 1_000), follow_symlinks=False)
    # a real model in the hub cache, loaded from there offline, as a daemon loads a mission's hub teacher
    student = make_tiny_student(tmp_path / "student")
    snapshot = cache.hub_entry("org/loaded", hub) / "snapshots" / "abc123"
    shutil.copytree(student, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # from the cache alone: no request leaves this machine
    loaded = loading.load_model("org/loaded")
    try:
        assert loaded.source == "org/loaded" and loading.in_use("org/loaded")
        store = Store(data_dir / "garden.sqlite3")
        keeper = DiskKeeper(data_dir, 300_000, store, NoMissions(), NoCheckpoints())
        plan = asyncio.run(keeper.check())
        store.close()
    finally:
        loading.unload_model("org/loaded")
    assert [item.key for item in plan] == [str(old), str(recent)]
    assert not old.exists() and not recent.exists() and snapshot.exists()  # the model in use stays
    assert keeper.note is not None and "a model in use" in keeper.note  # still over the cap, and says why


class CountingPulls:
    """Stands in for the swarm's checkpoint sharing: a refused student must never reach it."""

    def __init__(self) -> None:
        self.pulls = 0

    async def pull(self, *args: object, **kwargs: object) -> tuple[Path, object]:
        self.pulls += 1
        raise AssertionError("a student that does not fit was pulled")


def test_a_published_student_bigger_than_the_room_is_refused_before_a_pull(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mission:<id>`` on first use: its files must fit what ``--max-disk`` leaves, as a hub model's do; a student
    already here (the exact checkpoint the record names) is used without a pull, room or not."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from garden.errors import Unavailable
    from garden.mission.students import Student, SwarmStudents
    from garden.protocol.checkpoints import StudentRecord
    from harness.trainers import make_tiny_student
    from tests.protocol.test_mission_validator import student

    monkeypatch.setenv(cache.STUDENTS_ENV, str(data_dir / "models" / "students"))
    store = Store(data_dir / "garden.sqlite3")
    keeper = DiskKeeper(data_dir, 2_000_000, store, NoMissions(), NoCheckpoints())
    asyncio.run(keeper.check())
    sharing = CountingPulls()
    students = SwarmStudents(None, sharing, None, None, None, tmp_path / "students", disk=keeper)  # type: ignore[arg-type]
    record: StudentRecord = student(rsa.generate_private_key(65537, 2048), "ab" * 32, size=50 * 2**20)
    wanted = Student(record, None, True, None)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match=r"mission:abababababab \(capitals\) is not pulled: about 50 MiB to "
                       r"download, \d MiB of room \(--max-disk 2 MiB\)"):  # fmt: skip
        asyncio.run(students.ensure(wanted))
    assert sharing.pulls == 0
    here = make_tiny_student(data_dir / "pulled" / "capitals")
    cache.note_student_dir(record.mission_id, here, record.epoch, record.manifest_sha256)
    assert asyncio.run(students.ensure(wanted)) == here and sharing.pulls == 0
    store.close()
