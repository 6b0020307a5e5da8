"""One labelled image and how to open it: the record every image source produces.

Its own module so that the sources (``loading.py`` for folders, ``builtin.py`` for the
scikit-image photos) both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

__all__ = ["ImageEntry"]


@dataclass(frozen=True)
class ImageEntry:
    """One labelled image: its id (relative path or builtin name), label and how to open it."""

    id: str
    label: int
    opener: Callable[[], Image.Image]
