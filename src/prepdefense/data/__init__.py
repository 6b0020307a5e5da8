"""Labelled images for every command: folders, ImageNet synset folders, built-in photos
(issue 2, item 4 and 6; PROTOCOL.md, "Models and data", "Protocol sample").

- :func:`load_dataset` -> :class:`ImageDataset` (``ds[i] -> (x, label, id)``, ``.skipped``).
- :func:`load_images` decodes everything into one NCHW batch.
- :func:`iter_batches` yields ``(x, labels, ids)`` batches, skipping unreadable files.
- :func:`protocol_sample` picks N correctly classified images and a target each, from a seed.
- :func:`imagenet_class_names` / :func:`imagenet_wnids` give the 1000 classes in label order.
"""

from .loading import (
    DEFAULT_CROP_FRACTION,
    MAX_PIXELS,
    MIN_SIDE,
    NUM_CLASSES,
    ImageDataset,
    ImageEntry,
    SkippedFileWarning,
    SkippedImageError,
    decode_image,
    imagenet_class_names,
    imagenet_wnids,
    iter_batches,
    load_dataset,
    load_images,
    resize_center_crop,
    to_rgb,
)
from .sampling import ProtocolSample, draw_targets, protocol_sample

__all__ = [
    "DEFAULT_CROP_FRACTION",
    "MAX_PIXELS",
    "MIN_SIDE",
    "NUM_CLASSES",
    "ImageDataset",
    "ImageEntry",
    "ProtocolSample",
    "SkippedFileWarning",
    "SkippedImageError",
    "decode_image",
    "draw_targets",
    "imagenet_class_names",
    "imagenet_wnids",
    "iter_batches",
    "load_dataset",
    "load_images",
    "protocol_sample",
    "resize_center_crop",
    "to_rgb",
]
