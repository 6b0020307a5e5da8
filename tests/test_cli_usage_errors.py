"""Issue 11, item 5: every sub-command turns a bad value or combination of flags into a usage
error: exit status 2, one line on stderr that says what is wrong and how to fix it, no
traceback.

Each case runs ``prepdefense.cli.main.main`` in-process. The cases in :data:`EARLY` must fail
before any model loads (``models.create`` raises if called); the few in :data:`AFTER_LOAD`
can only be found once the model has read the images (the built-in model, tiny folders).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prepdefense import models
from prepdefense.cli.main import main

REPO = Path(__file__).resolve().parents[1]

#: (argv, a piece of the expected message). ``{file}`` is an existing file, ``{empty}`` an
#: empty folder, ``{tmp}`` a fresh folder, ``{junk}`` a labelled folder of unreadable files.
EARLY = [
    # -- the command line itself (argparse): one line, not the usage block -----------------------
    ("", "no command given"),
    ("nope", "invalid choice: 'nope'"),
    ("predict --limit abc", "argument --limit: invalid int value: 'abc'"),
    ("predict --batch-size 1.5", "argument --batch-size: invalid int value"),
    ("predict --unknown-flag", "unrecognized arguments: --unknown-flag"),
    ("randomness", "the following arguments are required: --defense"),
    ("attack --defense fd", "the following arguments are required: --attack"),
    ("attack --defense fd --attack fgsm --targeted --untargeted", "not allowed with argument --targeted"),
    ("attack --defense fd --attack pgd --norm l3", "argument --norm: invalid choice: 'l3'"),
    ("attack --defense fd --attack pgd --loss nope", "argument --loss: invalid choice"),
    ("attack --defense fd --attack pgd --eps abc", "argument --eps: invalid float value: 'abc'"),
    ("attack --defense fd --attack fgsm --diagnostics weird", "argument --diagnostics: invalid choice"),
    ("demo --rounds x", "argument --rounds: invalid int value"),
    ("learn-table --data builtin", "the following arguments are required: --out"),
    ("reproduce --out {tmp}/r --preset huge", "argument --preset: invalid choice: 'huge'"),
    # -- counts -----------------------------------------------------------------------------------
    ("predict --limit 0", "--limit must be at least 1, got 0"),
    ("predict --limit -3", "--limit must be at least 1, got -3"),
    ("predict --batch-size 0", "--batch-size must be at least 1, got 0"),
    ("randomness --defense fd --batch-size -1", "--batch-size must be at least 1, got -1"),
    ("randomness --defense all --limit 0", "--limit must be at least 1"),
    ("demo --out {tmp}/d --rounds -1", "--rounds must be at least 0, got -1 (0 skips the attack)"),
    ("demo --out {tmp}/d --eot 0", "--eot must be at least 1, got 0"),
    ("learn-table --data builtin --out {tmp}/t.json --n 0", "--n must be at least 1, got 0"),
    ("learn-table --data builtin --out {tmp}/t.json --steps 0", "--steps must be at least 1"),
    ("learn-table --data builtin --out {tmp}/t.json --binary-steps 0", "--binary-steps must be at least 1"),
    ("learn-table --data builtin --out {tmp}/t.json --batch-size 0", "--batch-size must be at least 1"),
    ("learn-table --data builtin --out {tmp}/t.json --exclude-n -1", "--exclude-n must be at least 0"),
    ("attack --defense fd --attack fgsm --n 0", "--n must be at least 1, got 0"),
    ("attack --defense fd --attack fgsm --n -2", "--n must be at least 1, got -2"),
    ("attack --defense fd --attack fgsm --batch-size 0 --n 1", "--batch-size must be at least 1"),
    ("attack --defense fd --attack fgsm --draws 0 --n 1", "--draws must be at least 1"),
    ("attack --defense fd --attack adaptive --diag-n 0 --n 1", "--diag-n must be at least 1"),
    ("attack --defense fd --attack pgd --steps 0 --n 1", "--steps must be at least 1"),
    ("attack --defense fd --attack pgd --eot 0 --n 1", "--eot must be at least 1"),
    ("attack --defense fd --attack pgd --eot-chunk 0 --n 1", "--eot-chunk must be at least 1"),
    ("attack --defense fd --attack adaptive --restarts 0 --n 1", "--restarts must be at least 1"),
    ("attack --defense fd --attack cw --binary-search-steps 0 --n 1", "--binary-search-steps must be at least 1"),
    ("attack --defense fd --attack deepfool --candidates 1 --untargeted --n 1", "--candidates must be at least 2"),
    ("attack --defense fd --attack bpda --until-bound --max-rounds 0 --n 1", "--max-rounds must be at least 1"),
    ("attack --defense fd --attack fgsm --n 5", "--n 5 asks for more images than --data builtin lists (4)"),
    ("learn-table --data builtin --out {tmp}/t.json --n 2",
     "--n 2 images to attack plus the 200 kept out (--exclude-n 100, --exclude-usability-n 200) need 202, "
     "but --data builtin lists 4"),
    ("learn-table --data builtin --out {tmp}/t.json --exclude-usability-n -1", "--exclude-usability-n must be at least 0"),
    ("reproduce --out {tmp}/r --preset quick", "--preset quick needs 8 images"),
    # -- numbers ----------------------------------------------------------------------------------
    ("attack --defense fd --attack pgd --eps 0 --n 1", "--eps must be positive, got 0"),
    ("attack --defense fd --attack pgd --eps -1 --n 1", "--eps must be positive"),
    ("attack --defense fd --attack pgd --eps nan --n 1", "--eps must be a finite number, got nan"),
    ("attack --defense fd --attack pgd --eps inf --n 1", "--eps must be a finite number, got inf"),
    ("attack --defense fd --attack pgd --step-size 0 --n 1", "--step-size must be positive"),
    ("attack --defense fd --attack pgd --rel-stepsize nan --n 1", "--rel-stepsize must be a finite number"),
    ("attack --defense fd --attack adaptive --step-fraction -1 --n 1", "--step-fraction must be positive"),
    ("attack --defense fd --attack mi-fgsm --momentum -1 --n 1", "--momentum must be 0 or more"),
    ("attack --defense fd --attack cw --kappa -1 --n 1", "--kappa must be 0 or more"),
    ("attack --defense fd --attack cw --lr 0 --n 1", "--lr must be positive"),
    ("attack --defense fd --attack cw --initial-const -1 --n 1", "--initial-const must be positive"),
    ("attack --defense fd --attack deepfool --overshoot -1 --untargeted --n 1", "--overshoot must be 0 or more"),
    ("attack --defense fd --attack bpda --lr 0 --n 1", "--lr must be positive"),
    ("attack --defense fd --attack adaptive --losses nope --n 1", "--losses nope: give one or more of ce, margin"),
    ("attack --defense fd --attack adaptive --losses , --n 1", "give one or more of ce, margin"),
    ("learn-table --data builtin --out {tmp}/t.json --lr 0", "--lr must be positive, got 0"),
    ("learn-table --data builtin --out {tmp}/t.json --lr nan", "--lr must be a finite number"),
    ("learn-table --data builtin --out {tmp}/t.json --initial-const -1", "--initial-const must be positive"),
    # -- seeds ------------------------------------------------------------------------------------
    ("predict --seed -1", "--seed must be between 0 and 2**63-1"),
    ("randomness --defense fd --seed 99999999999999999999999", "--seed must be between 0 and 2**63-1"),
    ("demo --out {tmp}/d --seed -1", "--seed must be between 0"),
    ("attack --defense fd --attack fgsm --n 1 --seed -1", "--seed must be between 0"),
    ("learn-table --data builtin --out {tmp}/t.json --exclude-sample-seed -2", "--exclude-sample-seed must be between 0"),
    ("reproduce --out {tmp}/r --seed -1", "--seed must be between 0"),
    # -- devices ----------------------------------------------------------------------------------
    ("predict --device bogus", "bad --device 'bogus': use cpu, cuda, cuda:N or auto"),
    ("predict --device meta", "bad --device 'meta'"),
    ("randomness --defense fd --device cuda:99", "--device cuda:99"),
    ("demo --out {tmp}/d --device bogus", "bad --device"),
    ("attack --defense fd --attack fgsm --n 1 --device bogus", "bad --device"),
    ("learn-table --data builtin --out {tmp}/t.json --n 1 --exclude-n 0 --exclude-usability-n 0 --device bogus", "bad --device"),
    ("reproduce --out {tmp}/r --preset smoke --device bogus", "bad --device"),
    # -- data folders -----------------------------------------------------------------------------
    ("predict --data /no/such/folder", "image folder not found: /no/such/folder"),
    ("predict --data {file}", "not a folder"),
    ("predict --data {empty}", "image folder is empty"),
    ("predict --data ''", "--data is empty"),
    ("randomness --defense fd --data /no/such/folder", "image folder not found"),
    ("randomness --defense fd --data {file}", "not a folder"),
    ("attack --defense fd --attack fgsm --n 1 --data /no/such/folder", "image folder not found"),
    ("attack --defense fd --attack fgsm --n 1 --data {empty}", "image folder is empty"),
    ("learn-table --data /no/such/folder --out {tmp}/t.json", "image folder not found"),
    ("learn-table --data {file} --out {tmp}/t.json", "not a folder"),
    ("reproduce --out {tmp}/r --data /no/such/folder", "image folder not found"),
    ("reproduce --out {tmp}/r --data {file}", "is not a folder"),
    ("reproduce --out {tmp}/r --data {empty} --preset smoke", "image folder is empty"),
    # -- models and weights -----------------------------------------------------------------------
    ("predict --model nope", "unknown --model 'nope'; known: efficientnet-lite0"),
    ("predict --weights /no/such.pt", "--weights file not found: /no/such.pt"),
    ("predict --model resnet50 --weights {empty}", "is not a file"),
    ("randomness --defense fd --model nope", "unknown --model 'nope'"),
    ("demo --out {tmp}/d --model nope", "unknown --model 'nope'"),
    ("attack --defense fd --attack fgsm --n 1 --model nope", "unknown --model 'nope'"),
    ("attack --defense fd --attack fgsm --n 1 --weights /no/such.pt", "--weights file not found"),
    ("learn-table --data builtin --out {tmp}/t.json --model nope", "unknown --model 'nope'"),
    ("reproduce --out {tmp}/r --model nope --preset smoke", "unknown --model 'nope'"),
    ("reproduce --out {tmp}/r --weights /no/such.pt --preset smoke", "--weights file not found"),
    # -- defenses and chains ----------------------------------------------------------------------
    ("predict --defense nope", "unknown defense 'nope'; known: "),
    ("predict --defense all", "unknown defense 'all'"),
    ("predict --defense fd+", "has an empty part"),
    ("predict --defense +rand", "has an empty part"),
    ("predict --defense fd++rand", "has an empty part"),
    ("predict --defense fd+nope", "unknown defense 'nope' in --defense 'fd+nope'"),
    ("predict --defense ''", "--defense is empty"),
    ("randomness --defense nope", "unknown defense 'nope'"),
    ("randomness --defense fd+", "has an empty part"),
    ("randomness --defense +", "has an empty part"),
    ("randomness --defense ''", "--defense is empty"),
    ("demo --out {tmp}/d --defense nope", "unknown defense 'nope'"),
    ("demo --out {tmp}/d --defense +rand", "has an empty part"),
    ("demo --out {tmp}/d --defense ''", "--defense is empty"),
    ("attack --defense nope --attack fgsm --n 1", "unknown defense 'nope'"),
    ("attack --defense fd++rand --attack fgsm --n 1", "has an empty part"),
    ("attack --defense rand+ --attack pgd --n 1", "has an empty part"),
    ("attack --defense '' --attack fgsm --n 1", "--defense is empty"),
    # -- attacks ----------------------------------------------------------------------------------
    ("attack --defense fd --attack nope --n 1", "unknown attack 'nope'; known: "),
    ("attack --defense fd --attack fgsm --steps 5 --n 1", "--steps does not apply to --attack fgsm"),
    ("attack --defense fd --attack cw --norm linf --n 1", "cw is an L2 attack"),
    ("attack --defense fd --attack deepfool --targeted --n 1", "deepfool is untargeted only; use --untargeted"),
    # -- output paths -----------------------------------------------------------------------------
    ("demo --out {file}", "is a file, not a folder"),
    ("demo --out {file}/sub", "is a file, not a folder; choose a path under a folder"),
    ("demo --out ''", "--out is empty"),
    ("reproduce --out {file}", "is a file, not a folder"),
    ("reproduce --out {file}/sub --preset smoke", "is a file, not a folder"),
    ("learn-table --data builtin --out {empty}", "is a folder; give a file name"),
    ("learn-table --data builtin --out {file}/t.json --n 1 --exclude-n 0 --exclude-usability-n 0", "is a file, not a folder"),
    # -- flags that contradict each other or do nothing --------------------------------------------
    ("attack --defense fd --attack pgd --step-size 0.01 --rel-stepsize 0.1 --n 1", "give only one"),
    ("attack --defense fd --attack bpda --max-rounds 5 --n 1", "--max-rounds caps the rounds of --until-bound"),
    ("attack --defense fd --attack bpda --until-bound --max-rounds 3 --steps 10 --n 1",
     "--max-rounds 3 is below the 10 rounds of --steps"),
    ("attack --defense fd --attack pgd --kappa 5 --n 1", "add --loss margin or drop --kappa"),
    ("attack --defense fd --attack adaptive --kappa 5 --losses ce --n 1", "add margin to --losses or drop --kappa"),
    ("attack --defense fd --attack fgsm --transfer --diagnostics full --n 1", "drop one of them"),
    ("attack --defense none --attack fgsm --transfer --n 1", "name a defense or drop --transfer"),
    ("attack --defense fd --attack adaptive --diagnostics off --diag-n 5 --n 1", "drop --diag-n"),
    ("attack --defense fd --attack fgsm --diag-n 5 --n 1", "fgsm runs none unless asked"),
    ("attack --defense fd --attack pgd --eot-chunk 2 --n 1", "pgd's default EOT of 1 draw: drop --eot-chunk"),
    ("attack --defense fd --attack adaptive --eot 1 --eot-chunk 2 --n 1", "this run has --eot 1"),
    ("attack --defense fd --attack cw --eot-chunk 2 --n 1", "cw's default EOT of 1 draw"),
    ("reproduce --out {tmp}/r --fresh --report-only", "use one of them"),
    ("reproduce --out {tmp}/r --report-only", "holds no run to report"),
    ("reproduce --out {tmp}/r --only nope", "unknown experiment 'nope'"),
    ("reproduce --out {tmp}/r --only ''", "names no experiment"),
    ("reproduce --out {tmp}/r --only ,", "names no experiment"),
    # -- from the CLI review of 2026-11-30 --------------------------------------------------------
    ("predict --dat builtin", "unrecognized arguments: --dat builtin (see 'prepdefense predict --help')"),
    ("attack --defense fd --attack pgd --ep 0.1", "unrecognized arguments: --ep"),
    ("attack --defense fd --attack pgd --no-diagnostics --diagnostics full --n 1", "contradict each other"),
    ("attack --defense fd --attack spsa --steps 2 --queries 512 --n 1", "not both"),
    ("evaluate --defense jpeg --norm linf --eps 8 --n 2", "8/255"),
]

#: Cases that only the model can find: the images are read (and classified) first.
AFTER_LOAD = [
    ("predict --weights {file} --device cpu", "efficientnet-lite0: cannot read weights file"),
    ("predict --data {junk} --device cpu", "no readable image"),
    ("attack --data {junk} --defense fd --attack fgsm --n 1 --device cpu", "no readable image"),
]


@pytest.fixture
def paths(tmp_path):
    f = tmp_path / "a-file.txt"
    f.write_text("not a folder\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("a.jpg", "b.png"):
        (junk / name).write_text("not an image")
    (junk / "labels.csv").write_text("file,label,wnid,name\na.jpg,1,n01443537,goldfish\nb.png,1,n01443537,goldfish\n")
    return {"file": str(f), "empty": str(empty), "tmp": str(work), "junk": str(junk)}


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a usage error that the flags alone show")

    monkeypatch.setattr(models, "create", refuse)


def _argv(line: str, paths) -> list:
    import shlex

    return shlex.split(line.format(**paths))


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_usage_error(rc, out, err, expected):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("prepdefense"), err
    assert " error: " in err, err
    assert expected in err, err
    assert out == ""


@pytest.mark.parametrize("line,expected", EARLY, ids=[c[0] or "(none)" for c in EARLY])
def test_usage_error_before_anything_loads(line, expected, paths, no_model, capsys):
    rc, out, err = _run(_argv(line, paths), capsys)
    _assert_usage_error(rc, out, err, expected)


@pytest.mark.parametrize("line,expected", AFTER_LOAD, ids=[c[0] for c in AFTER_LOAD])
def test_usage_error_found_by_reading_the_images(line, expected, paths, capsys):
    rc, out, err = _run(_argv(line, paths), capsys)
    # The skipped files are reported first, one warning line each; then the one error line.
    warnings = [l for l in err.splitlines() if l.startswith("prepdefense: warning: skipped")]
    assert len(warnings) == (2 if "{junk}" in line else 0), err
    error = "".join(l + "\n" for l in err.splitlines() if l not in warnings)
    _assert_usage_error(rc, out, error, expected)


def test_nothing_is_written_for_a_usage_error(paths, no_model, capsys):
    """A refused run leaves no output folder behind."""
    out = Path(paths["tmp"]) / "never"
    for line in (f"demo --out {out} --eot 0", f"reproduce --out {out} --fresh --report-only",
                 f"reproduce --out {out} --model nope --preset smoke", f"learn-table --data builtin --out {out}/t.json --n 0"):
        rc, _, _ = _run(line.split(), capsys)
        assert rc == 2
    assert not out.exists()


def test_argparse_error_is_one_line_from_the_real_command():
    code = "import sys; from prepdefense.cli.main import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run(
        [sys.executable, "-c", code, "predict", "--limit", "abc"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2
    assert p.stderr == ("prepdefense predict: error: argument --limit: invalid int value: 'abc' "
                        "(see 'prepdefense predict --help')\n")


@pytest.mark.parametrize("argv, expected", [
    (["--foo", "predict"], ["prepdefense: error: unrecognized arguments: --foo (see 'prepdefense --help')"]),
    (["predict", "--foo=1"], ["prepdefense predict: error: unrecognized arguments: --foo=1 (see 'prepdefense predict --help')"]),
    (["--foo", "predict", "--bar"], ["prepdefense: error: unrecognized arguments: --foo (see 'prepdefense --help')",
                                     "prepdefense predict: error: unrecognized arguments: --bar (see 'prepdefense predict --help')"]),
])
def test_an_unknown_flag_is_reported_against_the_parser_it_was_given_to(argv, expected, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == expected
