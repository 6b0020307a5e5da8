"""``prepdefense attack`` flags come from each attack's declared hyperparameters (issue 9, item 7).
No model is loaded here: a flag the attack does not take fails before anything loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prepdefense import attacks
from prepdefense.cli import attack as attack_cli
from prepdefense.cli.attack_flags import ALIASES, RUN_SET, attack_flags, valid_flags
from prepdefense.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _no_model(*_a, **_k):
    raise AssertionError("the model must not be loaded for a usage error")


@pytest.fixture
def no_loading(monkeypatch):
    from prepdefense.cli import common

    monkeypatch.setattr(common, "build_model", _no_model)


def test_fgsm_steps_is_a_usage_error_naming_the_valid_flags(capsys, no_loading):
    rc = main(["attack", "--defense", "none", "--attack", "fgsm", "--steps", "5", "--n", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--steps does not apply to --attack fgsm" in err
    for flag in valid_flags("fgsm"):
        assert flag in err
    assert set(valid_flags("fgsm")) >= {"--eps", "--norm", "--loss", "--kappa", "--eot"}


def test_usage_error_from_the_command_line():
    """The real command: exit status 2 and one line on stderr, no traceback."""
    code = "import sys; from prepdefense.cli.main import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run(
        [sys.executable, "-c", code, "attack", "--defense", "none", "--attack", "fgsm", "--steps", "5", "--n", "1"],
        capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("prepdefense attack: error: --steps does not apply to --attack fgsm; its flags: ")


@pytest.mark.parametrize("argv,message", [
    (["--attack", "bpda", "--eot", "5"], "--eot does not apply to --attack bpda"),
    (["--attack", "pgd", "--lr", "0.1", "--losses", "ce"], "--losses, --lr do not apply to --attack pgd"),
    (["--attack", "cw", "--norm", "linf"], "cw is an L2 attack; --norm linf does not apply"),
    (["--attack", "deepfool", "--eps", "0.1"], "--eps does not apply to --attack deepfool"),
])
def test_other_flags_that_do_not_apply(capsys, no_loading, argv, message):
    assert main(["attack", "--defense", "none", "--n", "1", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", attacks.names())
def test_declared_hyperparameters_map_to_flags(name):
    """Every keyword-only hyperparameter of the attack (but those the command sets itself) has
    a flag that the attack takes."""
    flags = attack_flags()
    declared = [p for p in attacks.REGISTRY.parameters(name) if p not in RUN_SET]
    assert declared, name
    for hp in declared:
        dest = ALIASES.get(hp, hp)
        assert dest in flags, (name, hp)
        assert name in flags[dest].takers, (name, hp)
    assert set(valid_flags(name)) == {flags[d].option for d in flags if name in flags[d].takers}


def _sample_argv(flag, name):
    """A value for ``flag`` that differs from the attack's default where one is declared."""
    if flag.kind == "bool":
        default = flag.defaults.get(name)
        return [flag.option if default is False else "--no-" + flag.option[2:]], default is not True
    if flag.dest == "norm":
        return [flag.option, "l2"], "l2"
    if flag.dest == "loss":
        return [flag.option, "margin"], "margin"
    if flag.kind == "list":
        return [flag.option, "margin"], ("margin",)
    if flag.kind == "int":
        return [flag.option, "1234"], 1234
    if flag.kind == "float":
        return [flag.option, "0.02"], 0.02
    return [flag.option, "x"], "x"


@pytest.mark.parametrize("name", attacks.names())
def test_each_flag_of_each_attack_reaches_it(name):
    flags = attack_flags()
    for dest, flag in sorted(flags.items()):
        if name not in flag.takers:
            continue
        extra, value = _sample_argv(flag, name)
        args = build_parser().parse_args(["attack", "--defense", "none", "--attack", name, *extra])
        attack, model_eot = attack_cli.build_attack(name, args)
        hp = flag.takers[name]
        if hp is None:  # model-side EOT wrapper, or --norm l2 of an L2 attack
            if dest == "eot":
                assert model_eot == 1234
            continue
        if hasattr(attack, hp):
            assert getattr(attack, hp) == pytest.approx(value) if isinstance(value, float) else getattr(attack, hp) == value, (name, dest)


def test_old_spellings_still_work():
    p = build_parser()
    args = p.parse_args(["attack", "--defense", "none", "--attack", "bpda", "--steps", "4", "--eps", "0.04", "--until-bound", "--norm", "l2"])
    a, _ = attack_cli.build_attack("bpda", args)
    assert (a.rounds, a.eps, a.until_bound, a.eot) == (4, 0.04, True, 1)
    args = p.parse_args(["attack", "--defense", "none", "--attack", "lbfgs", "--steps", "7"])
    assert attack_cli.build_attack("lbfgs", args)[0].max_iterations == 7
    args = p.parse_args(["attack", "--defense", "none", "--attack", "pgd", "--norm", "l2", "--eps", "0.05", "--steps", "5", "--eot", "2"])
    a, model_eot = attack_cli.build_attack("pgd", args)
    assert (a.norm, a.eps, a.steps, a.eot, model_eot) == ("l2", 0.05, 5, 2, None)  # pgd's own EOT
    args = p.parse_args(["attack", "--defense", "none", "--attack", "adaptive", "--steps", "3", "--eot", "2", "--draws", "4"])
    a, model_eot = attack_cli.build_attack("adaptive", args)
    assert (a.steps, a.eot, a.draws, a.norm, model_eot) == (3, 2, 4, "l2", None)


def test_help_names_every_flag_and_its_attacks(capsys):
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    out = capsys.readouterr().out
    for flag in attack_flags().values():
        assert flag.option in out
    assert "attacks and their flags:" in out
    for name in attacks.names():
        assert f"  {name}: " in out
    assert "at most 25% of the attack's model passes" in " ".join(out.split())
