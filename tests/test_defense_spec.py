"""Defense names with parameters, ``name[key=value,...]`` (defenses/spec.py): the paper's defense
with the FD table is ``dct-distort[table=fd]`` wherever a defense name goes (issue 10, item 5
runs it through ``evaluate``), one canonical id per defense, and clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from byo_helpers import cli, forget, label_by_model, noise_images, write_module
from prepdefense import defenses
from prepdefense.cli.common import UsageError, check_defense
from prepdefense.defenses.spec import format_part, parse_part, split_chain
from prepdefense.draws import DrawKey, image_id
from prepdefense.experiments import evaluation as V
from toy_models import TinyConvNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_and_format_round_trip():
    assert parse_part("dct-distort") == ("dct-distort", {})
    name, params = parse_part(" dct-distort[ table=fd , delta=0.10, cells=8, flag=True, path=a/b.json ] ")
    assert name == "dct-distort"
    assert params == {"table": "fd", "delta": 0.1, "cells": 8, "flag": True, "path": "a/b.json"}
    assert type(params["cells"]) is int and type(params["delta"]) is float
    text = format_part(name, params)
    assert text == "dct-distort[cells=8,delta=0.1,flag=True,path=a/b.json,table=fd]"
    assert parse_part(text) == (name, params)
    assert split_chain("fd+rand[pad_value=0.5]+dct-distort[table=fd]") == ["fd", "rand[pad_value=0.5]", "dct-distort[table=fd]"]


def test_normalize_gives_one_id_per_defense():
    a = defenses.normalize_name("DCT-Distort[ table=fd, delta=0.1 ]")
    b = defenses.normalize_name("dct-distort[delta=0.100,table=fd]")
    assert a == b == "dct-distort[delta=0.1,table=fd]"
    assert defenses.normalize_name("FD+Rand") == "fd+rand"  # names without brackets as before
    # A parameter equal to the default is the default defense; an int for a float default is a float.
    assert defenses.normalize_name("dct-distort[delta=0.15,cells=10]") == "dct-distort"
    assert defenses.normalize_name("rand[pad_value=0]") == defenses.normalize_name("rand[pad_value=0.0]") == "rand[pad_value=0.0]"
    # Table names are case-blind and have one spelling; the default table is the default defense.
    assert defenses.normalize_name("dct-distort[table=FD]") == "dct-distort[table=fd]"
    assert defenses.normalize_name("dct-quant[table=JPEG]") == defenses.normalize_name("dct-quant[table=q50]") \
        == "dct-quant[table=jpeg50]"
    assert defenses.normalize_name("dct-distort[table=DEFAULT]") == "dct-distort"
    assert defenses.normalize_name("dct-distort[table=Learned]") == "dct-distort[table=learned]"
    assert defenses.normalize_name("dct-quant[table=Tables/Mine.json]") == "dct-quant[table=Tables/Mine.json]"  # a path as written
    # Text that would read back as a number stays text.
    text = defenses.normalize_name("dct-distort[table='1']")
    assert parse_part(text) == ("dct-distort", {"table": "1"})


def test_a_table_file_enters_the_identity_by_its_contents(tmp_path):
    from prepdefense.defenses.quant_tables import FD_TABLE, save_table
    from prepdefense.defenses.spec import referenced_files

    path = tmp_path / "mine.json"
    save_table(path, FD_TABLE)
    name = f"dct-distort[table={path}]"
    first = referenced_files(name)
    assert list(first) == ["dct-distort.table"] and first["dct-distort.table"].startswith("sha256:")
    save_table(path, FD_TABLE * 2)
    assert referenced_files(name) != first
    assert referenced_files("dct-distort[table=fd]") == {}


def test_bracketed_parameters_build_what_keywords_build():
    x = torch.rand(2, 3, 32, 32)
    named = defenses.create("dct-distort[table=fd,delta=0.1]")
    keywords = defenses.create("dct-distort", table="fd", delta=0.1)
    default = defenses.create("dct-distort")
    assert named.table_source == keywords.table_source == "fd" and named.distort.delta == 0.1
    key = DrawKey(0, [image_id("a"), image_id("b")])
    assert torch.equal(named(x, generator=key), keywords(x, generator=key))
    assert torch.equal(named.quantize.table, keywords.quantize.table)
    learned = defenses.create("dct-distort[table=learned]")  # the shipped learned table: another defense
    assert not torch.equal(named.quantize.table, learned.quantize.table) and default.table_source != "fd"
    chain = defenses.create("fd+rand[pad_value=0.25]")
    assert chain.part_names == ["fd", "rand[pad_value=0.25]"] and chain.parts[1].pad_value == 0.25


@pytest.mark.parametrize("name, message", [
    ("dct-distort[tabel=fd]", "takes no parameter 'tabel'; it takes: table, delta, cells"),
    ("fd[table=jpeg50]", "fixes table='fd'"),
    ("dct-distort[table=fd", "without its ']'"),
    ("dct-distort]", "without its '['"),
    ("dct-distort[table]", "write key=value"),
    ("dct-distort[table=fd,table=fd]", "given twice"),
    ("dct-distort[table=fd]x", "at the end of the name"),
    ("dct-distort[table=nope]", "unknown quantization table 'nope'"),
    ("nope[a=1]", "unknown defense 'nope'"),
    ("dct-distort[delta=abc]", "parameter 'delta' of defense 'dct-distort' must be a number"),
    ("none[x=1]", "defense 'none' takes no parameters"),
])
def test_bad_names_are_one_line_usage_errors(name, message):
    with pytest.raises(UsageError) as e:
        check_defense(name)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_keyword_and_bracket_for_the_same_parameter_is_an_error():
    with pytest.raises(ValueError, match="both in the name"):
        defenses.create("dct-distort[table=fd]", table="jpeg50")


def test_a_users_defense_takes_bracketed_parameters(tmp_path, monkeypatch):
    write_module(tmp_path, "spec_user_defs", (
        "from prepdefense.defenses import Defense\n"
        "class Shift(Defense):\n"
        "    differentiable = True\n"
        "    def __init__(self, amount=0.0):\n"
        "        super().__init__()\n"
        "        self.amount = amount\n"
        "    def apply(self, x, params):\n"
        "        return (x + self.amount).clamp(0, 1)\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    forget("spec_user_defs")
    try:
        d = defenses.create("spec_user_defs:Shift[amount=0.25]")
        assert d.amount == 0.25
        x = torch.full((1, 3, 8, 8), 0.5)
        assert torch.equal(d(x), torch.full_like(x, 0.75))
        with pytest.raises(UsageError, match="cannot be called"):
            check_defense("spec_user_defs:Shift[nope=1]")
    finally:
        forget("spec_user_defs")


def test_evaluate_card_names_the_fd_table(tmp_path, capsys):
    """The name travels through ``evaluate``: the card's id and parameters say the FD table,
    and the run's store is keyed by it (a default-table run is another configuration)."""
    folder = tmp_path / "images"
    noise_images(folder, 4, side=40)
    label_by_model(folder, TinyConvNet().eval())
    config = V.EvaluateConfig(defense=defenses.normalize_name("dct-distort[table=fd]"), norm="linf", eps=8 / 255,
                              budget="smoke", n=2, seed=0, out=tmp_path / "out", data=str(folder), device="cpu",
                              shard_size=2, quiet=True)
    with open(os.devnull, "w") as quiet:
        card = V.evaluate_defense(config, classifier=TinyConvNet(), stream=quiet).card
    assert card["defense"]["name"] == "dct-distort[table=fd]"
    assert card["defense"]["parameters"]["dct-distort[table=fd]"]["table"] == "fd"
    assert "table=fd" in card["defense"]["description"]
    # The same folder with the default table is another run: refused, naming the difference.
    from dataclasses import replace
    from prepdefense.experiments.store import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match=r"defense: 'dct-distort\[table=fd\]' -> 'dct-distort'"):
        with open(os.devnull, "w") as quiet:
            V.evaluate_defense(replace(config, defense="dct-distort"), classifier=TinyConvNet(), stream=quiet)
    # The library spells the name canonically itself.
    with open(os.devnull, "w") as quiet:
        again = V.evaluate_defense(replace(config, defense="DCT-Distort[ table=fd ]"), classifier=TinyConvNet(), stream=quiet)
    assert again.resumed and again.ran == 0 and again.card["defense"]["name"] == "dct-distort[table=fd]"
    # The command line accepts it too (and refuses a typo before any work).
    code, _, err = cli(capsys, "evaluate", "--model", "toy_models:tiny_convnet", "--device", "cpu", "--data", str(folder),
                       "--defense", "dct-distort[tabel=fd]", "--norm", "linf", "--n", "2")
    assert code == 2 and "takes no parameter 'tabel'" in err
