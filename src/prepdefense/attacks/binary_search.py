"""The per-image binary search over the trade-off constant ``c`` of C&W L2 and L-BFGS
(Carlini & Wagner 2017, Section 6: "we use binary search to find the smallest c"; Szegedy et al.
2014 search c the same way).

After each search step, an image that succeeded lowers its upper bound to the ``c`` it used; one
that failed raises its lower bound. ``c`` becomes the middle of the bounds once an upper bound is
known, and is multiplied by 10 until then.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["NO_UPPER", "next_constants"]

#: The upper bound of an image that has not succeeded yet.
NO_UPPER = 1e10


def next_constants(found, const, lower, upper) -> Tuple:
    """``(const, lower, upper)`` for the next search step (torch tensors or numpy arrays, all of
    one kind, shape (N,)); ``found`` marks the images that succeeded with ``const``."""
    if isinstance(const, np.ndarray):
        out = next_constants(*(torch.from_numpy(np.asarray(a)) for a in (found, const, lower, upper)))
        return tuple(t.numpy() for t in out)
    upper = torch.where(found, torch.minimum(upper, const), upper)
    lower = torch.where(found, lower, torch.maximum(lower, const))
    const = torch.where(upper < NO_UPPER / 10, (lower + upper) / 2, const * 10)
    return const, lower, upper
