"""The attack registry, in a module of its own so that attack modules register their
classes without importing the package (no import cycle through ``attacks/__init__``)."""

from ..registry import Registry

REGISTRY = Registry("attack")
register = REGISTRY.register
