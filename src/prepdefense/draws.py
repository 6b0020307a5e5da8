"""Draws as data: per-image random keys and the one type that holds a draw.

Two things make a random defense's draw reproducible whatever the batching:

* :class:`DrawKey` says *which* draw each image gets. Image ``i``'s draw depends only on
  ``(seed, ids[i], path)``: the run's seed, the image's own id (its position in the run, or a
  stable hash of its file name, :func:`image_id`), and the path of labels that led to this draw
  (``key.child("eot", 3)`` is the fourth EOT draw, ``key.child("verdict", 0)`` the first
  verdict draw). It never depends on the batch size, on which other images share the batch
  or on the shard: a batch is ``key.select(rows)`` of the run's key.
* :class:`Params` holds *what* was drawn: a mapping of names to per-image tensors (leading
  dimension N) or nested :class:`Params`. ``defense.sample_params(x, key)`` returns one and
  ``defense.apply(x, params)`` replays it deterministically, so a draw that fooled the model
  can be sliced (:meth:`Params.select`), merged (:meth:`Params.cat`), saved and replayed
  (:meth:`Params.save`, :meth:`Params.load`).

The per-image generator of a key is a CPU ``torch.Generator`` seeded with the first 63 bits
of BLAKE2b over ``(seed, len(path), *path, id)`` as little-endian 64-bit words (string labels
enter as their CRC-32), so CPU and CUDA runs draw the same numbers. A cryptographic hash makes
the seeds of neighbouring ids and paths unrelated, as numpy's ``SeedSequence`` does, at a
tenth of its cost (about 1.5 us an image, which matters when every call of a defense draws
per image). Every defense in the library draws through it; the scheme is
named by :data:`DRAW_SCHEME` in run metadata, so a change of scheme is visible.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .atomic_io import atomic_write_with
from .seeding import child_seed, make_generator

__all__ = ["DRAW_SCHEME", "DrawKey", "Params", "image_id", "as_key", "KeyLike"]

#: Version of the per-image draw scheme, recorded beside results (issue 9, item 2).
DRAW_SCHEME = "per-image-blake2b-v2"

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _hash63(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def _label(value: Union[int, str]) -> int:
    if isinstance(value, str):
        return zlib.crc32(value.encode("utf-8"))
    value = int(value)
    if value < 0:
        raise ValueError(f"draw labels must be non-negative integers or strings, got {value}")
    return value


def image_id(name: str) -> int:
    """A stable 63-bit id for an image from its name (file name or dataset id)."""
    return int.from_bytes(hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest(), "little") & _MASK63


class DrawKey:
    """Which draw each image of a batch gets (see the module docstring).

    Args:
        seed: the run's seed (a non-negative integer).
        ids: (N,) non-negative image ids (default ``0..N-1``, with ``n``).
        path: labels of the sub-stream (ints or strings).
        n: batch size when ``ids`` is not given.

    A key is immutable; :meth:`child` and :meth:`select` return new keys.
    """

    __slots__ = ("seed", "ids", "path")

    def __init__(self, seed: int, ids: Union[None, torch.Tensor, Sequence[int]] = None, path: Tuple[int, ...] = (), *, n: Optional[int] = None) -> None:
        if ids is None:
            if n is None:
                raise ValueError("DrawKey needs ids or n")
            ids = torch.arange(int(n), dtype=torch.int64)
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten().cpu()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("image ids must be non-negative")
        self.seed = int(seed) & _MASK63
        self.ids = ids
        self.path = tuple(_label(p) for p in path)

    # -- making keys -------------------------------------------------------------------------
    @classmethod
    def from_seed(cls, seed: int, n: int, ids: Union[None, torch.Tensor, Sequence[int]] = None) -> "DrawKey":
        """The root key of a run: ``seed`` and ``n`` images with ``ids`` (default ``0..n-1``)."""
        key = cls(seed, ids, n=n)
        if len(key) != n:
            raise ValueError(f"{len(key)} image ids for {n} images")
        return key

    def child(self, *labels: Union[int, str]) -> "DrawKey":
        """The sub-stream ``path + labels`` of the same images."""
        return DrawKey(self.seed, self.ids, self.path + tuple(_label(l) for l in labels))

    def select(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "DrawKey":
        """The key of a sub-batch (the same draws for the images kept)."""
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return DrawKey(self.seed, self.ids[index], self.path)

    @staticmethod
    def cat(keys: Sequence["DrawKey"]) -> "DrawKey":
        """Keys of consecutive sub-batches joined (one seed and path)."""
        first = keys[0]
        if any(k.seed != first.seed or k.path != first.path for k in keys):
            raise ValueError("only keys of one seed and path can be joined")
        return DrawKey(first.seed, torch.cat([k.ids for k in keys]), first.path)

    # -- drawing -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.ids.numel())

    def _prefix(self) -> bytes:
        return struct.pack(f"<{2 + len(self.path)}Q", self.seed, len(self.path), *(p & _MASK64 for p in self.path))

    def image_seeds(self) -> List[int]:
        """The 63-bit seed of every image's generator, in batch order (see the module docstring)."""
        prefix = self._prefix()
        return [_hash63(prefix + struct.pack("<Q", i)) for i in self.ids.tolist()]

    def image_seed(self, i: int) -> int:
        """The 63-bit seed of image ``i``'s generator."""
        return _hash63(self._prefix() + struct.pack("<Q", int(self.ids[i])))

    def generator(self, i: int) -> torch.Generator:
        """Image ``i``'s CPU generator."""
        return make_generator(self.image_seed(i))

    def generators(self) -> List[torch.Generator]:
        """One CPU generator per image, in batch order."""
        return [make_generator(s) for s in self.image_seeds()]

    def batch_generator(self) -> torch.Generator:
        """One generator for the whole batch, from the key's seed, path and every id: for
        random code that cannot draw per image (its draws then depend on the batch)."""
        ids = self.ids.tolist()
        return make_generator(_hash63(b"batch" + self._prefix() + struct.pack(f"<{len(ids)}Q", *ids)))

    # -- records -----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able record (``DrawKey.from_dict`` rebuilds the key)."""
        return {"scheme": DRAW_SCHEME, "seed": self.seed, "ids": self.ids.tolist(), "path": list(self.path)}

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> "DrawKey":
        if record.get("scheme", DRAW_SCHEME) != DRAW_SCHEME:
            raise ValueError(f"draw key of scheme {record.get('scheme')!r}; this version draws with {DRAW_SCHEME!r}")
        return cls(record["seed"], record["ids"], tuple(record["path"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DrawKey) and (self.seed, self.path) == (other.seed, other.path) and torch.equal(self.ids, other.ids)

    def __repr__(self) -> str:
        return f"DrawKey(seed={self.seed}, n={len(self)}, path={self.path})"


#: What ``generator=`` accepts across the library.
KeyLike = Union[None, int, torch.Generator, DrawKey]


def as_key(generator: KeyLike, n: int) -> DrawKey:
    """The :class:`DrawKey` for a batch of ``n`` images from what a caller passed.

    * a :class:`DrawKey`: itself (its length must be ``n``);
    * an ``int``: ``DrawKey.from_seed(seed, n)``, images numbered by batch position;
    * a ``torch.Generator``: a seed drawn from it, images numbered by batch position (the
      generator advances, so two calls give two draws);
    * ``None``: a fresh, nondeterministic seed.

    Only a key with the images' own ids makes draws independent of how images are batched;
    attacks and experiments build one per run.
    """
    if isinstance(generator, DrawKey):
        if len(generator) != n:
            raise ValueError(f"a draw key for {len(generator)} images was given a batch of {n}")
        return generator
    if isinstance(generator, torch.Generator):
        return DrawKey(child_seed(generator), n=n)
    if generator is None:
        return DrawKey(child_seed(make_generator(None)), n=n)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        if not 0 <= int(generator) <= _MASK63:
            raise ValueError(f"an int seed must be between 0 and 2**63-1, got {int(generator)}")
        return DrawKey(int(generator), n=n)
    raise TypeError(f"generator must be None, an int seed, a torch.Generator or a DrawKey, got {type(generator).__name__}")


class Params(dict):
    """One draw of a random defense (or model) for a batch: names to per-image values.

    Values are tensors whose first dimension is the batch (one row per image, on the CPU
    unless moved), nested :class:`Params`, or ``None``. Slicing, joining, moving and saving
    treat every tensor the same way, so a draw can be replayed for any subset of images.

    ``image_size`` is the ``(height, width)`` in pixels of the images the draw was made for,
    set by ``sample_params`` (None for a draw built by hand from a plain dict, or saved before
    it was recorded). A defense's replay refuses a draw made for another size, as does
    ``Defended``'s for the size it runs the defense at: the draw's pixel positions (crop
    corners, deflected pixels, pad offsets) belong to that size. Slicing, joining, moving,
    copying (``Params(p)``, ``p.copy()``), pickling, saving and loading keep it.
    """

    #: (height, width) of the images the draw was made for, or None when not recorded.
    image_size: Optional[Tuple[int, int]] = None

    _SIZE_KEY = "__image_size__"  # where :meth:`save` writes ``image_size``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(args) == 1 and isinstance(args[0], Params):
            self.image_size = args[0].image_size

    def copy(self) -> "Params":
        """A shallow copy, with the same ``image_size``."""
        return Params(self)

    def for_images(self, x: torch.Tensor) -> "Params":
        """This draw, recorded as made for images of ``x``'s height and width (in place)."""
        self.image_size = (int(x.shape[-2]), int(x.shape[-1]))
        return self

    def _like_self(self, values: Dict[str, Any]) -> "Params":
        out = Params(values)
        out.image_size = self.image_size
        return out

    def select(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "Params":
        """The draw of a sub-batch."""
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return self._like_self({k: (v.select(index) if isinstance(v, Params) else v[index] if isinstance(v, torch.Tensor) else v)
                                for k, v in self.items()})

    @staticmethod
    def cat(parts: Sequence[Optional["Params"]]) -> Optional["Params"]:
        """Draws of consecutive sub-batches joined along the batch. The joined draw is for the
        size the parts were made for (parts with no recorded size take it on).

        Raises:
            ValueError: parts made for images of different sizes (no batch holds both).
        """
        parts = list(parts)
        if not parts or parts[0] is None:
            return None
        first = parts[0]
        out = Params()
        sizes = sorted({tuple(p.image_size) for p in parts if p.image_size is not None})
        if len(sizes) > 1:
            raise ValueError(f"cannot join draws made for images of different sizes "
                             f"({', '.join(f'{h}x{w}' for h, w in sizes)}): one batch has one size")
        out.image_size = sizes[0] if sizes else None
        for k, v in first.items():
            values = [p[k] for p in parts]
            if isinstance(v, Params):
                out[k] = Params.cat(values)
            elif isinstance(v, torch.Tensor):
                out[k] = torch.cat(values, dim=0)
            else:
                out[k] = v
        return out

    def to(self, device=None) -> "Params":
        """The same draw with every tensor on ``device``."""
        return self._like_self({k: (v.to(device) if isinstance(v, (Params, torch.Tensor)) else v) for k, v in self.items()})

    def batch_size(self) -> Optional[int]:
        """The number of images the draw is for (None if it holds no tensor)."""
        for v in self.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
            if isinstance(v, Params):
                n = v.batch_size()
                if n is not None:
                    return n
        return None

    def _plain(self) -> Dict[str, Any]:
        if Params._SIZE_KEY in self:
            raise ValueError(f"a draw may not hold an entry named {Params._SIZE_KEY!r}: save writes image_size there")
        plain = {k: (v._plain() if isinstance(v, Params) else v) for k, v in self.items()}
        if self.image_size is not None:
            plain[Params._SIZE_KEY] = tuple(self.image_size)
        return plain

    @staticmethod
    def _from_plain(value: Any) -> Any:
        if isinstance(value, dict):
            size = value.get(Params._SIZE_KEY)
            out = Params({k: Params._from_plain(v) for k, v in value.items() if k != Params._SIZE_KEY})
            out.image_size = None if size is None else (int(size[0]), int(size[1]))
            return out
        return value

    def save(self, path: Union[str, Path]) -> None:
        """Write the draw to ``path`` (``torch.save`` of plain dicts and tensors, atomically;
        ``image_size`` goes in as the entry ``"__image_size__"``)."""
        plain = self.to("cpu")._plain()
        atomic_write_with(path, lambda fh: torch.save(plain, fh))

    @staticmethod
    def load(path: Union[str, Path]) -> "Params":
        """Read a draw written by :meth:`save` (tensors only: ``weights_only=True``). A file
        written before draws recorded their size loads with ``image_size`` None."""
        return Params._from_plain(torch.load(Path(path), map_location="cpu", weights_only=True))

    def __repr__(self) -> str:
        size = [] if self.image_size is None else [f"image_size={self.image_size[0]}x{self.image_size[1]}"]
        return f"Params({', '.join([f'{k}={_describe(v)}' for k, v in self.items()] + size)})"


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    return repr(v)
