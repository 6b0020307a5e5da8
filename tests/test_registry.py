"""The registries of defenses and attacks (issue 9, item 7): classes registered directly."""

from __future__ import annotations

import functools

import pytest
from torch import nn

from prepdefense import attacks, defenses
from prepdefense.defenses.dct_quant import DCTQuantize
from prepdefense.attacks.protocol import ProtocolBPDA
from prepdefense.registry import Registry

REGISTRIES = {"defense": defenses.REGISTRY, "attack": attacks.REGISTRY}
ENTRIES = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_every_entry_is_a_class_or_a_partial_of_one(kind, name):
    """No pass-through factory functions: a class, or a functools.partial of one."""
    reg = REGISTRIES[kind]
    factory = reg.get(name)
    while isinstance(factory, functools.partial):
        factory = factory.func
    assert isinstance(factory, type), f"{kind} {name!r} is registered as {factory!r}"
    assert reg.entry(name).target is factory
    assert reg.describe(name), f"{kind} {name!r} has no description"


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_registry_creates_every_name(kind, name):
    obj = REGISTRIES[kind].create(name)
    assert isinstance(obj, REGISTRIES[kind].entry(name).target)
    if kind == "defense":
        assert isinstance(obj, nn.Module)
    else:
        assert callable(obj)


def test_pinned_and_changed_defaults():
    fd = defenses.create("fd")
    assert isinstance(fd, DCTQuantize) and "table=fd" in repr(fd)
    with pytest.raises(TypeError, match="fixes table='fd'"):
        defenses.create("fd", table="default")
    assert "table" not in defenses.REGISTRY.parameters("fd")
    assert attacks.create("bpda").eot == 1
    with pytest.raises(TypeError, match="fixes eot=1"):
        attacks.create("bpda", eot=5)
    eot = attacks.create("bpda-eot")
    assert isinstance(eot, ProtocolBPDA) and eot.eot == 30
    assert attacks.create("bpda-eot", eot=4).eot == 4  # a partial's default can be changed
    assert attacks.REGISTRY.parameters("bpda-eot")["eot"].default == 30


def test_description_from_the_class_docstring():
    reg = Registry("thing")

    class Thing:
        """A thing, described by its first docstring line.

        More text."""

        def __init__(self, *, size: int = 3) -> None:
            self.size = size

    reg.register("thing")(Thing)
    assert reg.describe("thing") == "A thing, described by its first docstring line."
    assert list(reg.parameters("thing")) == ["size"] and reg.parameters("thing")["size"].default == 3
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("thing")(Thing)
    with pytest.raises(KeyError, match="unknown thing 'other'; known: thing"):
        reg.create("other")
