"""A digest of the values a defense holds (its quantization table, a user's weights).

Run stores record it beside the defense's name (``evaluate``'s ``defense_state``), and
``check-defense`` checks that building the defense twice gives the same one, so that a
resumed run is a run of the same defense, not only of the same name.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Optional

import torch

__all__ = ["state_digest", "plain_tensors"]


def plain_tensors(defense: torch.nn.Module) -> Dict[str, str]:
    """The tensors a defense (or any of its submodules) holds as plain attributes
    (``self.w = torch.rand(3)``), by dotted name, each as a digest of its dtype, shape and
    values: they are not in ``state_dict()``, so :func:`state_digest` cannot see them, nor does
    ``.to(device)`` move them. ``check-defense`` compares them between two builds and asks for
    ``register_buffer`` instead. Tensors inside lists, tuples or dicts, and modules kept in
    plain lists, are not looked for.

    Raises:
        ValueError: a tensor that cannot be read (e.g. on the meta device).
    """
    found: Dict[str, str] = {}
    for prefix, module in defense.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                name = f"{prefix}.{key}" if prefix else key
                try:
                    h = hashlib.sha256()
                    _hash_tensor(h, value)
                except Exception as e:  # noqa: BLE001 - a user's tensor: say which and why, in one line
                    raise ValueError(f"cannot read {name!r} of defense {type(defense).__name__}: {e}") from None
                found[name] = h.hexdigest()[:16]
    return found


def _hash_tensor(h, value: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and values to ``h`` (read on the CPU; sparse as dense,
    quantized as its integers with its scheme)."""
    t = value.detach().to("cpu")
    if t.is_sparse:
        t = t.to_dense()
    if t.is_quantized:
        h.update(f"{t.qscheme()}|{t.q_scale() if t.qscheme() == torch.per_tensor_affine else ''}|".encode())
        t = t.int_repr()
    t = t.resolve_conj().resolve_neg().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_digest(defense: torch.nn.Module) -> Optional[str]:
    """``"sha256:<16 hex>"`` over a defense's ``state_dict()`` (its parameters and persistent
    buffers: name, dtype, shape and values, on the CPU; other state entries by their
    ``repr``), or ``None`` when it holds none. Run stores record it beside the defense's name,
    so a run never resumes under other values behind the same name (the shipped learned table
    that ``dct-distort`` uses by default, a user's weights). Plain attributes (see
    :func:`plain_tensors`) and non-persistent buffers are not part of it.

    Raises:
        ValueError: the state cannot be read (e.g. a lazy module not yet initialised).
    """
    try:
        state = sorted(defense.state_dict().items())
    except Exception as e:  # noqa: BLE001 - a user's module: say which and why, in one line
        raise ValueError(f"cannot read the state of defense {type(defense).__name__}: {e}") from None
    if not state:
        return None
    h = hashlib.sha256()
    for key, value in state:
        h.update(f"{key}|".encode())
        if isinstance(value, torch.Tensor):
            if isinstance(value, torch.nn.parameter.UninitializedTensorMixin):
                raise ValueError(f"defense {type(defense).__name__} holds an uninitialised (lazy) {key!r}; run it once first")
            _hash_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return "sha256:" + h.hexdigest()[:16]
