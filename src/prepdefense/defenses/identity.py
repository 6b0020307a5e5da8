"""``none``: no preprocessing (the undefended model, ``--defense none``)."""

import torch

from ._registry import register
from .base import Defense


class Identity(Defense):
    """Returns its input unchanged."""

    differentiable = True

    def apply(self, x: torch.Tensor, params=None) -> torch.Tensor:
        return x


register("none", help="no defense (identity)")(Identity)
