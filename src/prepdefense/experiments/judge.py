"""Re-judging adversarial examples made by any tool on fresh draws of a defended model
(issue 12, item 4; PROTOCOL.md "Conventions": the expected value over R >= 10 draws).

Inputs (:func:`load_adversarial`):

* ``.npz`` (``numpy.savez``) or ``.pt`` (``torch.save`` of a dict) holding ``x_adv`` and
  ``labels``, optionally ``x`` (the clean images), ``targets`` (a targeted attack) and ``ids``
  (one per image: non-negative integers, or names such as file names, which key each image's
  draws as :func:`prepdefense.draws.image_id` does; default: positions 0..N-1). Images may be
  NCHW or NHWC (channels last is detected and transposed), ``uint8`` (divided by 255) or float
  in [0, 1] (float values that are all integers in 0..255 are read as 8-bit, divided by 255);
  labels and targets are class indices (N,) or one-hot / scores (N, K) (argmax taken, as ART
  wants one-hot labels). Every conversion is listed in the report's ``notes``.
* a folder of images with a ``labels.csv`` (``file,label``, optionally ``target``; the format the
  data loader reads). Images are read as they are, never resized or cropped (that would change
  the perturbation), as 8-bit RGB: an 8-bit PNG holds values on the 1/255 grid, which is exactly
  what a deployed system reading the file sees, and the report says so. Clean images for the
  distances come from a second folder with the same file names (``clean=``).

The verdict (:func:`judge`): the images are classified by ``Defended(defense, model)`` under
``draws`` fresh draws of the defense, draw ``r`` the run key's sub-stream ``("judge", "verdict",
r)`` (the key of ``prepdefense attack``'s own verdict, so an attack's output re-judged with its
seed and image ids gives the attack's verdict); robust accuracy and ASR expected over draws and
worst case, with 95% intervals (:mod:`prepdefense.attacks.verdict`); the bare model's accuracy on
the same images; and with clean images, the defended model's clean accuracy and the L2 (RMS,
``||d||_2 / sqrt(C*H*W)``) and Linf distances. ``quantize=True`` rounds float images to 8 bits
first, as saving them to an 8-bit file would.
"""

from __future__ import annotations

import csv
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__, defenses
from ..attacks.verdict import evaluate_on_draws, judge_on_draws
from ..data.loading import pil_to_tensor, to_rgb
from ..defenses import Defended
from ..defenses.defended import undefended_at
from ..draws import DRAW_SCHEME, DrawKey, image_id
from ..errors import DataError
from ..metrics import l2_rms, linf
from ..model_state import eval_mode
from ..validation import check_int, check_labels, check_targets, range_tolerance

__all__ = ["AdversarialSet", "load_adversarial", "judge", "quantize_8bit", "MIN_DRAWS", "ARRAY_SUFFIXES", "IMAGE_SUFFIXES"]

#: The fewest draws the protocol judges a random defense on (PROTOCOL.md "Conventions").
MIN_DRAWS = 10
ARRAY_SUFFIXES = (".npz", ".pt", ".pth")
IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".ppm", ".jpg", ".jpeg", ".webp")
_LOSSY = (".jpg", ".jpeg", ".webp")


@dataclass
class AdversarialSet:
    """Adversarial examples to judge.

    Attributes:
        x_adv: (N, C, H, W) float32 in [0, 1].
        labels: (N,) int64 true classes.
        x: (N, C, H, W) clean images, or None.
        targets: (N,) int64 target classes (targeted), or None.
        ids: (N,) int64 image ids keying each image's draws.
        source: where they were read from; ``format``: ``"npz"``, ``"pt"`` or ``"folder"``.
        eight_bit: every adversarial value lies on the 1/255 grid (as read from an 8-bit file).
        notes: every conversion made while reading, one sentence each.
        defend_at: the side the defense ran at when they were made (an optional scalar
            ``defend_at`` in the file, written by ``attack --defend-at S --save-adv``), or None.
    """

    x_adv: torch.Tensor
    labels: torch.Tensor
    x: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    source: str = ""
    format: str = ""
    eight_bit: bool = False
    notes: List[str] = field(default_factory=list)
    #: The side the defense ran at when they were made (``attack --defend-at``), if the file says.
    defend_at: Optional[int] = None

    def __len__(self) -> int:
        return int(self.x_adv.shape[0])


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 8-bit grid (``round(255 x) / 255``), as saving them to an
    8-bit PNG and reading them back does."""
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def _on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(torch.all(torch.abs(x * 255.0 - torch.round(x * 255.0)) <= 1e-3))


# ---------------------------------------------------------------- arrays (.npz, .pt)


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise DataError(f"{name} holds {arr.dtype} values; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _images(name: str, value: Any, notes: List[str]) -> torch.Tensor:
    """Any accepted image array -> (N, C, H, W) float32 in [0, 1] (conversions noted)."""
    t = _as_tensor(name, value)
    if t.dim() == 3:
        raise DataError(f"{name} has shape {tuple(t.shape)}: expected a batch (N, C, H, W) or (N, H, W, C); "
                        f"save one image as a batch of one")
    if t.dim() != 4:
        raise DataError(f"{name} has shape {tuple(t.shape)}: expected a batch of images (N, C, H, W) or (N, H, W, C)")
    if t.shape[1] not in (1, 3, 4):
        if t.shape[3] in (1, 3, 4):
            t = t.permute(0, 3, 1, 2)
            notes.append(f"{name}: channels last (N, H, W, C), transposed to (N, C, H, W)")
        else:
            raise DataError(f"{name} has shape {tuple(t.shape)}: neither (N, C, H, W) nor (N, H, W, C) with 1, 3 or 4 channels")
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{name} has dtype {t.dtype}; expected uint8 or float images")
    if t.dtype == torch.uint8:
        notes.append(f"{name}: 8-bit integers, divided by 255")
        return t.float().div_(255.0).contiguous()
    if not t.is_floating_point():
        lo, hi = (int(v) for v in torch.aminmax(t)) if t.numel() else (0, 0)
        if lo >= 0 and hi <= 255:
            notes.append(f"{name}: integers in 0..255 ({t.dtype}), divided by 255")
            return t.float().div_(255.0).contiguous()
        raise DataError(f"{name} has {t.dtype} values in [{lo}, {hi}]; expected uint8 (0..255) or float in [0, 1]")
    tolerance = range_tolerance(t.dtype)  # before the cast: a half-precision file rounds coarser
    t = t.float()
    if t.numel() == 0:
        raise DataError(f"{name} holds no image")
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} holds NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo >= -tolerance and hi <= 1 + tolerance:
        return t.clamp(0.0, 1.0).contiguous()
    if lo >= 0 and hi <= 255 and bool(torch.all(t == torch.round(t))):
        notes.append(f"{name}: float values that are integers in 0..255, read as 8-bit and divided by 255")
        return t.div_(255.0).contiguous()
    raise DataError(f"{name} has values in [{lo:.4g}, {hi:.4g}]; expected float images in [0, 1] or 8-bit values 0..255 "
                    f"(normalised images must be un-normalised first)")


def _classes(name: str, value: Any, n: int, notes: List[str]) -> torch.Tensor:
    """Class indices (N,) from indices or (N, K) one-hot / scores."""
    t = _as_tensor(name, value)
    if t.dim() == 2 and t.shape[0] == n and t.shape[1] > 1:
        notes.append(f"{name}: (N, K) one-hot or scores, argmax taken")
        t = t.argmax(1)
    t = t.flatten() if t.dim() == 2 and 1 in t.shape else t
    if t.dim() != 1:
        raise DataError(f"{name} has shape {tuple(t.shape)}: expected one class index per image, ({n},)")
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise DataError(f"{name} holds non-integer values; expected class indices")
        t = t.round()
    if t.shape[0] != n:
        raise DataError(f"{name} has {t.shape[0]} entries for {n} images in x_adv")
    return t.long()


def _ids(value: Any, n: int) -> torch.Tensor:
    arr = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if arr.shape != (n,):
        raise DataError(f"ids has shape {arr.shape}: expected one id per image, ({n},)")
    if arr.dtype.kind in "US":
        return torch.tensor([image_id(str(s)) for s in arr.tolist()], dtype=torch.int64)
    if arr.dtype.kind not in "iu" or (arr.size and int(arr.min()) < 0):
        raise DataError("ids must be non-negative integers or names (strings)")
    return torch.as_tensor(arr.astype(np.int64))


def _read_arrays(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".npz" and not zipfile.is_zipfile(path):
        raise DataError(f"cannot read {path}: not a .npz file (numpy.savez writes a zip archive)")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # a pickle torch refuses to load safely, a zip numpy cannot open
        raise DataError(f"cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{path} holds a {type(obj).__name__}; expected a dict with x_adv and labels "
                        f"(torch.save({{'x_adv': ..., 'labels': ...}}, path))")
    return obj


def _from_arrays(path: Path) -> AdversarialSet:
    data = _read_arrays(path)
    missing = [k for k in ("x_adv", "labels") if k not in data]
    if missing:
        raise DataError(f"{path} has no {' or '.join(missing)} (it holds: {', '.join(sorted(map(str, data))) or 'nothing'}); "
                        f"expected x_adv and labels, optionally x, targets and ids")
    notes: List[str] = []
    x_adv = _images("x_adv", data["x_adv"], notes)
    n = x_adv.shape[0]
    labels = _classes("labels", data["labels"], n, notes)
    x = _images("x", data["x"], notes) if data.get("x") is not None else None
    if x is not None and x.shape != x_adv.shape:
        raise DataError(f"x has shape {tuple(x.shape)} but x_adv {tuple(x_adv.shape)}; the clean images must match one to one")
    targets = _classes("targets", data["targets"], n, notes) if data.get("targets") is not None else None
    ids = _ids(data["ids"], n) if data.get("ids") is not None else None
    defend_at = data.get("defend_at")
    defend_at = int(np.asarray(defend_at).reshape(-1)[0]) if defend_at is not None else None
    return AdversarialSet(x_adv, labels, x, targets, ids, source=str(path), format=path.suffix.lower().lstrip(".").replace("pth", "pt"),
                          eight_bit=_on_8bit_grid(x_adv), notes=notes, defend_at=defend_at)


# ---------------------------------------------------------------- a folder of images


def _read_image(path: Path, notes: List[str]) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") and "16-bit" not in " ".join(notes):
                notes.append("16-bit or float image files reduced to 8 bits per channel")
            if img.mode in ("RGBA", "LA", "PA") and "alpha" not in " ".join(notes):
                notes.append("images with an alpha channel composited onto white")
            return pil_to_tensor(to_rgb(img))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_folder_labels(folder: Path) -> List[Dict[str, str]]:
    path = folder / "labels.csv"
    if not path.is_file():
        raise DataError(f"{folder} has no labels.csv (file,label, optionally target)")
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if isinstance(v, str) or v is None} for r in rows]
    rows = [r for r in rows if any(r.values())]
    if not rows:
        raise DataError(f"{path} lists no images")
    if not {"file", "label"} <= set(rows[0]):
        raise DataError(f"{path}: header must name the columns file,label (optionally target); it has {', '.join(rows[0])}")
    return rows


def _int_cell(path: Path, row_no: int, column: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{path}, row {row_no}: {column} {text!r} is not an integer") from None
    if value < 0:
        raise DataError(f"{path}, row {row_no}: {column} {value} is negative")
    return value


def _from_folder(folder: Path, clean: Optional[Path]) -> AdversarialSet:
    rows = _read_folder_labels(folder)
    csv_path = folder / "labels.csv"
    has_targets = "target" in rows[0]
    notes: List[str] = []
    images, cleans, labels, targets, names = [], [], [], [], []
    for row_no, row in enumerate(rows, start=2):
        name = row["file"]
        if not name:
            raise DataError(f"{csv_path}, row {row_no}: empty file name")
        f = folder / name
        if not f.is_file():
            raise DataError(f"{csv_path}, row {row_no}: {name} is listed but not in {folder}")
        images.append(_read_image(f, notes))
        labels.append(_int_cell(csv_path, row_no, "label", row["label"]))
        if has_targets:
            targets.append(_int_cell(csv_path, row_no, "target", row["target"]))
        if clean is not None:
            c = clean / name
            if not c.is_file():
                raise DataError(f"clean image {name} not found in {clean} (the clean folder needs the same file names)")
            cleans.append(_read_image(c, notes))
        names.append(name)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(f"the images in {folder} differ in size ({', '.join('x'.join(map(str, s[1:])) for s in sorted(shapes))}); "
                        "they are judged as they are, never resized, so they must share one size")
    x_adv = torch.stack(images)
    x = None
    if clean is not None:
        x = torch.stack(cleans) if {tuple(t.shape) for t in cleans} == shapes else None
        if x is None:
            raise DataError(f"the clean images in {clean} differ in size from the adversarial ones in {folder}")
    lossy = sorted({Path(n).suffix.lower() for n in names} & set(_LOSSY))
    notes.insert(0, "8-bit image files: the images are judged as stored, on the 1/255 grid a deployed system reading "
                    "these files sees (a perturbation below half a step was lost when they were saved)")
    if lossy:
        notes.insert(1, f"lossy files ({', '.join(lossy)}): judged as decoded, after their compression")
    return AdversarialSet(x_adv, torch.tensor(labels, dtype=torch.long), x,
                          torch.tensor(targets, dtype=torch.long) if has_targets else None,
                          torch.tensor([image_id(n) for n in names], dtype=torch.int64),
                          source=str(folder), format="folder", eight_bit=True, notes=notes)


def load_adversarial(path: Union[str, Path], *, clean: Union[None, str, Path] = None) -> AdversarialSet:
    """Read adversarial examples from a ``.npz`` / ``.pt`` file or a folder of images with a
    ``labels.csv`` (module docstring).

    Args:
        path: the file or folder.
        clean: for a folder, a folder of the clean images under the same file names (the
            distances need them); files carry their clean images as ``x``.

    Raises:
        DataError: a missing or unreadable file, an unknown format, a missing ``x_adv`` or
            ``labels``, shapes that do not match, values that are not images.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"adversarial examples not found: {p}")
    if p.is_dir():
        c = None
        if clean is not None:
            c = Path(clean).expanduser()
            if not c.is_dir():
                raise DataError(f"clean images: {c} is not a folder (give the folder of the clean images, same file names)")
        return _from_folder(p, c)
    if clean is not None:
        raise DataError(f"{p} is a file: put the clean images in it as x (clean= is for folders of images)")
    if p.suffix.lower() not in ARRAY_SUFFIXES:
        raise DataError(f"{p}: unknown format {p.suffix or '(no suffix)'}; give a .npz or .pt file with x_adv and labels, "
                        f"or a folder of images with labels.csv")
    return _from_arrays(p)


# ---------------------------------------------------------------- the verdict


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        z = model(x[:1])
    if z.dim() != 2:
        raise DataError(f"the model returned shape {tuple(z.shape)} for one image; expected (1, K) logits")
    return int(z.shape[1])


def _distances(x_adv: torch.Tensor, x: torch.Tensor) -> Dict[str, float]:
    l2, li = l2_rms(x_adv, x), linf(x_adv, x)
    return {"l2_rms_mean": float(l2.mean()), "l2_rms_median": float(l2.median()), "l2_rms_max": float(l2.max()),
            "linf_mean": float(li.mean()), "linf_median": float(li.median()), "linf_max": float(li.max())}


def _verdicts(model: nn.Module, deployed: nn.Module, d: Optional[nn.Module], adv: AdversarialSet, x_adv: torch.Tensor, *,
              draws: int, seed: int, quantize: bool, device: torch.device, notes: List[str]) -> Dict[str, Any]:
    """The figures of :func:`judge` (models in eval mode; ``notes`` extended in place)."""
    n = len(adv)
    x_dev = x_adv.to(device)
    k = _num_classes(model, x_dev)
    try:
        labels = check_labels(adv.labels, n, num_classes=k)
        targets = check_targets(adv.targets, labels, num_classes=k)
    except (TypeError, ValueError) as e:
        raise DataError(f"{e} (the model has {k} classes)") from None
    randomized = bool(getattr(deployed, "randomized", False))
    if not randomized and d is not None:
        notes.append("deterministic defense: judged once (every draw is the same)")
    ids = adv.ids if adv.ids is not None else torch.arange(n, dtype=torch.int64)
    key = DrawKey.from_seed(seed, n, ids).child("judge")

    verdict = evaluate_on_draws(deployed, x_dev, labels.to(device), None if targets is None else targets.to(device),
                                draws=draws, key=key)
    bare = judge_on_draws(model, x_dev, labels, targets, draws=1, key=key)
    out: Dict[str, Any] = {
        "accuracy": verdict["robust_accuracy_expected"],
        "accuracy_ci95": verdict["robust_accuracy_expected_ci95"],
        "accuracy_worst": verdict["robust_accuracy_worst"],
        "accuracy_worst_ci95": verdict["robust_accuracy_worst_ci95"],
        "asr": verdict["asr_expected"],
        "asr_ci95": verdict["asr_expected_ci95"],
        "asr_worst": verdict["asr_worst"],
        "asr_worst_ci95": verdict["asr_worst_ci95"],
        "draws": verdict["draws"],
        "n": n,
        "targeted": targets is not None,
        "bare_accuracy": float(bare["correct"].float().mean()),
        "bare_asr": float(bare["fooled"].float().mean()),
        "per_image_fooled_fraction": verdict["per_image_fooled_fraction"],
    }
    if adv.x is not None:
        x_clean = quantize_8bit(adv.x) if quantize else adv.x
        clean = evaluate_on_draws(deployed, x_clean.to(device), labels.to(device), None, draws=draws,
                                  key=DrawKey.from_seed(seed, n, ids).child("clean"))
        out["clean_accuracy"] = clean["robust_accuracy_expected"]
        out.update(_distances(x_adv, x_clean))
    else:
        notes.append("no clean images given: no distances or clean accuracy")
    return out


@torch.no_grad()
def judge(model: nn.Module, defense: Union[None, str, nn.Module], adv: AdversarialSet, *, draws: int = MIN_DRAWS,
          seed: int = 0, quantize: bool = False, device: Union[None, str, torch.device] = None,
          defense_name: Optional[str] = None, defend_at: Optional[int] = None) -> Dict[str, Any]:
    """Judge ``adv`` on ``draws`` fresh draws of ``Defended(defense, model)``.

    Args:
        model: the classifier, [0,1] NCHW -> logits.
        defense: a defense name (``"dct-distort"``, ``"fd+rand"``, ``"pkg.mod:Class"``), a
            :class:`~prepdefense.defenses.Defense`, or None / ``"none"`` (the bare model).
        adv: what :func:`load_adversarial` read.
        draws: fresh draws of a random defense (the protocol asks for at least
            :data:`MIN_DRAWS`); a deterministic defense is judged once.
        seed: the run's seed; image ``i``'s draws depend on it and ``adv.ids[i]`` alone.
        quantize: round the images to 8 bits first (what an 8-bit file would hold).
        device: where to run (default: the model's device).
        defense_name: how the report names the defense (default: its name or class).
        defend_at: run the defense at this side and resize to the model's input
            (``Defended(..., defend_at=S)``; the images must be S px, the bare model's figures
            go through the same resize); default: what the file says (``adv.defend_at``), else
            the model's input side.

    Returns:
        the report: ``accuracy`` / ``asr`` (expected over draws) and ``accuracy_worst`` /
        ``asr_worst`` with ``*_ci95`` intervals, ``draws``, ``n``, ``targeted``,
        ``bare_accuracy`` / ``bare_asr`` (the model without the defense), with clean images
        ``clean_accuracy`` and ``l2_rms_*`` / ``linf_*`` (mean, median, max), ``notes``,
        ``per_image_fooled_fraction``, and what was judged (``source``, ``format``, ``seed``,
        ``defense``, ``draw_scheme``, ``versions``).

    Raises:
        DataError: labels or targets outside the model's classes, targets equal to labels,
            images of another size than the model's ``input_size``.
        ValueError: ``draws < 1``.
    """
    draws = check_int(draws, "draws")
    n = len(adv)
    notes_at: List[str] = []
    if defend_at is None and adv.defend_at is not None:
        defend_at = adv.defend_at
        notes_at.append(f"the file says the images were made with the defense at {defend_at} px: judged the same way")
    if n == 0:
        raise DataError(f"{adv.source} holds no image")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    size = int(defend_at) if defend_at is not None else getattr(model, "input_size", None)
    if size is not None and tuple(adv.x_adv.shape[-2:]) != (int(size), int(size)):
        h, w = adv.x_adv.shape[-2:]
        if defend_at is not None:
            raise DataError(f"the adversarial images are {h}x{w} but the defense runs at {size}x{size} (defend_at); "
                            "give the side they were made at")
        raise DataError(f"the adversarial images are {h}x{w} but the model takes {size}x{size}; they are judged as they "
                        "are (resizing would change the perturbation): make them at the model's input size, or give "
                        "the side the defense runs at (defend_at / --defend-at)")
    notes = list(adv.notes) + notes_at
    x_adv = adv.x_adv
    if quantize:
        if adv.eight_bit:
            notes.append("quantize: the images already lie on the 8-bit grid; nothing changed")
        else:
            notes.append("quantize: the images were rounded to 8 bits (round(255 x) / 255), as an 8-bit file would hold them")
        x_adv = quantize_8bit(x_adv)
    elif not adv.eight_bit:
        notes.append("float images judged as given (not on the 8-bit grid; a deployed system reading 8-bit files would "
                     "see them rounded: --quantize judges that)")

    d = None
    if isinstance(defense, str):
        name = defenses.normalize_name(defense.strip())
        d = None if name in ("", "none") else defenses.create(name)
        label = defense_name or (name or "none")
    else:
        d = defense
        label = defense_name or ("none" if d is None else type(d).__name__)
    model = model.to(device)
    bare = undefended_at(model, defend_at).to(device)  # the bare figures behind the same resize
    deployed = bare if d is None else Defended(d, model, defend_at=defend_at).to(device)
    model = bare
    with eval_mode(deployed):  # the caller's train/eval flags come back afterwards
        out = _verdicts(model, deployed, d, adv, x_adv, draws=draws, seed=seed, quantize=quantize, device=device, notes=notes)
    out.update({
        "notes": notes,
        "source": adv.source,
        "format": adv.format,
        "eight_bit": bool(adv.eight_bit or quantize),
        "defense": label,
        "defend_at": int(defend_at) if defend_at is not None else None,
        "seed": int(seed),
        "device": str(device),
        "draw_scheme": DRAW_SCHEME,
        "versions": {"prepdefense": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    })
    return out
