"""The defense registry, in a module of its own so that defense modules register their
classes without importing the package (no import cycle through ``defenses/__init__``)."""

from ..registry import Registry

REGISTRY = Registry("defense")
register = REGISTRY.register
