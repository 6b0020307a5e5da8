"""The built-in images: scikit-image's bundled colour photos with an ImageNet class
(issue 2, item 4; PROTOCOL.md, "Models and data").

Only photos that ship inside scikit-image (no download) and show an object a person can
name with one of the 1000 ImageNet classes are used, labelled by hand with that class, and
kept only when the default model (efficientnet-lite0, shorter side 256, centre crop 224)
classifies them correctly.

The check (run once when this list was made, scikit-image 0.26, efficientnet-lite0;
re-checked by ``tests/test_data.py``):

=================  =====================================  ==========================
photo              label given (ImageNet index, name)     model's top-1 (prob.)
=================  =====================================  ==========================
chelsea            282 tiger cat                          282 tiger cat (0.38)
coffee             967 espresso                           967 espresso (0.96)
rocket             657 missile                            657 missile (0.38)
motorcycle_left    665 moped                              665 moped (0.50)
=================  =====================================  ==========================

Labelling notes. Chelsea is a striped orange tabby; WordNet defines "tiger cat"
(n02123159) as "a cat having a striped coat" and "tabby" (n02123045) as a grey or tawny
mottled cat, so 282 is the closer gloss (the model's 281/282/285 are all cats). The rocket
photo is a launcher lifting off; ImageNet has no "rocket" class and "missile"
(n03773504, "a rocket carrying a warhead") is the nearest. ImageNet has no "motorcycle"
class; its motorbikes are filed under "moped" (n03785016). Left out: ``astronaut`` (no
ImageNet class for a person or a space suit), ``hubble_deep_field``, ``retina``,
``immunohistochemistry``, ``colorwheel``, ``logo`` (no object class), the right view of
the stereo motorcycle pair (a near duplicate), and every grayscale photo.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
from PIL import Image

from ..errors import DataError
from .entry import ImageEntry

#: (scikit-image photo name, ImageNet label).
BUILTIN_IMAGES: Tuple[Tuple[str, int], ...] = (
    ("chelsea", 282),
    ("coffee", 967),
    ("rocket", 657),
    ("motorcycle_left", 665),
)


def _skimage_array(name: str) -> np.ndarray:
    try:
        import skimage.data as skdata
    except ImportError:
        raise DataError("the built-in images need scikit-image: pip install scikit-image") from None
    if name == "motorcycle_left":
        return skdata.stereo_motorcycle()[0]
    return getattr(skdata, name)()


def _opener(name: str) -> Callable[[], Image.Image]:
    return lambda: Image.fromarray(np.ascontiguousarray(_skimage_array(name)))


def builtin_entries() -> List[ImageEntry]:
    """The built-in images as dataset entries (id ``skimage:<name>``)."""
    return [ImageEntry(f"skimage:{name}", label, _opener(name)) for name, label in BUILTIN_IMAGES]
