"""``reproduce --shard K/N`` and ``prepdefense merge`` (issue 13, item 1): two shards merged equal
one unsharded run, record for record (same seed, CPU); shards of different runs are refused
with one line; missing and repeated shards are reported.

Uses ``test_reproduce.py``'s tiny classifier and generated image folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prepdefense.cli.main import main
from prepdefense.errors import PrepDefenseError
from prepdefense.experiments import registry, sharding
from prepdefense.experiments import units as U
from prepdefense.experiments.merge import ShardMismatchError, merge_shards
from prepdefense.experiments.store import ConfigMismatchError, ResultStore

from test_reproduce import SMALL, _run, image_folder  # noqa: F401 - image_folder is a fixture

#: Four protocol images in image shards of 2; Table 1, Tables 2-3, Fig. 4 and the strong attack.
OVERRIDES = {**SMALL, "n_images": 4, "shard_size": 2}
ONLY = ["table1", "table2", "table3", "fig4", "strong"]


def _timing(key: str) -> bool:
    """Fields that measure time, not results (``seconds``, ``cpu_seconds``, ``attack_seconds``...)."""
    return key == "seconds" or key.endswith("_seconds")


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if not _timing(k)}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _stored(out: Path):
    """Every experiment's records and every unit (status, error, summary), timing left out."""
    st = ResultStore(out)
    records = {e: _strip_timing(st.records(e)) for e in st.experiments()}
    units = {u["unit_id"]: _strip_timing({k: u[k] for k in ("status", "error", "summary", "key", "records")}) for u in st.units()}
    return records, units


def _quiet(**kw):
    return dict(stream=open(os.devnull, "w"), **kw)


def test_two_shards_merged_equal_one_run(tmp_path, image_folder):
    full = _run(tmp_path / "full", image_folder, only=ONLY, overrides=OVERRIDES)
    assert full.failed == 0 and full.planned > 4
    s1 = _run(tmp_path / "s1", image_folder, only=ONLY, overrides=OVERRIDES, shard="1/2")
    s2 = _run(tmp_path / "s2", image_folder, only=ONLY, overrides=OVERRIDES, shard=sharding.ShardSpec(2, 2))
    # The shards split the plan: each runs some units, none twice, all of them together.
    assert s1.ran > 0 and s2.ran > 0 and s1.ran + s2.ran == full.planned
    ids1 = {u["unit_id"] for u in ResultStore(tmp_path / "s1").units()}
    ids2 = {u["unit_id"] for u in ResultStore(tmp_path / "s2").units()}
    assert not ids1 & ids2 and len(ids1 | ids2) == full.planned
    cfg1 = json.loads((tmp_path / "s1" / "run.json").read_text())
    assert cfg1["identity"]["shard"] == {"index": 1, "count": 2} and sorted(cfg1["shard"]["units"]) == sorted(ids1)

    # Merged in the other order: the order of the shards does not matter.
    outcome = merge_shards(tmp_path / "merged", [tmp_path / "s2", tmp_path / "s1"], stream=open(os.devnull, "w"))
    assert (outcome.missing_shards, outcome.duplicate_shards, outcome.missing_units, outcome.failed_units) == ([], [], [], [])
    assert outcome.units == full.planned

    rec_full, units_full = _stored(tmp_path / "full")
    rec_merged, units_merged = _stored(tmp_path / "merged")
    assert rec_full.keys() == rec_merged.keys() and all(rec_full[e] for e in ("table1", "table2", "table3", "fig4", "strong"))
    assert rec_merged == rec_full  # record for record
    assert units_merged == units_full
    # The merged views, tables and report read as the unsharded run's.
    for exp in rec_full:
        lines = lambda out: [_strip_timing(json.loads(l)) for l in (out / "results" / f"{exp}.jsonl").read_text().splitlines()]  # noqa: E731
        assert lines(tmp_path / "merged") == lines(tmp_path / "full"), exp
    csvs = sorted(p.name for p in (tmp_path / "full" / "tables").glob("*.csv"))
    assert csvs and csvs == sorted(p.name for p in (tmp_path / "merged" / "tables").glob("*.csv"))
    for name in csvs:
        assert (tmp_path / "merged" / "tables" / name).read_text() == (tmp_path / "full" / "tables" / name).read_text(), name
    report = lambda out: (out / "report.md").read_text().split("## Run metadata")[0]  # noqa: E731
    assert report(tmp_path / "merged") == report(tmp_path / "full")
    merged_cfg = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert merged_cfg["identity"] == json.loads((tmp_path / "full" / "run.json").read_text())["identity"]
    assert [m["shard"] for m in merged_cfg["merged_from"]] == ["2/2", "1/2"]

    # The merged folder is the unsharded run: resuming it with the same arguments has nothing to do.
    again = _run(tmp_path / "merged", image_folder, only=ONLY, overrides=OVERRIDES)
    assert (again.already_done, again.ran) == (full.planned, 0)


def test_merge_refuses_shards_of_different_runs(tmp_path, image_folder, capsys):
    ov = {**OVERRIDES, "table2_attacks": OVERRIDES["table2_attacks"][:1]}
    _run(tmp_path / "a1", image_folder, only=["table2"], overrides=ov, shard="1/2")
    _run(tmp_path / "b2", image_folder, only=["table2"], overrides=ov, shard="2/2", seed=5)
    with pytest.raises(ShardMismatchError, match=r"different runs \(seed: 0 vs 5\)"):
        merge_shards(tmp_path / "m", [tmp_path / "a1", tmp_path / "b2"], **_quiet())
    # Through the CLI: exit status 2 and one line on stderr, nothing written.
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "a1"), str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shards of different runs" in err and "seed: 0 vs 5" in err, err
    assert not (tmp_path / "m" / "report.md").exists()

    # Another split (N) and an unsharded folder are refused too.
    _run(tmp_path / "c", image_folder, only=["table2"], overrides=ov, shard="1/3")
    with pytest.raises(ShardMismatchError, match="shard of 2 but .* shard of 3"):
        merge_shards(tmp_path / "m", [tmp_path / "a1", tmp_path / "c"], **_quiet())
    _run(tmp_path / "full", image_folder, only=["table2"], overrides=ov)
    with pytest.raises(ShardMismatchError, match="unsharded run"):
        merge_shards(tmp_path / "m", [tmp_path / "a1", tmp_path / "full"], **_quiet())
    # A shard's store refuses another shard (the shard is part of its identity).
    with pytest.raises(ConfigMismatchError, match="shard"):
        _run(tmp_path / "a1", image_folder, only=["table2"], overrides=ov, shard="2/2")


def test_merge_reports_missing_and_repeated_shards(tmp_path, image_folder, capsys):
    ov = {**OVERRIDES, "table2_attacks": OVERRIDES["table2_attacks"][:1]}
    _run(tmp_path / "s1", image_folder, only=["table2"], overrides=ov, shard="1/2")
    with pytest.raises(ShardMismatchError, match=r"shard\(s\) 2/2 missing.*--allow-missing"):
        merge_shards(tmp_path / "m", [tmp_path / "s1"], **_quiet())
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s1"), str(tmp_path / "s1"), "--allow-missing"]) == 0
    err = capsys.readouterr().err
    assert "shard(s) 1 given more than once" in err and "shard(s) 2 of 2 missing" in err, err
    merged = ResultStore(tmp_path / "m")
    assert {u["unit_id"] for u in merged.units()} == {u["unit_id"] for u in ResultStore(tmp_path / "s1").units()}
    assert (tmp_path / "m" / "report.md").is_file()


def test_shard_split_is_balanced_and_keeps_shared_work_together():
    for name in ("quick", "paper"):
        plan = registry.plan(U.PRESETS[name])
        for n in (1, 2, 3, 7):
            shard_of = sharding.assign(plan, n)
            assert sorted(set(shard_of)) == list(range(1, n + 1))
            parts = [sharding.select(plan, sharding.ShardSpec(k, n)) for k in range(1, n + 1)]
            assert sorted(u.id for p in parts for u in p) == sorted(u.id for u in plan)  # a partition
            # A Table 2 attack and the Tables 3-4 rows on its examples share a shard; so do the
            # approximator and the BPDA units through it.
            by_group = {}
            for u, s in zip(plan, shard_of):
                assert by_group.setdefault(sharding.group_key(u), s) == s
            costs = [c for _, c in sharding.split_summary(plan, n)]
            biggest = max(sum(u.cost for u in plan if sharding.group_key(u) == k) for k in by_group)
            assert max(costs) - min(costs) <= biggest + 1e-6  # greedy balance: within one group's cost
        assert sharding.assign(plan, 2) == sharding.assign(list(plan), 2)  # deterministic


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "x", "1-2", "-1/2"])
def test_bad_shard_spec_is_a_one_line_usage_error(tmp_path, image_folder, capsys, text):
    with pytest.raises(PrepDefenseError, match="--shard"):
        sharding.parse_shard(text)
    rc = main(["reproduce", "--data", str(image_folder), "--out", str(tmp_path / "o"), "--preset", "smoke", f"--shard={text}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--shard" in err, err
    assert not (tmp_path / "o").exists()


def test_an_images_records_do_not_depend_on_its_image_shard(tmp_path, image_folder):
    """Units key each image's draws by the image's own id (``RunContext.image_key``): the same
    images in image shards of 1 or of 2 get the same draws, attacks and verdicts."""
    ov = {**OVERRIDES, "table2_attacks": OVERRIDES["table2_attacks"][:1]}
    only = ["table1", "table2", "table3", "fig4"]
    _run(tmp_path / "by2", image_folder, only=only, overrides=ov)
    _run(tmp_path / "by1", image_folder, only=only, overrides={**ov, "shard_size": 1})

    def per_image(out):
        st = ResultStore(out)
        return {(e, r["defense"], r["attack"], r["variant"], r["image_id"]): {k: v for k, v in r.items() if k not in ("unit", "shard")}
                for e in st.experiments() for r in st.records(e)}

    a, b = per_image(tmp_path / "by2"), per_image(tmp_path / "by1")
    assert a.keys() == b.keys() and {k[0] for k in a} == set(only) and len(a) >= 4 * 4
    for k in a:
        floats = {f for f, v in a[k].items() if isinstance(v, float)}  # l2, linf: batch-size rounding
        assert {f: v for f, v in a[k].items() if f not in floats} == {f: v for f, v in b[k].items() if f not in floats}, k
        assert {f: a[k][f] for f in floats} == pytest.approx({f: b[k][f] for f in floats}, rel=1e-5, abs=1e-6), k


def test_cli_shards_and_merge(tmp_path, image_folder, capsys):
    """The commands themselves: two `reproduce --shard` processes, then `merge`."""
    from test_reproduce import _child

    base = ["reproduce", "--data", str(image_folder), "--preset", "h7test", "--model", "h7-tiny", "--device", "cpu",
            "--quiet", "--only", "table2,table3"]
    for k in (1, 2):
        proc = _child(tmp_path, 0.0, *base, "--out", str(tmp_path / f"s{k}"), "--shard", f"{k}/2")
        log, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0 and f"shard {k}/2" in log, log
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "s1"), str(tmp_path / "s2")]) == 0
    captured = capsys.readouterr()
    assert "merged shards 1, 2 of 2" in captured.err and "report:" in captured.out
    st = ResultStore(tmp_path / "merged")
    # h7test: 4 image shards x (1 attack) for Table 2, 4 x (clean + attack) for Table 3.
    assert len(st.units("table2", status="ok")) == 4 and len(st.units("table3", status="ok")) == 8
    assert (tmp_path / "merged" / "report.md").is_file()
    # Merging into a folder that holds another run, or into one of the shards, is refused in one line.
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--allow-missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds another run" in err, err
    assert main(["merge", str(tmp_path / "s2"), str(tmp_path / "s1"), str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is also one of the shards" in err, err
