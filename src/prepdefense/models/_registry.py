"""The model registry, in a module of its own so that model modules register their
factories without importing the package (no import cycle through ``models/__init__``)."""

from ..registry import Registry

REGISTRY = Registry("model")
register = REGISTRY.register
