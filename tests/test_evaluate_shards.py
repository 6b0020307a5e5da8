"""``evaluate --shard K/N`` and ``merge`` (issues 10 and 13, item 1): two shards merged, then the
run finished on the merged folder, equal the unsharded run record for record; the shards split
whole chains (an image shard's clean verdict and attacks) and none twice; usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from byo_helpers import cli, tiny_convnet_folder
from prepdefense.experiments import evaluation as V
from prepdefense.experiments.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "toy_models:tiny_convnet", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return tiny_convnet_folder(tmp_path_factory.mktemp("evaluate-shard-images"), 8, seed=5)


def _args(images, out, *extra):
    return ["evaluate", *TINY, "--defense", "rand", "--norm", "linf", "--n", "6", "--shard-size", "2", "--budget", "quick",
            "--seed", "2", "--data", str(images), "--out", str(out), "--quiet", *extra]


def _units(folder: Path):
    """Every stored unit's records and summary, by id (the timings left out)."""
    store = ResultStore(folder)
    out = {}
    for u in store.units(V.EXPERIMENT):
        summary = dict(u.get("summary") or {})
        info = dict(summary.pop("info", None) or {})
        info.pop("seconds", None)
        summary.pop("seconds", None)
        out[u["unit_id"]] = (u["status"], u["records"], summary, info)
    return out


def test_two_shards_merged_then_finished_equal_one_run(images, tmp_path, capsys):
    one = tmp_path / "one"
    code, _, err = cli(capsys, *_args(images, one))
    assert code == 0, err
    shards = [tmp_path / "s1", tmp_path / "s2"]
    for k, folder in enumerate(shards, 1):
        code, text, err = cli(capsys, *_args(images, folder, "--shard", f"{k}/2"))
        assert code == 0, err
        assert f"shard {k}/2" in text and "prepdefense merge" in text
        assert not (folder / "card.json").exists()  # a shard has no verdict of its own
    s1, s2 = (set(_units(f)) for f in shards)
    assert s1 and s2 and not s1 & s2
    # Whole chains: an image shard's clean verdict and all its attacks are in one shard.
    chains = lambda ids: {u.rsplit("/", 1)[1] for u in ids}  # noqa: E731
    assert not chains(s1) & chains(s2) and chains(s1) | chains(s2) == {"s0", "s1", "s2"}
    assert not any("/curve/" in u or "check-" in u for u in s1 | s2)  # these need every image shard

    merged = tmp_path / "merged"
    code, text, err = cli(capsys, "merge", str(merged), *map(str, shards))
    assert code == 0, err
    assert "finish with 'prepdefense evaluate'" in text and not (merged / "report.md").exists()
    code, text, err = cli(capsys, *_args(images, merged))
    assert code == 0, err
    assert f"{len(s1 | s2)} already done" in err  # every attack reused; the checks and the curve ran

    whole, combined = _units(one), _units(merged)
    assert whole.keys() == combined.keys()
    for uid in whole:
        assert whole[uid] == combined[uid], uid
    a, b = (json.loads((f / "card.json").read_text()) for f in (one, merged))
    assert a["per_image"] == b["per_image"] and a["ensemble"] == b["ensemble"] and a["curve"] == b["curve"]
    assert a["flags"]["warnings"] == b["flags"]["warnings"]
    # merge copies the kept examples' tensors too: the merged run's examples are the whole run's
    import torch

    ea, eb = (torch.load(f / "adversarial.pt", weights_only=False) for f in (one, merged))
    assert eb["missing"] == [] and ea["ids"] == eb["ids"] and torch.equal(ea["adversarial"], eb["adversarial"])


@pytest.mark.parametrize("extra, message", [
    (["--shard", "3/2"], "numbered from 1 to 2"),
    (["--shard", "half"], "give K/N"),
    (["--shard", "1/2", "--json"], "--json prints the card"),
])
def test_shard_usage_errors(images, tmp_path, capsys, extra, message):
    code, _, err = cli(capsys, *_args(images, tmp_path / "x", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_shard_needs_out(images, capsys):
    args = [a for a in _args(images, "unused") if a not in ("--out", "unused")]
    code, _, err = cli(capsys, *args, "--shard", "1/2")
    assert code == 2 and "--shard 1/2 needs --out" in err


def test_a_store_copied_without_its_cache_finishes_and_says_which_examples_are_missing(images, tmp_path, capsys):
    """A run resumed elsewhere from its units alone (cache/ left behind: the kept examples'
    tensors) gives the same figures, and its examples file and card say which rows hold the
    clean image instead of the kept example, rather than passing them off as adversarial."""
    import shutil

    import torch

    one = tmp_path / "one"
    code, _, err = cli(capsys, *_args(images, one))
    assert code == 0, err
    first = json.loads((one / "card.json").read_text())
    ex = torch.load(one / "adversarial.pt", weights_only=False)
    assert ex["missing"] == []
    attacked = [i for i, k in zip(ex["ids"], ex["kept_from"]) if k != "clean"]
    assert attacked, "the toy run kept no adversarial example; the test needs one"

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(one / "units", moved / "units")
    shutil.copy(one / "run.json", moved / "run.json")
    code, _, err = cli(capsys, *_args(images, moved))
    assert code == 0, err
    assert "kept example(s) are not in adversarial.pt" in err
    card = json.loads((moved / "card.json").read_text())
    assert card["ensemble"] == first["ensemble"] and card["per_image"] == first["per_image"]
    assert any("kept example(s) are not in adversarial.pt" in n for n in card["notes"])
    again = torch.load(moved / "adversarial.pt", weights_only=False)
    assert again["missing"] == attacked
    clean = torch.load(moved / "cache" / "sample.pt", weights_only=False)
    for name in attacked:
        row = again["ids"].index(name)
        assert torch.equal(again["adversarial"][row], clean["x"][clean["ids"].index(name)])
        assert not torch.equal(again["adversarial"][row], ex["adversarial"][row])


    # A cache file that is there but lacks one image's tensor: that image alone is missing.
    partial = tmp_path / "partial"
    shutil.copytree(one, partial)
    store = ResultStore(partial)
    name = attacked[0]
    cached_files = sorted((partial / "cache" / V.EXPERIMENT).rglob("*.pt"))
    hit = [f for f in cached_files if name in torch.load(f, weights_only=False)["ids"]]
    assert len(hit) == 1, hit
    rel = hit[0].relative_to(partial / "cache").with_suffix("").as_posix()
    t = store.load_tensors(rel)
    keep = [i for i, n in enumerate(t["ids"]) if n != name]
    store.save_tensors(rel, {"ids": [t["ids"][i] for i in keep], "adversarial": t["adversarial"][keep]})
    code, _, err = cli(capsys, *_args(images, partial))
    assert code == 0, err
    third = torch.load(partial / "adversarial.pt", weights_only=False)
    assert third["missing"] == [name]
    for row, other in enumerate(third["ids"]):
        assert torch.equal(third["adversarial"][row], again["adversarial"][row] if other == name else ex["adversarial"][row])
