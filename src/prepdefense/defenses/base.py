"""The one interface every defense implements (PROTOCOL.md "Conventions", STYLE.md).

A defense is an ``nn.Module`` mapping a [0,1] NCHW batch to a [0,1] NCHW batch on the
input's device and dtype: ``forward(x, *, generator=None, params=None)`` (a new draw, or a
saved one replayed).

Draws are data (kornia's sample-then-apply; :mod:`prepdefense.draws`):

* ``sample_params(x, generator)`` draws everything random for the batch into one
  :class:`~prepdefense.draws.Params` (None for a deterministic defense). Image ``i``'s draw
  comes from its own generator, ``DrawKey.generator(i)``, so it depends only on the run's
  seed, the image's id and the draw's path, never on the batch it is in. A defense
  implements :meth:`Defense.draw` (one image's draw) and the base does the rest.
* ``apply(x, params)`` is deterministic: the same params give the same output, bit for bit
  on CPU, and a draw can be saved and replayed.

A defense made of stages declares them with :meth:`Defense.stages` (name and defense, in
order; e.g. ``dct-distort`` = ``quantize`` then ``distort``, a ``+`` chain its parts). Its
draw is then the draw of each random stage under the key's sub-stream of that stage's name,
and ``apply`` must equal applying the stages in turn (a test holds every registered defense
to this). Each stage says whether it is ``differentiable``; BPDA works from that declaration
alone (:class:`prepdefense.attacks.bpda.BPDA`).

Gradients: a non-differentiable defense never runs on the autograd graph (:meth:`run`
applies it under ``no_grad`` to a detached input); a differentiable one keeps its real
gradient.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..draws import DrawKey, KeyLike, Params, as_key
from ..validation import check_images, check_value_range

__all__ = ["Defense", "ModuleDefense", "as_defense", "check_draw", "check_images", "shaped_like"]


def shaped_like(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``shape`` on ``x``'s device and dtype without copying image data (for
    ``sample_params``, which reads only the shape)."""
    if tuple(shape) == tuple(x.shape):
        return x
    if x.numel() == 0:
        return x.new_empty(tuple(shape))
    return x[:, :, :1, :1].expand(*shape)


class Defense(nn.Module):
    """Base class: [0,1] NCHW in, [0,1] NCHW out, same device and dtype.

    Class attributes:
        randomized: the output depends on the draw.
        differentiable: autograd gives a useful gradient through ``apply`` (if False,
            attacks must use BPDA or a surrogate; the forward runs under ``no_grad``).
        ensemble: number of draws whose softmax ``Defended`` averages per prediction
            (30 for Guo et al.'s random-crop ensemble, 1 otherwise).
        changes_size: the output's H, W differ from the input's (``rand`` pads); see
            :meth:`output_size`.
    """

    randomized: bool = False
    differentiable: bool = False
    ensemble: int = 1
    changes_size: bool = False
    #: ``apply`` checks the input's values itself (finite, in [0, 1] up to the tolerance,
    #: clamped within it) on a copy it makes anyway, so ``forward`` checks only the layout.
    checks_values_in_apply: bool = False

    # -- what a defense declares -------------------------------------------------------------
    @classmethod
    def canonical_params(cls, params: Dict[str, Any]) -> Dict[str, Any]:
        """Its name's bracketed parameters spelled one way (``defenses.normalize_name``), so
        that two spellings of one setting are one id in stores and cards; default: as given.
        ``dct-quant``/``dct-distort`` fold table names: ``table=FD`` is ``table=fd``."""
        return dict(params)

    def stages(self) -> Sequence[Tuple[str, "Defense"]]:
        """The stages this defense applies in order, as ``(name, defense)`` (empty: atomic)."""
        return ()

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """The output's (H, W) for an input of (H, W)."""
        for _, stage in self.stages():
            height, width = stage.output_size(height, width)
        return height, width

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> Params:
        """One image's draw (``x`` is that image, shape (1, C, H, W); only its shape, device
        and dtype may be read) from that image's own generator. Random atomic defenses
        implement this."""
        raise NotImplementedError(f"{type(self).__name__} is randomized but implements neither draw() nor stages()")

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """The defense for a given draw (deterministic). Staged defenses default to applying
        their stages in turn.

        This is the hook a defense implements, called on checked input; it checks neither
        ``x`` nor that ``params`` is ``x``'s draw. To replay a saved draw on a user's batch,
        call ``defense(x, params=params)``, which does."""
        if not self.stages():
            raise NotImplementedError(f"{type(self).__name__} must implement apply()")
        return self.apply_stages(x, params)

    # -- what the base does with it ----------------------------------------------------------
    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        """Draw the random parameters for batch ``x`` (None for a deterministic defense).

        ``generator``: a :class:`~prepdefense.draws.DrawKey` (per-image draws), an int seed,
        a ``torch.Generator`` or None (see :func:`prepdefense.draws.as_key`). The draw records
        ``x``'s height and width (``Params.image_size``).
        """
        if not self.randomized:
            return None
        key = as_key(generator, x.shape[0])
        stages = self.stages()
        if stages:
            params = Params()
            shape = tuple(x.shape)
            for name, stage in stages:
                if stage.randomized:
                    params[name] = stage.sample_params(shaped_like(x, shape), key.child(name))
                shape = (*shape[:2], *stage.output_size(*shape[2:]))
            return params.for_images(x)
        if x.shape[0] == 0:  # the layout of an empty draw: one image's, with no rows
            params = self.draw_images(shaped_like(x, (1, *x.shape[1:])), [key_generator_for_empty()]).select(slice(0, 0))
        else:
            params = self.draw_images(x, key.generators())
        return params.for_images(x)

    def draw_images(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> Params:
        """The draws of a batch, image ``i`` from ``generators[i]``: :meth:`draw` per image,
        joined. A defense may override this to draw faster, provided image ``i``'s draw still
        comes from ``generators[i]`` alone (and so equals ``draw(x[i:i+1], generators[i])``)."""
        return Params.cat([self.draw(x[i : i + 1], g) for i, g in enumerate(generators)])

    def apply_stages(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """Apply :meth:`stages` in turn, each with its own part of ``params``."""
        for name, stage in self.stages():
            x = stage.run(x, None if params is None else params.get(name))
        return x

    def run(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """``apply`` with the gradient rule: off the autograd graph unless ``differentiable``."""
        if self.differentiable:
            return self.apply(x, params)
        with torch.no_grad():  # not on the autograd graph: BPDA supplies the gradient
            return self.apply(x.detach(), params)

    def forward(self, x: torch.Tensor, *, generator: KeyLike = None, params: Optional[Params] = None) -> torch.Tensor:
        """The defense on ``x``: a new draw from ``generator``, or the saved draw ``params``
        replayed (:func:`check_draw`).

        Shape: (N, C, H, W) in [0, 1] -> (N, C, H', W') in [0, 1] (see
        :func:`prepdefense.validation.check_images` for what is checked and the tolerance).

        Raises:
            TypeError / ValueError: ``x`` as :func:`~prepdefense.validation.check_images`;
                ``params`` as :func:`check_draw`.
        """
        x = check_images(x, values=not self.checks_values_in_apply)
        if params is not None:
            return replay(self, params, x, generator, self.run)
        return self.run(x, self.sample_params(x, generator) if self.randomized else None)


def check_draw(owner: nn.Module, params: Optional[Params], x: torch.Tensor, generator: KeyLike = None, *,
               size: Optional[Sequence[int]] = None) -> Optional[Params]:
    """``params`` if it can be ``owner``'s draw for the batch ``x`` (a replay), else an error:
    a draw for a deterministic defense, something that is not a :class:`Params`, a draw for
    another number of images or for images of another size (``Params.image_size`` against
    ``size``, the (height, width) the owner runs its defense at: default ``x``'s), or a draw
    given together with a ``generator``. A draw with no recorded size (built by hand, or saved
    before draws recorded it) is not size-checked: read at another size, it fails in
    :func:`replay` when an index falls outside, and otherwise is not detected.

    Raises:
        TypeError: ``params`` not a ``Params``.
        ValueError: any other mismatch, saying how to select a sub-batch's draw.
    """
    if params is None:
        return None
    name = type(owner).__name__
    if generator is not None:
        raise ValueError(f"{name}: give generator (a new draw) or params (a saved draw to replay), not both")
    if not getattr(owner, "randomized", False):
        raise ValueError(f"{name} is deterministic: it has no draw to replay (call it without params)")
    if not isinstance(params, Params):
        raise TypeError(f"params must be the prepdefense.draws.Params of a draw (sample_params or Params.load), got {type(params).__name__}")
    n = params.batch_size()
    if n is not None and n != x.shape[0]:
        raise ValueError(f"{name}: the draw is for {n} images but x has {x.shape[0]}; "
                         f"replay the draws of the images kept with params.select(index)")
    made, wanted = params.image_size, tuple(int(s) for s in (x.shape[-2:] if size is None else size))
    if made is not None and tuple(made) != wanted:
        where = f"x is {wanted[0]}x{wanted[1]}" if size is None else f"it runs its defense at {wanted[0]}x{wanted[1]}"
        raise ValueError(f"{name}: the draw was made for {made[0]}x{made[1]} images but {where}; "
                         f"its pixel positions belong to that size: replay it on images of that size, or draw "
                         f"again for x with sample_params(x, generator)")
    return params


def replay(owner: nn.Module, params: Params, x: torch.Tensor, generator: KeyLike, run, *,
           size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``run(x, params)`` for a replay: ``params`` checked by :func:`check_draw`, and a clear
    error when the draw does not fit all the same (another defense's draw, or a draw with no
    recorded size made on images of another size: reading it raises the index or key error
    caught here)."""
    params = check_draw(owner, params, x, generator, size=size)
    try:
        return run(x, params)
    except (KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"{type(owner).__name__}: the draw does not fit x {tuple(x.shape)} (a draw of another defense, "
                         f"or one made on images of another size?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def key_generator_for_empty() -> torch.Generator:
    """A fixed generator for drawing the layout of an empty batch's draw."""
    return DrawKey(0, n=1).generator(0)


class ModuleDefense(Defense):
    """Adapter for a plain module called as ``module(x)`` or ``module(x, generator=g)``.

    Its ``randomized`` and ``differentiable`` attributes are read from the module (default
    False). A random module draws from one ``torch.Generator`` for the whole batch, so its
    draw depends on the batch: the draw records that generator's seed once per image (all
    equal), and replaying a sub-batch replays the whole-batch generator on fewer images.
    Write a :class:`Defense` (``draw`` + ``apply``) for per-image draws.
    """

    def __init__(self, module: nn.Module, *, images_out: bool = True) -> None:
        super().__init__()
        self.module = module
        self.images_out = bool(images_out)  # False: a random model (EOT's), whose output is logits
        self.randomized = bool(getattr(module, "randomized", False))
        self.differentiable = bool(getattr(module, "differentiable", False))
        self.ensemble = int(getattr(module, "ensemble", 1))
        self.changes_size = bool(getattr(module, "changes_size", False))

    def sample_params(self, x: torch.Tensor, generator: KeyLike = None) -> Optional[Params]:
        if not self.randomized:
            return None
        key = as_key(generator, x.shape[0])
        seed = int(torch.randint(0, 2**62, (1,), generator=key.batch_generator()))
        return Params(batch_seed=torch.full((x.shape[0],), seed, dtype=torch.int64)).for_images(x)

    def apply(self, x: torch.Tensor, params: Optional[Params]) -> torch.Tensor:
        """The module's output, checked (unless ``images_out`` is False): a tensor of x's batch
        size and channels, finite and in [0, 1] (a user's module that returns 0..255 or
        normalised values would feed them to the classifier unnoticed).

        Raises:
            TypeError: a random module (``randomized = True``) that takes no ``generator``.
            ValueError: an output that is not such an image batch.
        """
        name = type(self.module).__name__
        if params is None or x.shape[0] == 0:
            out = self.module(x)
        else:
            try:
                out = self.module(x, generator=DrawKey(int(params["batch_seed"][0]), n=1).generator(0))
            except TypeError as e:
                if "unexpected keyword argument 'generator'" not in str(e):
                    raise
                raise TypeError(f"{name} declares randomized = True, so it is called as module(x, generator=g) with a "
                                f"torch.Generator for its draws, but it takes no generator ({e})") from e
        if not self.images_out:
            return out
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[:2] != x.shape[:2]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the defense {name} must return an image batch (N, C, H, W) like its input {tuple(x.shape[:2])}..., got {shape}")
        if out.numel():
            # the user's code, not an input: checked whatever validation.no_value_checks says
            check_images(out.detach(), name=f"the output of the defense {name}", clamp=False, values=False)
            check_value_range(out.detach(), name=f"the output of the defense {name}")
        return out


def as_defense(module: nn.Module) -> Defense:
    """``module`` itself if it is a :class:`Defense`, else a :class:`ModuleDefense` around it.

    Raises:
        TypeError: ``module`` is not callable, or is a defense's name (build it with
            ``prepdefense.defenses.create(name)``).
    """
    if isinstance(module, Defense):
        return module
    if isinstance(module, str):
        raise TypeError(f"a defense object is needed here, got the name {module!r}: "
                        f"pass prepdefense.defenses.create({module!r})")
    if isinstance(module, type):
        raise TypeError(f"a defense object is needed here, got the class {module.__name__}: pass an instance, {module.__name__}()")
    if not callable(module):
        raise TypeError(f"a defense must be a prepdefense Defense or a module mapping [0, 1] NCHW images "
                        f"to images, got {type(module).__name__}")
    return ModuleDefense(module)
