"""Bring your own defense (issue 12, item 2): ``package.module:Class`` and entry points, mixed
in ``+`` chains, through ``predict`` and ``attack``; the defense contract and ``check-defense``."""

from __future__ import annotations


import pytest
import torch

from byo_helpers import TINY_NET, USER_DEFENSES, cli, cli_json, forget, label_by_model, noise_images, write_module  # noqa: E402
from prepdefense import defenses, models
from prepdefense.defenses.contract import check_contract

NET = "byo_def_tiny_net"
DEFS = "byo_user_defenses"


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The tiny net and the user defenses on sys.path, and a folder the net labels itself."""
    write_module(tmp_path, NET, TINY_NET)
    write_module(tmp_path, DEFS, USER_DEFENSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget(NET, DEFS)
    folder = tmp_path / "images"
    noise_images(folder, 6, seed=1)
    label_by_model(folder, models.create(f"{NET}:tiny_net"))
    yield folder
    forget(NET, DEFS)


def test_user_defenses_by_spec_and_in_chains(user):
    blur = defenses.create(f"{DEFS}:Blur")
    assert type(blur).__name__ == "Blur" and blur.differentiable and not blur.randomized
    chain = defenses.create(f"FD+{DEFS}:Jitter")  # built-in names are case-blind, specs keep their case
    assert chain.part_names == ["fd", f"{DEFS}:Jitter"] and chain.randomized and not chain.differentiable
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chain(x, generator=4), chain(x, generator=4))
    plain = defenses.create(f"{DEFS}:SecretlyRandom")  # a plain nn.Module is wrapped
    assert isinstance(plain, defenses.Defense) and not plain.randomized
    with pytest.raises(defenses.UserDefenseError, match="has no 'Nope'"):
        defenses.create(f"{DEFS}:Nope")
    with pytest.raises(KeyError, match="unknown defense 'no-such-defense'"):
        defenses.create("no-such-defense")


def test_user_defense_through_predict_and_attack(user, capsys):
    base = ["--model", f"{NET}:tiny_net", "--data", str(user), "--device", "cpu"]
    got = cli_json(capsys, "predict", *base, "--defense", f"{DEFS}:Jitter")
    assert got["n"] == 6 and got["defense"] == f"{DEFS}:Jitter"
    got = cli_json(capsys, "predict", *base, "--defense", f"fd+{DEFS}:Blur")
    assert got["n"] == 6 and got["defense"] == f"fd+{DEFS}:Blur"
    out = cli_json(capsys, "attack", *base, "--defense", f"{DEFS}:Jitter", "--attack", "pgd", "--n", "3",
                   "--steps", "3", "--eot", "2", "--eps", "0.05", "--draws", "3")
    assert out["n"] == 3 and out["defense"] == f"{DEFS}:Jitter" and out["draws"] == 3
    assert out["l2_rms_max"] <= 0.05 + 1e-4


def test_unknown_user_defense_is_a_one_line_usage_error(user, capsys):
    code, _, err = cli(capsys, "predict", "--defense", "no_such_module_xyz:Blur", "--device", "cpu")
    assert code == 2 and "cannot import 'no_such_module_xyz'" in err and len(err.strip().splitlines()) == 1


def test_entry_point_group_publishes_a_defense(user, tmp_path, monkeypatch):
    dist = tmp_path / "byo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: byo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[prepdefense.defenses]\nbyo-blur = {DEFS}:Blur\n")
    assert "byo-blur" in defenses.entry_point_names()
    assert type(defenses.create("byo-blur")).__name__ == "Blur"
    assert defenses.create("fd+byo-blur").part_names == ["fd", "byo-blur"]


def test_check_defense_passes_a_good_user_defense(user, capsys):
    code, out, _ = cli(capsys, "check-defense", f"{DEFS}:Jitter", "--size", "32")
    assert code == 0, out
    assert "no global RNG" in out and "batch = one at a time" in out and "FAIL" not in out
    report = cli_json(capsys, "check-defense", f"fd+{DEFS}:Blur", "--size", "32")
    assert report["passed"] and {c["check"] for c in report["checks"]} >= {"shape kept", "range kept", "reproducible",
                                                                            "randomized claim", "differentiable claim"}


def test_check_defense_fails_a_defense_that_draws_from_the_global_rng(user, capsys):
    state = torch.get_rng_state()
    code, out, _ = cli(capsys, "check-defense", f"{DEFS}:GlobalNoise", "--size", "32")
    torch.set_rng_state(state)  # the defense under test advanced it
    assert code == 1
    row = next(line for line in out.splitlines() if "no global RNG" in line)
    assert "FAIL" in row and "global random state of torch" in row
    assert any("reproducible" in line and "FAIL" in line for line in out.splitlines())


def test_check_defense_fails_a_false_deterministic_claim(user, capsys):
    state = torch.get_rng_state()
    code, out, _ = cli(capsys, "check-defense", f"{DEFS}:SecretlyRandom", "--size", "32")
    torch.set_rng_state(state)
    assert code == 1
    row = next(line for line in out.splitlines() if "randomized claim" in line)
    assert "FAIL" in row and "randomized=False, but" in row


def test_contract_catches_false_differentiable_claims_and_bad_outputs():
    class ClaimsGradient(defenses.Defense):
        differentiable = True

        def apply(self, x, params):
            return torch.round(x * 4) / 4  # rounding: an all-zero gradient

    class Escapes(defenses.Defense):
        def apply(self, x, params):
            return x * 1.5  # leaves [0, 1]

    class KeepsOwnState(defenses.Defense):
        randomized = True

        def __init__(self):
            super().__init__()
            self.g = torch.Generator().manual_seed(0)

        def draw(self, x1, generator):
            from prepdefense.draws import Params
            return Params(v=torch.rand(1, generator=self.g))  # its own stream, not the key's

        def apply(self, x, params):
            return (x * 0.9 + 0.1 * params["v"].to(x).view(-1, 1, 1, 1)).clamp(0, 1)

    def failed(defense):
        return {c.name: c.detail for c in check_contract(defense, size=16, n=2).failures}

    assert "all-zero gradient" in failed(ClaimsGradient())["differentiable claim"]
    assert "outside [0, 1]" in failed(Escapes())["range kept"]
    assert "same DrawKey gave two outputs" in failed(KeepsOwnState())["reproducible"]


def test_contract_fails_a_defense_whose_builds_hold_different_values():
    class RandomWeights(defenses.Defense):
        differentiable = True

        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.rand(3))  # unseeded: each build differs

        def apply(self, x, params):
            return (x * 0.5 + 0.5 * self.w.view(1, 3, 1, 1).to(x)).clamp(0, 1)

    detail = {c.name: c for c in check_contract(RandomWeights(), size=16, n=2, rebuild=RandomWeights).checks}
    assert detail["state rebuilt equal"].passed is False and "seed what the constructor" in detail["state rebuilt equal"].detail
    assert {c.name: c for c in check_contract(RandomWeights(), size=16, n=2).checks}["state rebuilt equal"].passed is None

    class CachesOnFirstCall(defenses.Defense):
        """Deterministic; fills a persistent buffer on its first call (a cache), as built it is empty."""

        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))

        def apply(self, x, params):
            self.seen.fill_(1.0)
            return x.clone()

    report = check_contract(CachesOnFirstCall(), size=16, n=2, rebuild=CachesOnFirstCall)
    assert {c.name: c for c in report.checks}["state rebuilt equal"].passed is True, report.table()


@pytest.mark.parametrize("name", defenses.names())
def test_every_builtin_defense_keeps_the_contract(name):
    report = check_contract(defenses.create(name), name=name, size=32, n=2, rebuild=lambda: defenses.create(name))
    assert report.passed, report.table()
    assert next(c for c in report.checks if c.name == "state rebuilt equal").passed


def test_check_defense_usage_errors(capsys):
    for argv, message in ((["none"], "no defense"), (["fd", "--n", "1"], "--n must be at least 2"),
                          (["no-such"], "unknown defense")):
        code, _, err = cli(capsys, "check-defense", *argv)
        assert code == 2 and message in err, err


def test_contract_compares_plain_tensor_attributes_between_builds():
    """A tensor held as a plain attribute is outside ``state_dict()`` (the run store's digest):
    two builds that differ in it fail "state rebuilt equal"; equal ones pass with a note that
    asks for ``register_buffer``."""
    from prepdefense.defenses.state import plain_tensors

    class PlainWeights(defenses.Defense):
        differentiable = True

        def __init__(self, seeded=True):
            super().__init__()
            g = torch.Generator().manual_seed(3) if seeded else None
            self.w = torch.rand(3, generator=g)

        def apply(self, x, params):
            return (x * 0.5 + 0.5 * self.w.view(1, 3, 1, 1).to(x)).clamp(0, 1)

    assert list(plain_tensors(PlainWeights())) == ["w"]
    assert plain_tensors(defenses.create("dct-distort")) == {}
    check = {c.name: c for c in check_contract(PlainWeights(False), size=16, n=2,
                                               rebuild=lambda: PlainWeights(False)).checks}["state rebuilt equal"]
    assert check.passed is False and "plain tensor attributes (w;" in check.detail
    check = {c.name: c for c in check_contract(PlainWeights(), size=16, n=2, rebuild=PlainWeights).checks}["state rebuilt equal"]
    assert check.passed is True and "register_buffer" in check.detail

    class Wrapped(defenses.Defense):
        """A submodule's plain tensor, by its dotted name; NaN equal to NaN across builds."""
        differentiable = True

        def __init__(self):
            super().__init__()
            self.inner = PlainWeights()
            self.mask = torch.tensor([float("nan"), 1.0])

        def apply(self, x, params):
            return self.inner.apply(x, params)

    assert sorted(plain_tensors(Wrapped())) == ["inner.w", "mask"]
    check = {c.name: c for c in check_contract(Wrapped(), size=16, n=2, rebuild=Wrapped).checks}["state rebuilt equal"]
    assert check.passed is True and "inner.w, mask are plain tensor attributes" in check.detail
    unreadable = Wrapped()
    unreadable.mask = torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="cannot read 'mask'"):
        plain_tensors(unreadable)
