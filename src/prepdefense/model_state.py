"""Leaving a user's model as it came: run it in eval mode for a while, then restore every
submodule's own mode (issue 11, item 2)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (batch norm uses its running statistics and leaves them
    alone; dropout is off) and restore each submodule's ``training`` flag afterwards."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
