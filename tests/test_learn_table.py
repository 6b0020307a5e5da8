"""``prepdefense learn-table`` (Algorithm 2 end to end) on a toy linear model and a tiny
folder, fast: images disjoint from the evaluation sample, metadata recorded, table shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from prepdefense.defenses.quant_tables import load_table
from prepdefense.experiments.learn_table import learn_table

SIDE = 32


class ToyLinear(nn.Module):
    """1000-class linear classifier on 32x32 images (with ``input_size`` like the real models)."""

    input_size = SIDE

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(3 * SIDE * SIDE, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.03)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture()
def toy_folder(tmp_path):
    """10 random PNGs labelled with the toy model's own prediction (all correctly classified)."""
    model = ToyLinear().eval()
    rng = np.random.default_rng(0)
    rows = ["file,label,wnid,name"]
    from prepdefense.data import load_dataset

    for i in range(10):
        arr = (rng.random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    # decode exactly as the data API does, then label by the model's prediction
    rows_tmp = rows + [f"img{i}.png,0,n00000000,x" for i in range(10)]
    (tmp_path / "labels.csv").write_text("\n".join(rows_tmp) + "\n")
    ds = load_dataset(tmp_path, size=SIDE)
    assert len(ds) == 10
    with torch.no_grad():
        preds = [int(model(ds[i][0][None]).argmax()) for i in range(len(ds))]
    rows += [f"img{i}.png,{preds[i]},n00000000,x" for i in range(10)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path, model


def test_learn_table_end_to_end(toy_folder, tmp_path):
    folder, model = toy_folder
    out = tmp_path / "table.json"
    summary = learn_table(data=str(folder), out=out, n=4, seed=1, exclude_sample_seed=0, exclude_n=3,
                          exclude_usability_n=2, steps=30, binary_steps=2, initial_const=1.0, batch_size=3, model=model,
                          model_name="toy-linear")
    table, meta = load_table(out)
    assert table.shape == (8, 8)
    assert table.min() >= 20 - 1e-9 and table.max() == pytest.approx(100.0)
    assert summary["n_successful"] == meta["n_successful"] >= 1
    counts = np.array(meta["counts"])
    # every 8x8 block of every channel of every successful pair is counted once
    assert counts.sum() == meta["n_successful"] * 3 * (SIDE // 8) ** 2
    ids = meta["image_ids"]
    excluded = meta["excluded_evaluation_sample"]["ids"]
    assert len(ids) == 4 and len(excluded) == 3
    assert not set(ids) & set(excluded)
    # nor any of the images usability measures clean accuracy on (its own seeded order)
    from prepdefense.data import load_dataset
    from prepdefense.experiments.usability import usability_sample

    ds = load_dataset(str(folder), size=SIDE)
    usable = [ds.ids[i] for i in usability_sample(model, ds, seed=0, n=2)]
    assert meta["excluded_usability_sample"]["ids"] == usable and not set(ids) & set(usable)
    for key in ("model", "attack_settings", "seed", "success_rate", "targets", "run"):
        assert key in meta
    assert meta["model"] == "toy-linear"
    assert meta["attack_settings"]["steps"] == 30 and meta["attack_settings"]["binary_search_steps"] == 2
    assert "versions" in meta["run"] and "time" in meta["run"]
    assert all(t != y for t, y in zip(meta["targets"], meta["labels"]))
    json.loads(out.read_text())  # valid JSON on disk


def test_cli_parser_has_the_documented_options():
    from prepdefense.cli.main import build_parser

    args = build_parser().parse_args(
        ["learn-table", "--data", "d", "--out", "o.json", "--n", "5", "--exclude-sample-seed", "3",
         "--exclude-n", "10", "--steps", "7", "--binary-steps", "2", "--seed", "4", "--device", "cpu", "--json"])
    assert (args.n, args.exclude_sample_seed, args.exclude_n, args.steps, args.binary_steps, args.seed) == (5, 3, 10, 7, 2, 4)
    assert args.json and args.device == "cpu"
    # the C&W flag also under the name `attack --attack cw` gives it
    alias = build_parser().parse_args(["learn-table", "--data", "d", "--out", "o.json", "--binary-search-steps", "3"])
    assert alias.binary_steps == 3


def test_shipped_table_records_its_provenance():
    from prepdefense.defenses.quant_tables import LEARNED_TABLE_PATH

    if not LEARNED_TABLE_PATH.is_file():
        pytest.skip("no learned table shipped")
    table, meta = load_table(LEARNED_TABLE_PATH)
    assert table.shape == (8, 8) and float(table.max()) == pytest.approx(100.0)
    for key in ("model", "image_ids", "attack_settings", "seed", "success_rate", "run"):
        assert key in meta
    assert not set(meta["image_ids"]) & set(meta["excluded_evaluation_sample"]["ids"])
    # the shipped table was learned with usability's 200 images kept out too (issue 15, item 1)
    usability = meta["excluded_usability_sample"]
    assert usability["n"] == len(usability["ids"]) == 200 and not set(meta["image_ids"]) & set(usability["ids"])
    # ... at issue 15's budget: >= 100 images, C&W >= 5 binary-search steps x >= 200 iterations, all of them run
    settings = meta["attack_settings"]
    assert meta["n_images"] >= 100 and settings["binary_search_steps"] >= 5 and settings["steps"] >= 200
    assert settings["abort_early"] is False and meta["iterations_run"]["mean_per_binary_step"] == settings["steps"]


def test_learn_table_resumes_a_killed_run_to_the_same_table(toy_folder, tmp_path, monkeypatch):
    """A run stopped after its first batch resumes from the checkpoint: only the missing batches
    are attacked and the table equals an uninterrupted run's (issue 15, item 1)."""
    from prepdefense.attacks import carlini_wagner
    from prepdefense.errors import DataError

    folder, model = toy_folder
    kw = dict(data=str(folder), n=4, seed=1, exclude_sample_seed=0, exclude_n=3, steps=20, binary_steps=1,
              initial_const=1.0, batch_size=2, model=model, model_name="toy-linear")
    whole = learn_table(out=tmp_path / "whole.json", **kw)

    calls = []
    real_run = carlini_wagner.CarliniWagnerL2.run

    def dying_run(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_run(self, *a, **k)

    monkeypatch.setattr(carlini_wagner.CarliniWagnerL2, "run", dying_run)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        learn_table(out=out, **kw)
    assert not out.exists() and len(list((tmp_path / "resumed.json.partial").glob("batch-*.pt"))) == 1
    calls.clear()
    monkeypatch.setattr(carlini_wagner.CarliniWagnerL2, "run", real_run)
    counted = []
    monkeypatch.setattr(carlini_wagner.CarliniWagnerL2, "run", lambda self, *a, **k: counted.append(1) or real_run(self, *a, **k))
    resumed = learn_table(out=out, **kw)
    assert len(counted) == 1  # only the missing batch
    assert resumed["table"] == whole["table"] and resumed["metadata"]["resumed_images"] == 2
    # the iterations C&W actually ran (abort early) and the c of each best example, resumed too
    runs = whole["metadata"]["iterations_run"]
    assert runs["budget_per_binary_step"] == 20 and len(runs["per_batch_and_binary_step"]) == 2
    assert all(len(b) == 1 and 1 <= b[0] <= 20 for b in runs["per_batch_and_binary_step"])
    assert resumed["metadata"]["iterations_run"] == runs
    assert resumed["metadata"]["const_of_best"] == whole["metadata"]["const_of_best"]
    # the attack's time per batch, whichever invocation ran it, and their sum
    timing = resumed["metadata"]["attack_seconds"]
    assert len(timing["per_batch"]) == 2 and all(t is not None and t >= 0 for t in timing["per_batch"])
    assert timing["total"] == pytest.approx(sum(timing["per_batch"]), abs=0.11)
    # without abort early every iteration runs (and the checkpoints of the other setting are not reused)
    full = learn_table(out=tmp_path / "full.json", abort_early=False, **kw)
    assert full["metadata"]["iterations_run"]["per_batch_and_binary_step"] == [[20], [20]]
    assert full["metadata"]["attack_settings"]["abort_early"] is False
    # checkpoints written before the iterations and c were kept still resume (those batches say None)
    old = tmp_path / "old.json"
    monkeypatch.setattr(carlini_wagner.CarliniWagnerL2, "run", dying_run)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        learn_table(out=old, **kw)
    (part,) = (tmp_path / "old.json.partial").glob("batch-*.pt")
    saved = torch.load(part, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k not in ("const", "iterations", "seconds")}, part)
    monkeypatch.setattr(carlini_wagner.CarliniWagnerL2, "run", real_run)
    resumed_old = learn_table(out=old, **kw)
    assert resumed_old["table"] == whole["table"]
    assert resumed_old["metadata"]["iterations_run"]["per_batch_and_binary_step"][0] is None
    assert resumed_old["metadata"]["const_of_best"][:2] == [None, None]
    assert resumed_old["metadata"]["attack_seconds"]["per_batch"][0] is None
    assert resumed_old["metadata"]["attack_seconds"]["total"] is None
    assert not (tmp_path / "resumed.json.partial").exists()
    # a checkpoint folder from other settings is refused, and --fresh clears it
    (tmp_path / "other.json.partial").mkdir()
    (tmp_path / "other.json.partial" / "identity.json").write_text('{"model": "something else"}')
    with pytest.raises(DataError, match="other settings"):
        learn_table(out=tmp_path / "other.json", **kw)
    assert learn_table(out=tmp_path / "other.json", fresh=True, **kw)["table"] == whole["table"]


def test_too_few_usability_images_names_the_flag(toy_folder, tmp_path):
    from prepdefense.errors import DataError

    folder, model = toy_folder
    with pytest.raises(DataError, match="--exclude-usability-n"):
        learn_table(data=str(folder), out=tmp_path / "t.json", n=2, seed=1, exclude_sample_seed=0, exclude_n=0,
                    exclude_usability_n=50, steps=2, binary_steps=1, model=model, model_name="toy-linear")
