"""Reading labelled images into [0,1] CHW tensors (PROTOCOL.md, "Models and data").

One pipeline for every source: a folder with ``labels.csv`` (``file,label,wnid,name``, the
format of the shared ImageNet sample), an ImageNet-style folder of synset sub-folders
(``n01440764/...``; label = index of the wnid among the 1000 sorted ImageNet wnids), or the
built-in scikit-image photos (:mod:`prepdefense.data.builtin`).

Every image is converted to 8-bit RGB (grayscale, RGBA, CMYK, 16-bit, palette with or
without transparency; transparent pixels are composited onto white), its shorter side is
resized to ``round(size / crop_fraction)`` (bilinear with antialiasing, Pillow) and the
centre ``size x size`` is cropped: the standard ImageNet evaluation transform (crop
fraction 0.875, i.e. 256 -> 224 and 342 -> 299). Measured once with efficientnet-lite0 on
the 1000 shared ImageNet images: top-1 0.876 with this transform, 0.857 when the shorter
side is resized straight to 224 (no margin), so the standard one is kept.

Bad files never stop a run: an unreadable, truncated, non-image, too small (shorter side
< :data:`MIN_SIDE`) or decompression-bomb-sized (> :data:`MAX_PIXELS`) file, or one listed
in ``labels.csv`` but absent, is skipped with one :class:`SkippedFileWarning` and counted in
``ImageDataset.skipped``. A missing or empty folder, or a ``labels.csv`` with a bad row,
raises :class:`~prepdefense.errors.DataError` (the CLI prints it as one line).

Decoding is lazy: building a dataset reads only the file headers (which catches most bad
files); pixel data are decoded on access, and a file whose pixel data turn out unreadable
(a truncated JPEG, say) is skipped and counted when :func:`iter_batches` reaches it.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError
from ..validation import check_int
from .builtin import builtin_entries
from .entry import ImageEntry

#: Files whose shorter side is below this many pixels are skipped (too small to classify).
MIN_SIDE = 32
#: Files with more pixels than this are skipped as decompression bombs (Pillow's default limit).
MAX_PIXELS = 89_478_485
#: Fraction of the resized image kept by the centre crop (standard ImageNet evaluation).
DEFAULT_CROP_FRACTION = 0.875
NUM_CLASSES = 1000

_WNID = re.compile(r"^n\d{8}$")


class SkippedFileWarning(UserWarning):
    """A file was skipped (unreadable, truncated, not an image, too small, too large, absent)."""


class SkippedImageError(DataError):
    """Raised by ``ImageDataset[i]`` when image ``i`` cannot be decoded; it is then skipped."""


# ---------------------------------------------------------------- ImageNet classes


@lru_cache(maxsize=1)
def _class_table() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    text = resources.files(__package__).joinpath("imagenet_classes.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    wnids = tuple(r["wnid"] for r in rows)
    names = tuple(r["name"] for r in rows)
    assert len(wnids) == NUM_CLASSES and list(wnids) == sorted(wnids), "corrupt imagenet_classes.csv"
    return wnids, names


def imagenet_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in label order (sorted, the standard 0..999 indices)."""
    return _class_table()[0]


def imagenet_class_names() -> Tuple[str, ...]:
    """Readable names of the 1000 ImageNet-1k classes in label order (``281 -> 'tabby'``)."""
    return _class_table()[1]


# ---------------------------------------------------------------- decoding one image


def _warn_skip(ident: str, reason: str) -> None:
    warnings.warn(f"skipped {ident}: {reason}", SkippedFileWarning, stacklevel=3)


def _open_checked(opener: Callable[[], Image.Image]) -> Image.Image:
    """Open an image (header only) and reject bombs and tiny images; raises SkippedImageError."""
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both mean "skip".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = opener()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SkippedImageError(f"decompression-bomb-sized image ({e})") from None
        except FileNotFoundError:
            raise SkippedImageError("file not found") from None
        except Image.UnidentifiedImageError:
            raise SkippedImageError("not an image Pillow can read") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise SkippedImageError(f"unreadable ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise SkippedImageError(f"{w}x{h} pixels exceeds the decompression-bomb limit of {MAX_PIXELS}")
    if min(w, h) < MIN_SIDE:
        img.close()
        raise SkippedImageError(f"{w}x{h} is too small (shorter side < {MIN_SIDE} px)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Grayscale and CMYK convert directly; 16/32-bit integer images ('I;16', 'I') are scaled
    from 0..65535 to 0..255; float images ('F') are read as [0,1] when their maximum is at
    most 1, else as 0..255; images with transparency (RGBA, LA, PA, palette with a
    transparent index) are composited onto white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        else:
            a = a * (255.0 / 65535.0)
        return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> Image.Image:
    """Resize the shorter side to ``round(size / crop_fraction)`` (bilinear, antialiased),
    then crop the centre ``size x size``."""
    w, h = img.size
    short = max(int(round(size / crop_fraction)), size)
    scale = short / min(w, h)
    nw, nh = max(short, int(round(w * scale))), max(short, int(round(h * scale)))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB Pillow image -> float CHW tensor in [0,1]."""
    a = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def decode_image(opener: Callable[[], Image.Image], size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> torch.Tensor:
    """Open, fully decode, convert to RGB, resize and centre-crop one image.

    Raises:
        SkippedImageError: unreadable, truncated, not an image, too small or too large.

    Shape: -> (3, size, size), float in [0, 1].
    """
    img = _open_checked(opener)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a malformed EXIF block is no reason to drop the pixels
                pass
            rgb = to_rgb(img)
            out = resize_center_crop(rgb, size, crop_fraction)
            return pil_to_tensor(out)
    except SkippedImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else f"cannot decode ({type(e).__name__}: {msg})"
        raise SkippedImageError(reason) from None
    finally:
        img.close()


# ---------------------------------------------------------------- datasets


def _file_opener(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path)


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images resized and centre-cropped to ``size``; ``ds[i] -> (x, label, id)``.

    Attributes:
        size: the square side of every image tensor.
        source: where the images come from (folder path or ``"builtin"``).
        skipped: files skipped so far (bad headers at construction, plus pixel data found
            unreadable while iterating with :func:`iter_batches`).

    ``ds[i]`` raises :class:`SkippedImageError` for an image whose pixel data cannot be
    decoded; :func:`iter_batches` and :func:`load_images` skip those and count them.

    Shape: ``ds[i][0]`` is (3, size, size), float in [0, 1].
    """

    def __init__(
        self,
        entries: Sequence[ImageEntry],
        *,
        size: int,
        source: str,
        skipped: int = 0,
        crop_fraction: float = DEFAULT_CROP_FRACTION,
    ) -> None:
        self.entries = list(entries)
        self.size = int(size)
        self.source = str(source)
        self.skipped = int(skipped)
        self.crop_fraction = float(crop_fraction)
        self._bad: Set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> List[str]:
        return [e.id for e in self.entries]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([e.label for e in self.entries], dtype=torch.long)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, str]:
        e = self.entries[i]
        try:
            x = decode_image(e.opener, self.size, self.crop_fraction)
        except SkippedImageError as err:
            raise SkippedImageError(f"{e.id}: {err}") from None
        return x, e.label, e.id

    def try_get(self, i: int) -> Optional[Tuple[torch.Tensor, int, str]]:
        """``self[i]``, or None after warning once and counting the file as skipped."""
        if i in self._bad:
            return None
        e = self.entries[i]
        try:
            return decode_image(e.opener, self.size, self.crop_fraction), e.label, e.id
        except SkippedImageError as err:
            self._bad.add(i)
            self.skipped += 1
            _warn_skip(e.id, str(err))
            return None

    def __repr__(self) -> str:
        return f"ImageDataset(source={self.source!r}, n={len(self)}, size={self.size}, skipped={self.skipped})"


def _header_ok(entry: ImageEntry) -> bool:
    """Cheap check of one file's header; warns and returns False for a bad file."""
    try:
        img = _open_checked(entry.opener)
    except SkippedImageError as e:
        _warn_skip(entry.id, str(e))
        return False
    img.close()
    return True


def _read_labels_csv(root: Path, num_classes: Optional[int] = NUM_CLASSES, limit: Optional[int] = None) -> Tuple[List[ImageEntry], int]:
    path = root / "labels.csv"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in (reader.fieldnames or [])]
    missing = [c for c in ("file", "label") if c not in fields]
    if missing:
        raise DataError(
            f"{path}: header must name the columns file,label (optionally wnid,name); missing {', '.join(missing)}"
        )
    entries: List[ImageEntry] = []
    absent = 0
    first_row: Dict[str, int] = {}
    for row_no, row in enumerate(reader, start=2):  # row 1 is the header
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
        if not any(isinstance(v, str) and v for v in row.values()):
            continue  # blank line
        name = row.get("file") or ""
        if not name:
            raise DataError(f"{path}, row {row_no}: empty file name")
        if name in first_row:
            raise DataError(f"{path}, row {row_no}: {name} is listed again (first at row {first_row[name]}); "
                            f"each file may have one label: remove one of the rows")
        first_row[name] = row_no
        try:
            label = int(row.get("label") or "")
        except ValueError:
            raise DataError(f"{path}, row {row_no}: label {row.get('label')!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            top = f"{num_classes - 1}" if num_classes is not None else "K-1"
            raise DataError(f"{path}, row {row_no}: label {label} is outside 0..{top}"
                            + (f" (the model's {num_classes} classes)" if num_classes not in (None, NUM_CLASSES) else ""))
        if limit is not None and len(entries) >= limit:
            continue  # every row is checked, but files past the limit are neither looked for nor counted
        file_path = root / name
        if not file_path.is_file():
            _warn_skip(name, "listed in labels.csv but not found")
            absent += 1
            continue
        entries.append(ImageEntry(name, label, _file_opener(file_path)))
    if not entries and not absent:
        raise DataError(f"{path} lists no images")
    return entries, absent


def _read_synset_folders(root: Path, subdirs: List[Path], num_classes: Optional[int] = NUM_CLASSES) -> List[ImageEntry]:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    entries: List[ImageEntry] = []
    for d in subdirs:
        if d.name not in index:
            hint = " (not of the form n########)" if not _WNID.match(d.name) else ""
            raise DataError(
                f"{root}: sub-folder {d.name!r} is not one of the 1000 ImageNet wnids{hint}; "
                "an ImageNet-style folder holds only synset sub-folders such as n01440764/"
            )
        if num_classes is not None and index[d.name] >= num_classes:
            raise DataError(f"{root}: synset sub-folder {d.name} is ImageNet class {index[d.name]}, outside the "
                            f"model's {num_classes} classes; label the images with a labels.csv instead")
        for f in sorted(d.rglob("*")):
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts):
                entries.append(ImageEntry(f.relative_to(root).as_posix(), index[d.name], _file_opener(f)))
    return entries


def folder_entries(folder: Union[str, os.PathLike], num_classes: Optional[int] = NUM_CLASSES,
                   limit: Optional[int] = None) -> Tuple[List[ImageEntry], int]:
    """List the labelled files of ``folder`` (``labels.csv`` or synset sub-folders).

    Labels must lie in ``0..num_classes-1`` (the model's classes; None: any non-negative
    integer). Synset sub-folders give ImageNet's 1000 indices; a ``labels.csv`` gives any.

    Returns the entries (the first ``limit`` present files, in listing order, when ``limit`` is
    given) and the number of listed files that are absent among those passed over to reach
    them (each with a :class:`SkippedFileWarning`); every row of ``labels.csv`` is checked.

    Raises:
        DataError: the folder is missing, empty, unlabelled, or ``labels.csv`` has a bad row
            (a file listed twice among them).
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root} (pass a folder with labels.csv or synset sub-folders)")
    if (root / "labels.csv").is_file():
        return _read_labels_csv(root, num_classes, limit)
    visible = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    if not visible:
        raise DataError(f"image folder is empty: {root}")
    subdirs = [p for p in visible if p.is_dir()]
    if not subdirs:
        raise DataError(
            f"{root} has neither a labels.csv (file,label,wnid,name) nor synset sub-folders (n01440764/...)"
        )
    entries = _read_synset_folders(root, subdirs, num_classes)
    if not entries:
        raise DataError(f"no files in the synset sub-folders of {root}")
    return entries[:limit], 0


def load_dataset(
    source: Union[str, os.PathLike],
    *,
    size: int,
    limit: Optional[int] = None,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    num_classes: Optional[int] = NUM_CLASSES,
) -> ImageDataset:
    """Open an image source as an :class:`ImageDataset` of ``size x size`` images.

    Args:
        source: ``"builtin"`` (the scikit-image photos) or a folder with ``labels.csv``
            or ImageNet synset sub-folders.
        size: square side of the images (the model's ``input_size``).
        limit: use at most the first ``limit`` listed files (in listing order).
        crop_fraction: centre-crop fraction after resizing the shorter side.
        num_classes: the model's number of classes; a label outside ``0..num_classes-1``
            is an error (None: any non-negative label).

    Raises:
        DataError: missing or empty folder, bad ``labels.csv``, a label outside the model's
            classes, or no readable image.
    """
    try:
        size = check_int(size, "size", minimum=MIN_SIDE)
        limit = None if limit is None else check_int(limit, "limit")
    except (TypeError, ValueError) as e:
        raise DataError(str(e)) from None
    if str(source) == "builtin":
        entries, skipped, name = builtin_entries()[:limit], 0, "builtin"
        if num_classes is not None and num_classes != NUM_CLASSES:
            raise DataError(f"the built-in images carry ImageNet labels (1000 classes), but the model has "
                            f"{num_classes}; give --data a folder with a labels.csv of your classes")
    else:
        entries, skipped = folder_entries(source, num_classes, limit)  # the first `limit` present files
        name = str(source)
    good = []
    for e in entries:
        if _header_ok(e):
            good.append(e)
        else:
            skipped += 1
    if not good:
        raise DataError(f"no readable image in {name} ({skipped} file(s) skipped)")
    return ImageDataset(good, size=size, source=name, skipped=skipped, crop_fraction=crop_fraction)


def iter_batches(dataset: ImageDataset, batch_size: int, *, indices: Optional[Sequence[int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
    """Yield ``(x, labels, ids)`` batches of up to ``batch_size`` readable images.

    Images whose pixel data cannot be decoded are skipped (one warning each) and counted in
    ``dataset.skipped``. ``indices`` restricts and orders the images (default: all, in order).

    Shape: x (B, 3, S, S) float [0,1]; labels (B,) long.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    order = range(len(dataset)) if indices is None else indices
    xs: List[torch.Tensor] = []
    ys: List[int] = []
    ids: List[str] = []
    for i in order:
        item = dataset.try_get(int(i))
        if item is None:
            continue
        xs.append(item[0])
        ys.append(item[1])
        ids.append(item[2])
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.long), ids
            xs, ys, ids = [], [], []
    if xs:
        yield torch.stack(xs), torch.tensor(ys, dtype=torch.long), ids


def load_images(
    source: Union[str, os.PathLike, ImageDataset],
    *,
    size: Optional[int] = None,
    limit: Optional[int] = None,
    num_classes: Optional[int] = NUM_CLASSES,
) -> Tuple[torch.Tensor, torch.Tensor, List[str], int]:
    """Decode every readable image of ``source`` into one batch.

    ``size``, ``limit`` and ``num_classes`` (the model's classes, which the labels must lie
    in; None: any non-negative label) are :func:`load_dataset`'s, for a folder or ``"builtin"``.

    Returns:
        ``(x, labels, ids, skipped)``: x (N, 3, size, size) float [0,1], labels (N,) long,
        the N ids, and the number of files skipped.

    Raises:
        DataError: as :func:`load_dataset`, or when no image could be decoded.
    """
    if isinstance(source, ImageDataset):
        ds = source
    else:
        if size is None:
            raise DataError("load_images needs size= for a folder or 'builtin'")
        ds = load_dataset(source, size=size, limit=limit, num_classes=num_classes)
    batches = list(iter_batches(ds, 64))
    if not batches:
        raise DataError(f"no readable image in {ds.source} ({ds.skipped} file(s) skipped)")
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    ids = [i for b in batches for i in b[2]]
    return x, labels, ids, ds.skipped

