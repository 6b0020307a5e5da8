"""The results store of ``prepdefense reproduce`` (issue 5, "Resumable and safe")."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch

from prepdefense.experiments import store as store_mod
from prepdefense.experiments.store import (
    ConfigMismatchError,
    ResultStore,
    StoreLockedError,
    atomic_write_bytes,
    dedupe_records,
)


def _records(n, tag="a"):
    return [{"image_id": f"img{i}", "correct": i % 2 == 0, "tag": tag} for i in range(n)]


def test_unit_roundtrip_and_view(tmp_path):
    st = ResultStore(tmp_path).open()
    key = {"defense": "none", "attack": "clean", "shard": 0}
    st.write_unit("table3", "table3/none/clean/s0", key=key, records=_records(3), summary={"n": 3}, seconds=1.5)
    assert st.is_done("table3", "table3/none/clean/s0")
    assert not st.is_done("table3", "table3/none/clean/s1")
    recs = st.records("table3")
    assert [r["image_id"] for r in recs] == ["img0", "img1", "img2"]
    assert all(r["unit"] == "table3/none/clean/s0" and r["defense"] == "none" and r["kind"] == "image" for r in recs)
    view = st.read_view("table3")
    assert view == recs
    lines = (tmp_path / "results" / "table3.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["image_id"] == "img0"


def test_error_units_are_not_done(tmp_path):
    st = ResultStore(tmp_path).open()
    st.write_unit("fig4", "fig4/x/bpda/s0", key={}, records=[], status="error", error="not available: no such attack")
    assert not st.is_done("fig4", "fig4/x/bpda/s0")
    assert st.units("fig4", status="error")[0]["error"].startswith("not available")
    assert st.records("fig4") == []


def test_dedupe_by_key():
    recs = [
        {"unit": "u", "image_id": "a", "v": 1},
        {"unit": "u", "image_id": "a", "v": 2},
        {"unit": "u", "image_id": "b", "v": 3},
        {"unit": "u", "image_id": None, "kind": "unit", "v": 4},
        {"unit": "v", "image_id": "a", "v": 5},
    ]
    assert [r["v"] for r in dedupe_records(recs)] == [1, 3, 4, 5]


def test_merging_units_from_two_machines_keeps_one_copy(tmp_path):
    a, b = ResultStore(tmp_path / "a").open(), ResultStore(tmp_path / "b").open()
    for st in (a, b):
        st.write_unit("t", "t/u0", key={}, records=_records(2, "x"))
    b.write_unit("t", "t/u1", key={}, records=_records(2, "y"))
    # Merging = copying unit files together; a duplicated unit (same content, other copy)
    # placed under another name must still be read once.
    for p in (tmp_path / "b" / "units" / "t").glob("*.json"):
        (tmp_path / "a" / "units" / "t" / p.name).write_bytes(p.read_bytes())
    dup = next((tmp_path / "b" / "units" / "t").glob("t__u0.*.json"))
    (tmp_path / "a" / "units" / "t" / ("copy-" + dup.name)).write_bytes(dup.read_bytes())
    recs = a.records("t")
    assert sorted((r["unit"], r["image_id"]) for r in recs) == [("t/u0", "img0"), ("t/u0", "img1"), ("t/u1", "img0"), ("t/u1", "img1")]


def _crashing_writer(path, big):
    # Write a large payload through atomic_write_bytes, but die (SIGKILL) in the middle of
    # the write: the destination must not appear (or must keep its old content).
    import builtins

    real_open = builtins.open

    def dying_open(p, mode="r", *a, **k):
        fh = real_open(p, mode, *a, **k)
        if "w" in mode and ".tmp-" in str(p):
            orig = fh.write

            def write(data):
                orig(data[: len(data) // 2])
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            fh.write = write
        return fh

    builtins.open = dying_open
    atomic_write_bytes(Path(path), big)


def test_kill_mid_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "units" / "exp" / "u.json"
    atomic_write_bytes(target, b'{"old": true}')
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_crashing_writer, args=(str(target), b"x" * 1_000_000))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"old": True}  # old content intact, no torn file
    leftovers = list(target.parent.glob(".*.tmp-*"))
    assert leftovers, "the killed writer should have left its temporary file behind"
    st = ResultStore(tmp_path)
    assert st.clean_temporaries() == len(leftovers)
    assert not list(target.parent.glob(".*.tmp-*"))


def test_kill_mid_unit_write_is_not_a_done_unit(tmp_path):
    st = ResultStore(tmp_path).open()

    def child():
        _crashing_writer(st.unit_path("e", "e/u0"), json.dumps({"unit_id": "e/u0", "status": "ok", "records": []}).encode())

    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert not st.is_done("e", "e/u0")
    assert st.units("e") == []


def test_exception_mid_write_removes_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.json"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"data")
    assert not target.exists()
    assert not list(tmp_path.glob(".*"))


def test_config_mismatch_refused_and_fresh(tmp_path):
    st = ResultStore(tmp_path).open()
    cfg = {"identity": {"seed": 0, "preset": "smoke"}, "device": "cpu"}
    assert st.check_or_write_config(cfg) is False
    assert st.check_or_write_config({**cfg, "device": "cuda"}) is True  # device may change
    with pytest.raises(ConfigMismatchError, match="seed"):
        st.check_or_write_config({"identity": {"seed": 1, "preset": "smoke"}})
    st.write_unit("t", "t/u", key={}, records=_records(1))
    (tmp_path / "mine.txt").write_text("user file")
    st.reset()
    assert st.read_config() is None and not (tmp_path / "units").exists()
    assert (tmp_path / "mine.txt").read_text() == "user file"  # --fresh deletes only our files
    assert st.check_or_write_config({"identity": {"seed": 1}}) is False


def test_config_mismatch_names_the_nested_field_not_the_whole_preset(tmp_path):
    st = ResultStore(tmp_path).open()
    preset = {"name": "quick", "n": 10, "eot": 4, "attacks": [{"name": "apgd-ce", "steps": 20}] * 5}
    st.check_or_write_config({"identity": {"seed": 0, "preset": preset}})
    with pytest.raises(ConfigMismatchError) as e:
        st.check_or_write_config({"identity": {"seed": 0, "preset": {**preset, "eot": 8}}})
    message = str(e.value)
    assert "preset.eot: 4 -> 8" in message and "apgd-ce" not in message and "--fresh" in message


def test_tensor_cache_roundtrip(tmp_path):
    st = ResultStore(tmp_path).open()
    assert st.load_tensors("table2/pgd/s0") is None
    x = torch.rand(2, 3, 4, 4)
    st.save_tensors("table2/pgd/s0", {"adversarial": x, "ids": ["a", "b"]})
    back = st.load_tensors("table2/pgd/s0")
    assert torch.equal(back["adversarial"], x) and back["ids"] == ["a", "b"]
    (st.cache_path("broken")).write_bytes(b"not a torch file")
    assert st.load_tensors("broken") is None


def _hold_lock(root, ready, release):
    st = ResultStore(Path(root))
    st.lock()
    ready.set()
    release.wait(20)


def test_lock_refuses_second_writer(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(20)
        with pytest.raises(StoreLockedError):
            ResultStore(tmp_path).lock()
    finally:
        os.kill(p.pid, signal.SIGKILL)  # a killed holder releases the lock
        p.join(20)
    st = ResultStore(tmp_path)
    st.lock()
    st.unlock()


def test_unit_file_names_are_unique_and_safe():
    a = store_mod.unit_file_name("fig4/bpda/dct-distort/s0")
    b = store_mod.unit_file_name("fig4/bpda/dct distort/s0")
    assert a != b and "/" not in a and " " not in b and a.endswith(".json")


def test_table_hint_only_when_the_defense_name_is_the_same(tmp_path):
    st = ResultStore(tmp_path).open()
    st.check_or_write_config({"identity": {"defense": "dct-distort", "defense_state": "aaa", "seed": 0}})
    with pytest.raises(ConfigMismatchError, match="values behind the defense's name"):
        st.check_or_write_config({"identity": {"defense": "dct-distort", "defense_state": "bbb", "seed": 0}})
    with pytest.raises(ConfigMismatchError) as err:  # another --defense: the user's change, no blame on the table
        st.check_or_write_config({"identity": {"defense": "jpeg", "defense_state": "ccc", "seed": 0}})
    assert "defense: 'dct-distort' -> 'jpeg'" in str(err.value)
    assert "values behind" not in str(err.value) and "dct-distort[table=NAME]" not in str(err.value)


def test_no_table_hint_when_the_users_table_file_changed(tmp_path):
    st = ResultStore(tmp_path).open()
    st.check_or_write_config({"identity": {"defense": "dct-distort[table=my.json]", "defense_state": "aaa",
                                           "defense_files": {"my.json": "111"}}})
    with pytest.raises(ConfigMismatchError) as err:
        st.check_or_write_config({"identity": {"defense": "dct-distort[table=my.json]", "defense_state": "bbb",
                                               "defense_files": {"my.json": "222"}}})
    assert "defense_files.my.json: '111' -> '222'" in str(err.value) and "values behind" not in str(err.value)


def test_units_name_the_revision_version_and_device_of_the_invocation_that_wrote_them(tmp_path):
    """A run resumed by another tree (or on another device) mixes units: each says which wrote it."""
    meta = lambda rev, dev: {"git_revision": rev, "device": dev, "versions": {"prepdefense": "0.1.0", "torch": "x"}}  # noqa: E731
    st = ResultStore(tmp_path).open()
    st.write_unit("t", "t/before", key={}, records=_records(1))  # no configuration yet: nothing to name
    assert st.check_or_write_config({"identity": {"seed": 0}, "metadata": meta("aaa", "cpu")}) is False
    st.write_unit("t", "t/first", key={}, records=_records(1))
    again = ResultStore(tmp_path).open()
    assert again.check_or_write_config({"identity": {"seed": 0}, "metadata": meta("bbb", "cuda:0")}) is True
    again.write_unit("t", "t/second", key={}, records=_records(1))
    assert "written_by" not in again.load_unit("t", "t/before")
    assert again.load_unit("t", "t/first")["written_by"] == {"git_revision": "aaa", "prepdefense": "0.1.0", "device": "cpu"}
    assert again.load_unit("t", "t/second")["written_by"] == {"git_revision": "bbb", "prepdefense": "0.1.0", "device": "cuda:0"}
    no_git = ResultStore(tmp_path / "other").open()
    no_git.check_or_write_config({"identity": {}, "metadata": {"git_revision": None, "device": "cpu"}})
    no_git.write_unit("t", "t/u", key={}, records=[])
    assert no_git.load_unit("t", "t/u")["written_by"] == {"device": "cpu"}
