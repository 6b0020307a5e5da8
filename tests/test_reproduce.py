"""``prepdefense reproduce`` (issue 5): report structure, resumption after SIGKILL, same seed ->
same records, a missing piece -> a recorded "not available" rather than a crash.

A tiny deterministic classifier (48x48 inputs, 1000 logits) stands in for EfficientNet so the
tests run in seconds; labels of a generated image folder are set to its predictions so the
protocol sample (images classified correctly) exists. The subprocess tests register the tiny
model and a slow fake attack inside the child process only (never in the pytest process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prepdefense.draws import DRAW_SCHEME
from prepdefense.experiments import registry
from prepdefense.experiments import units as U
from prepdefense.experiments.report import SECTION_HEADINGS
from prepdefense.experiments.reproduce import ReproduceConfig, reproduce
from prepdefense.experiments.store import ConfigMismatchError, ResultStore

TINY_MODEL_SRC = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class TinyClassifier(nn.Module):
        """48x48 [0,1] NCHW -> 1000 logits; weights from a fixed seed (deterministic)."""

        input_size = 48

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1234)
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.fc = nn.Linear(8 * 16, 1000)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, x):
            z = torch.relu(self.conv(x * 2 - 1))
            z = nn.functional.adaptive_avg_pool2d(z, 4).flatten(1)
            return self.fc(z)
    '''
)

_ns: dict = {}
exec(TINY_MODEL_SRC, _ns)  # noqa: S102 - the same source runs in the child processes
TinyClassifier = _ns["TinyClassifier"]

CHILD_SRC = TINY_MODEL_SRC + textwrap.dedent(
    '''
    import sys, time
    from prepdefense import attacks, models
    from prepdefense.attacks.base import AttackResult
    from prepdefense.experiments import units as U

    models.register("h7-tiny")(lambda weights=None: TinyClassifier())

    class SlowStep:
        """One signed gradient step toward the target, after a pause (so a run can be killed mid-way)."""

        def __init__(self, *, eps=0.03, sleep=0.0):
            self.eps, self.sleep = eps, sleep

        def __call__(self, model, x, *, labels, targets=None, generator=None):
            time.sleep(self.sleep)
            x = x.detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(x), targets, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            adv = (x - self.eps * g.sign()).clamp(0, 1).detach()
            with torch.no_grad():
                success = model(adv).argmax(1) == targets
            return AttackResult(adversarial=adv, success=success)

    attacks.register("h7-slow-step")(lambda **kw: SlowStep(**kw))
    U.PRESETS["h7test"] = U.PRESETS["smoke"].with_overrides(
        name="h7test", n_images=4, shard_size=1, eval_draws=2,
        table2_attacks=(U.AttackSpec("Slow step", "h7-slow-step", (("eps", 0.03), ("sleep", float(sys.argv[1])))),),
    )
    from prepdefense.cli.main import main

    sys.exit(main(sys.argv[2:]))
    '''
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Six 64x64 images with labels.csv; labels = the tiny model's predictions on them."""
    from prepdefense.data import load_dataset

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        arr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        arr[: 16 * (i % 4 + 1)] //= 2  # some structure, differing per image
        Image.fromarray(arr).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},0\n" for n in names))
    ds = load_dataset(str(folder), size=TinyClassifier.input_size)
    model = TinyClassifier().eval()
    with torch.no_grad():
        preds = [int(model(ds[i][0][None]).argmax(1)) for i in range(len(ds))]
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},{p}\n" for n, p in zip(names, preds)))
    return folder


def _run(tmp_out: Path, data: Path, **kw) -> "object":
    cfg = ReproduceConfig(out=tmp_out, data=str(data), preset=kw.pop("preset", "smoke"), device="cpu", quiet=True, **kw)
    return reproduce(cfg, classifier=TinyClassifier(), stream=open(os.devnull, "w"))


SMALL = {
    "table2_attacks": tuple(a for a in U.PRESETS["smoke"].table2_attacks if a.name in ("fgsm", "pgd")),
    "fig4_bpda_defenses": ("fd",),
    "fig4_eot_defenses": (U.OUR_DEFENSE,),
    "strong_defenses": ("jpeg",),
    "strong_norms": ("linf",),
    "diagnostics_defenses": (),
}


def test_report_has_every_section(tmp_path, image_folder):
    out = tmp_path / "out"
    res = _run(out, image_folder, only=["table1", "table2", "fig4"], overrides=SMALL)
    text = (out / "report.md").read_text()
    for heading in SECTION_HEADINGS:
        assert heading in text, heading
    assert "SMOKE RUN" in text  # shrunk-run banner
    assert "differ from the paper's" in text
    assert "not selected" in text  # sections left out with --only say so
    assert res.planned == res.ran + res.already_done
    # One record per (unit, image) in the merged views; CSVs and Fig. 4 PNGs written.
    t2 = [json.loads(l) for l in (out / "results" / "table2.jsonl").read_text().splitlines()]
    assert len(t2) == len(SMALL["table2_attacks"]) * 2 and len({(r["unit"], r["image_id"]) for r in t2}) == len(t2)
    assert all({"experiment", "unit", "defense", "attack", "shard", "image_id", "l2", "linf"} <= set(r) for r in t2)
    for name in ("table1.csv", "table2.csv", "fig4.csv", "strong.csv"):
        assert (out / "tables" / name).is_file(), name
    ok_fig4 = [u for u in ResultStore(out).units("fig4") if u["status"] == "ok"]
    if ok_fig4:  # the protocol attack and the defenses are present
        assert list((out / "figures").glob("fig4a_*.png"))
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["identity"]["seed"] == 0 and cfg["identity"]["preset"] == "smoke"
    assert cfg["metadata"]["versions"]["torch"] and cfg["metadata"]["git_revision"]


def test_missing_piece_is_reported_not_fatal(tmp_path, image_folder):
    out = tmp_path / "out"
    ov = {**SMALL, "fig4_bpda_defenses": ("no-such-defense",), "fig4_eot_defenses": ()}
    res = _run(out, image_folder, only=["fig4"], overrides=ov)
    assert res.failed == 1
    (unit,) = ResultStore(out).units("fig4")
    assert unit["status"] == "error" and "no-such-defense" in unit["error"]
    assert "not available: KeyError" in (out / "report.md").read_text()
    # An errored unit is retried by the next run (the piece may exist by then).
    res2 = _run(out, image_folder, only=["fig4"], overrides=ov)
    assert res2.ran == 1 and res2.already_done == 0


def test_same_seed_same_records(tmp_path, image_folder):
    def records(out):
        st = ResultStore(out)
        return {e: st.records(e) for e in st.experiments()}

    ov = {**SMALL, "fig4_bpda_defenses": (), "fig4_eot_defenses": (U.OUR_DEFENSE,)}
    _run(tmp_path / "a", image_folder, only=["table2", "table3", "fig4"], overrides=ov)
    _run(tmp_path / "b", image_folder, only=["table2", "table3", "fig4"], overrides=ov)
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert ra.keys() == rb.keys() and ra["table2"] and ra["table3"]
    run_cfg = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run_cfg["identity"]["draw_scheme"] == DRAW_SCHEME == run_cfg["metadata"]["draw_scheme"]
    assert ra == rb
    _run(tmp_path / "c", image_folder, only=["table2", "table3", "fig4"], overrides=ov, seed=7)
    rc = records(tmp_path / "c")
    assert rc["table3"] != ra["table3"] or rc["table2"] != ra["table2"]  # another seed, other targets/draws


def test_config_mismatch_refused_then_fresh(tmp_path, image_folder):
    out = tmp_path / "out"
    _run(out, image_folder, only=["table2"], overrides=SMALL)
    with pytest.raises(ConfigMismatchError, match="--fresh"):
        _run(out, image_folder, only=["table2"], overrides=SMALL, seed=3)
    res = _run(out, image_folder, only=["table2"], overrides=SMALL, seed=3, fresh=True)
    assert res.already_done == 0 and res.ran == res.planned


def test_a_new_shipped_table_does_not_resume_a_run_of_the_old_one(tmp_path, image_folder, monkeypatch):
    """The paper's defense uses the shipped learned table by default: a run made with one table
    is refused (naming the field) when the shipped table has changed, instead of mixing both."""
    from prepdefense.defenses import quant_tables

    out = tmp_path / "out"
    table = tmp_path / "tables" / "learned.json"
    quant_tables.save_table(table, torch.full((8, 8), 40.0, dtype=torch.float64), {"attack": "cw"})
    monkeypatch.setattr(quant_tables, "TABLES_DIR", table.parent)
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", table)
    _run(out, image_folder, only=["table2"], overrides=SMALL)
    assert _run(out, image_folder, only=["table2"], overrides=SMALL).ran == 0  # same table: resumed
    quant_tables.save_table(table, torch.full((8, 8), 50.0, dtype=torch.float64), {"attack": "cw"})
    with pytest.raises(ConfigMismatchError, match="default_table"):
        _run(out, image_folder, only=["table2"], overrides=SMALL)
    # Reporting computes nothing: a run of the earlier table can still be reported, nothing else differing.
    assert _run(out, image_folder, only=["table2"], overrides=SMALL, report_only=True).ran == 0
    with pytest.raises(ConfigMismatchError, match="seed"):
        _run(out, image_folder, only=["table2"], overrides=SMALL, report_only=True, seed=5)


def _child(tmp_path: Path, sleep: float, *args: str, **popen) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD_SRC)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(script), str(sleep), *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_resume_after_sigkill(tmp_path, image_folder):
    out = tmp_path / "out"
    args = ["reproduce", "--data", str(image_folder), "--out", str(out), "--preset", "h7test", "--model", "h7-tiny",
            "--device", "cpu", "--quiet", "--only", "table2,table3"]
    proc = _child(tmp_path, 0.4, *args)
    deadline = time.time() + 90
    units_dir = out / "units"
    while time.time() < deadline and proc.poll() is None:
        if units_dir.is_dir() and any(p for p in units_dir.rglob("*.json") if not p.name.startswith(".")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    st = ResultStore(out)
    done_before = {u["unit_id"] for u in st.units() if u["status"] == "ok"}
    assert done_before, "at least one unit should have finished before the kill"
    mtimes = {p: p.stat().st_mtime_ns for p in units_dir.rglob("*.json")}

    proc = _child(tmp_path, 0.4, *args)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, log
    assert "resuming" in log
    for p, m in mtimes.items():
        assert p.stat().st_mtime_ns == m, f"{p.name} was recomputed"

    # Every record exactly once: 4 shards x (1 attack) for Table 2, 4 x (clean + attack) for Table 3.
    expected = {"table2": 4, "table3": 8}
    for exp, n_units in expected.items():
        units = st.units(exp)
        assert len(units) == n_units and all(u["status"] == "ok" for u in units), [u.get("error") for u in units]
        lines = (out / "results" / f"{exp}.jsonl").read_text().splitlines()
        keys = [(json.loads(l)["unit"], json.loads(l)["image_id"]) for l in lines]
        assert len(keys) == n_units and len(set(keys)) == len(keys)
    assert not list(out.rglob(".*.tmp-*"))

    # A third run has nothing left to do.
    proc = _child(tmp_path, 0.4, *args)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "0 to run" in log, log
    # Another seed is refused with a clear message (exit 2, no traceback).
    proc = _child(tmp_path, 0.0, *args, "--seed", "5")
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--fresh" in log and "Traceback" not in log, log


def test_plan_and_presets():
    for name, preset in U.PRESETS.items():
        plan = registry.plan(preset)
        ids = [u.id for u in plan]
        assert len(ids) == len(set(ids)), name
        assert {u.experiment for u in plan} >= {"table1", "table2", "table3", "table4", "fig4", "table6", "learned", "strong"}
    paper = U.PRESETS["paper"]
    assert (paper.n_images, paper.bpda_rounds, paper.eot, paper.adaptive_steps, paper.adaptive_eot, paper.adaptive_draws) == (100, 50, 30, 200, 30, 10)
    assert paper.attack_spec("PGD-1000").kwargs["steps"] == 1000
    assert paper.attack_spec("C&W").kwargs == {"binary_search_steps": 5, "steps": 1000, "lr": 0.1, "initial_const": 0.01}
    # Shortened presets start the binary search higher (0.01 cannot climb in 2 x 25 iterations).
    assert U.PRESETS["quick"].attack_spec("C&W").kwargs["initial_const"] == 10.0
    assert U.PRESETS["quick"].shrunk  # the report must say what was shrunk
    assert registry.parse_only("table5") == ("table5",)
    assert {u.experiment for u in registry.plan(paper, registry.parse_only("table5"))} == {"strong"}
    with pytest.raises(ValueError):
        registry.parse_only("tabel1")
    # Unit seeds depend on the run seed and the unit id only.
    assert U.unit_seed(0, "a") == U.unit_seed(0, "a") != U.unit_seed(1, "a") != U.unit_seed(0, "b")


def test_strong_section_runs_the_ensemble_chain(tmp_path, image_folder):
    """Issue 10, item 6: per (defense, norm, shard) the strong section runs evaluate's ensemble: a
    clean verdict, then each attack of the preset's budget on the images still robust, judged on
    >= 10 draws; the chain stays in one shard of ``--shard K/N``."""
    from prepdefense.attacks.ensemble import BUDGETS, MIN_DRAWS
    from prepdefense.experiments import sharding

    ov = {**SMALL, "strong_defenses": ("jpeg", "grid-distort"), "strong_norms": ("linf",)}
    res = _run(tmp_path / "out", image_folder, only=["strong"], overrides=ov)
    assert res.failed == 0
    labels = ["clean"] + [a.label for a in BUDGETS[U.PRESETS["smoke"].strong_budget].attacks]
    units = {u["unit_id"]: u for u in ResultStore(tmp_path / "out").units("strong")}
    for d in ("jpeg", "grid-distort"):
        assert {uid for uid in units if uid.startswith(f"strong/{d}/")} == {f"strong/{d}/{a}/norm=linf/s0" for a in labels}
        robust = {r["image_id"] for r in units[f"strong/{d}/clean/norm=linf/s0"]["records"] if any(r["correct"])}
        for a in labels[1:]:
            u = units[f"strong/{d}/{a}/norm=linf/s0"]
            attacked = {r["image_id"] for r in u["records"]}
            assert attacked == robust and u["summary"]["ran_on"] == len(robust)  # auto-attack's rule
            robust = {r["image_id"] for r in u["records"] if any(r["correct"])} & robust
    draws = {len(r["correct"]) for r in units["strong/grid-distort/clean/norm=linf/s0"]["records"]}
    assert draws == {MIN_DRAWS} and {len(r["correct"]) for r in units["strong/jpeg/clean/norm=linf/s0"]["records"]} == {1}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "images by what broke them first" in text and "attack ensemble" in text
    chain = [u for u in registry.plan(U.PRESETS["smoke"].with_overrides(**ov), registry.parse_only("strong")) if u.attack != "diagnostics"]
    assert len({sharding.group_key(u) for u in chain}) == 2  # one group per (defense, norm, shard)


def test_demo_pipeline_on_given_images(tmp_path):
    from prepdefense.experiments.reproduce import run_demo_pipeline

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g)
    model = TinyClassifier().eval()
    with torch.no_grad():
        labels = model(x).argmax(1)
    res = run_demo_pipeline(
        tmp_path / "demo", x=x, labels=labels, ids=["a", "b"], classifier=model, device="cpu",
        experiments=("fig4",), overrides={"fig4_bpda_defenses": (), "fig4_eot_defenses": ("none",), "bpda_rounds": 2, "bpda_max_rounds": 2},
        stream=open(os.devnull, "w"),
    )
    assert res.planned == 1 and res.failed == 0
    recs = ResultStore(tmp_path / "demo").records("fig4")
    assert sorted(r["image_id"] for r in recs) == ["a", "b"]
    assert "given images" in json.loads((tmp_path / "demo" / "run.json").read_text())["identity"]["data"]
    assert (tmp_path / "demo" / "report.md").is_file()


# A toy experiment written as the module a contributor would add (issue 9, item 5): its units,
# its run and its report section. Registering it is the one other line (see the test).
TOY_MODULE_SRC = textwrap.dedent(
    '''
    """Toy experiment: the bare model's accuracy on the protocol sample, one unit per shard."""

    from prepdefense.experiments.context import image_records, predict_draws
    from prepdefense.experiments.experiment import Experiment, Section
    from prepdefense.experiments.reporting import fmt, md_table, mean
    from prepdefense.experiments.units import Unit

    def plan(preset, selected):
        return [Unit("toy", "none", "clean", s) for s in preset.shards()]

    def run(ctx, unit):
        x, labels, targets, ids = ctx.shard(unit.shard)
        preds = predict_draws(ctx.classifier, x, draws=1, generator=ctx.generator(unit.id))
        return image_records(ids, labels, targets, preds), {"n": len(ids)}

    def report(rep):
        acc = mean(float(r["correct"]) for r in rep.records("toy"))
        return rep.with_availability(["## Toy: clean accuracy", "", md_table(["ACC", "n"], [[fmt(acc), len(rep.records("toy"))]])], "toy")

    EXPERIMENT = Experiment(name="toy", title="Toy: clean accuracy", plan=plan, run=run,
                            sections=(Section(75, report),), aliases=("toy-accuracy",))
    '''
)


@pytest.fixture
def toy_experiment():
    import types

    module = types.ModuleType("toy_experiment")
    exec(TOY_MODULE_SRC, module.__dict__)  # noqa: S102 - the module a contributor would write
    registry.register(module.EXPERIMENT)  # the one registration line
    try:
        yield module
    finally:
        registry.unregister("toy")


def test_a_registered_experiment_is_planned_run_stored_and_reported(tmp_path, image_folder, toy_experiment):
    assert "toy" in registry.names() and registry.parse_only("toy-accuracy") == ("toy",)
    ov = {"n_images": 4, "shard_size": 2}
    assert [u.id for u in registry.plan(U.PRESETS["smoke"].with_overrides(**ov), registry.parse_only("toy"))] == ["toy/none/clean/s0", "toy/none/clean/s1"]
    out = tmp_path / "out"
    res = _run(out, image_folder, only=["toy"], overrides=ov)
    assert (res.planned, res.ran, res.failed) == (2, 2, 0)
    st = ResultStore(out)
    assert sorted(u["unit_id"] for u in st.units("toy", status="ok")) == ["toy/none/clean/s0", "toy/none/clean/s1"]
    recs = [json.loads(l) for l in (out / "results" / "toy.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["correct"] for r in recs)  # the sample holds correctly classified images
    text = (out / "report.md").read_text()
    assert "## Toy: clean accuracy" in text and "| 1.00 | 4 |" in text
    # Placed by its rank (75): after Table 6 (70), before Section 6.4 (80); the other sections stay.
    assert text.index("## Table 6") < text.index("## Toy") < text.index("## Section 6.4")
    for heading in SECTION_HEADINGS:
        assert heading in text, heading
    assert "Toy: clean accuracy | 2 | 0 |" in text  # the duration table names it by its title
    # Resumed: nothing left to run.
    res2 = _run(out, image_folder, only=["toy"], overrides=ov)
    assert (res2.already_done, res2.ran) == (2, 0)


def test_registry_refuses_a_taken_name(toy_experiment):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_experiment.EXPERIMENT)
    with pytest.raises(ValueError, match="unknown experiment"):
        registry.parse_only("toy,tabel1")


def test_fig4_runs_the_papers_bpda_and_a_stagewise_variant_on_our_defense(tmp_path, image_folder):
    """Issue 15: Fig. 4's BPDA is the paper's (the identity over the whole of a non-differentiable
    defense, PROTOCOL.md), and the stronger stage-wise gradient of our defense (identity through
    the rounding only, the real gradient of the grid distortion) runs and is reported beside it."""
    from prepdefense import defenses
    from prepdefense.defenses import Defended
    from prepdefense.experiments import fig4

    bare = TinyClassifier()
    assert fig4.paper_approx(Defended(defenses.create(U.OUR_DEFENSE), bare)) == "identity"
    assert fig4.paper_approx(Defended(defenses.create("jpeg"), bare)) == "identity"
    assert fig4.paper_approx(Defended(defenses.create("rand"), bare)) is None  # differentiable: its real gradient
    # Table 6's chains with rand change the size: stage by stage (an identity would have the wrong shape)
    assert fig4.paper_approx(Defended(defenses.create("fd+rand"), bare)) is None
    assert fig4.paper_approx(Defended(defenses.create("dct-quant+rand"), bare)) is None
    plan = fig4.plan(U.PRESETS["smoke"], {"fig4"})
    stagewise = [u for u in plan if u.variant == fig4.STAGEWISE]
    assert stagewise and {u.defense for u in stagewise} == {U.OUR_DEFENSE}
    assert {(u.attack, u.shard) for u in stagewise} == {(u.attack, u.shard) for u in plan if u.defense == U.OUR_DEFENSE and not u.variant}
    # common random numbers: a stage-wise unit draws with the keys of the paper's unit of its shard
    paper_units = {(u.attack, u.shard): u for u in plan if u.defense == U.OUR_DEFENSE and not u.variant}
    for u in stagewise:
        assert fig4.draw_unit(u).stream == paper_units[(u.attack, u.shard)].stream != u.stream
        assert fig4.draw_unit(paper_units[(u.attack, u.shard)]) is paper_units[(u.attack, u.shard)]

    out = tmp_path / "out"
    _run(out, image_folder, only=["fig4"], overrides={**SMALL, "fig4_bpda_defenses": (U.OUR_DEFENSE,), "fig4_eot_defenses": ()})
    units = [u for u in ResultStore(out).units("fig4") if u["status"] == "ok"]
    gradients = {u["key"].get("variant") or "": u["summary"]["gradient"] for u in units}
    assert gradients == {"": "identity", fig4.STAGEWISE: None}
    # the round-0 verdict on the clean images is judged on the draws: equal only if they are shared
    initial = {u["key"].get("variant") or "": u["summary"]["initial"] for u in units}
    assert initial[""] is not None and initial[""] == initial[fig4.STAGEWISE]
    text = (out / "report.md").read_text()
    assert "BPDA (stage-wise: real gradient of the grid distortion)" in text
    # the two variants' records differ (the stage-wise gradient moves the images elsewhere)
    recs = ResultStore(out).records("fig4")
    by_variant = {v: [r["l2"] for r in recs if (r.get("variant") or "") == v] for v in ("", fig4.STAGEWISE)}
    assert by_variant[""] and by_variant[fig4.STAGEWISE] and by_variant[""] != by_variant[fig4.STAGEWISE]


def test_table6_runs_every_combination_with_the_papers_gradient(tmp_path, image_folder):
    """Table 6's BPDA on every combination of the preset, those with rand (size-changing) included."""
    out = tmp_path / "t6"
    _run(out, image_folder, only=["table6"], overrides={**SMALL, "table6_rounds": 1})
    units = ResultStore(out).units("table6")
    assert units and all(u["status"] == "ok" for u in units), [(u["key"], u.get("error")) for u in units if u["status"] != "ok"]
    gradient = {u["key"]["defense"]: u["summary"]["gradient"] for u in units}
    assert gradient.get("fd+rand", None) is None and gradient.get(U.OUR_DEFENSE, "identity") == "identity"
