"""Helpers shared by the sub-commands: errors, device choice, progress bars, JSON output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from .. import data, defenses, models
from ..data.builtin import BUILTIN_IMAGES
from ..errors import ModelUnavailableError, PrepDefenseError

# Built in the experiments layer (``reproduce`` needs them too); re-exported for the sub-commands.
from ..experiments.components import UsageError, build_defended, build_model, resolve_device

#: ``--defense`` help, one text for every sub-command that takes a single defense.
DEFENSE_HELP = ("defense: " + ", ".join(defenses.names()) + "; parameters in brackets where they differ from the "
                "defaults, quoted for the shell (e.g. 'dct-distort[table=fd]'); an a+b chain; a user's "
                "package.module:Class; or 'none' for the bare model")

__all__ = ["DEFENSE_HELP", "check_shard", "add_defend_at_option", "check_defend_at", "UsageError", "resolve_device", "build_model", "build_defended", "progress", "print_json",
           "add_common_data_args", "one_line_skip_warnings", "check_at_least", "check_number", "check_seed",
           "check_data", "check_model", "check_defense", "check_out_folder", "check_out_file", "check_common",
           "add_model_options", "check_model_options", "model_options", "MAX_SEED", "MODEL_HELP", "MODEL_HELP_DECLARED",
           "WEIGHTS_HELP"]


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm bar on a terminal (stderr); silent when disabled or stderr is not a TTY."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True)


def print_json(obj: Any) -> None:
    """One JSON object on stdout (the ``--json`` contract)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def add_common_data_args(p, *, default_limit: Optional[int] = None) -> None:
    """``--data``, ``--model``, ``--limit``, ``--batch-size``, ``--device``, ``--seed``, ``--json``."""
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders), or 'builtin' for the scikit-image photos (default)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--limit", type=int, default=default_limit, help=f"use at most the first N images, in listing order (labels.csv rows, or sorted file names); default: {default_limit or 'all'}")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress bar")


MODEL_HELP = ("classifier: a built-in name (default: efficientnet-lite0), torchscript:PATH, package.module:callable "
              "(returning an nn.Module), torchvision:ARCH or timm:ARCH (with --weights FILE)")
#: ``--model`` of the commands without :func:`add_model_options` (``reproduce``, ``usability``, ``demo``).
MODEL_HELP_DECLARED = (MODEL_HELP + "; a model of yours must declare its input_size and num_classes itself (this "
                       "command has no --input-size, --num-classes, --mean or --std)")
WEIGHTS_HELP = "local weights file (a state dict) for the model: built-in, torchvision:, timm: or package.module:callable (nothing downloads)"


def add_model_options(p) -> None:
    """``--input-size``, ``--num-classes``, ``--mean``, ``--std``: what a user's model needs declared."""
    p.add_argument("--input-size", type=int, default=None, help="the model's square input side (default: its input_size attribute)")
    p.add_argument("--num-classes", type=int, default=None, help="the model's number of classes (default: its num_classes attribute, else its output width)")
    p.add_argument("--mean", default=None, help="per-channel mean the model expects its input normalised with, e.g. 0.485,0.456,0.406 (with --std)")
    p.add_argument("--std", default=None, help="per-channel std the model expects its input normalised with, e.g. 0.229,0.224,0.225 (with --mean)")


_DEFEND_AT_HELP = {
    "attack": "read the images at S px, run the defense there and resize its output to the model's input; the attack's "
              "budget is then in the S-px space (the sample is still picked by the bare model at its own side)",
    "evaluate": "read the images at S px, run the defense there and resize its output to the model's input; the attacks' "
                "budget is then in the S-px space (the sample is still picked by the bare model at its own side)",
    "predict": "read the images at S px, run the defense there and resize its output to the model's input",
    "judge": "the images are S px: run the defense at S and resize its output to the model's input (default: the "
             "defend_at recorded by 'attack --defend-at S --save-adv', else the model's input side)",
}


def add_defend_at_option(p, command: str) -> None:
    """``--defend-at S``: the defense at another resolution than the model's (issue 15, item 3)."""
    p.add_argument("--defend-at", type=int, default=None, metavar="S",
                   help=_DEFEND_AT_HELP[command] + ". The paper defends Inception V3's own 299-px input; --defend-at 299 "
                        "keeps that defense as is in front of a 224-px model. Default: the defense runs at the model's "
                        "input side, the paper's setting for its own model")


def check_defend_at(args) -> None:
    check_at_least("--defend-at", getattr(args, "defend_at", None), data.MIN_SIDE,
                   hint=" (the side at which the defense runs)")


def _floats(flag: str, text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give one number or one per channel, comma-separated, e.g. 0.485,0.456,0.406") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} {text!r}: give one finite number or three (one per RGB channel)")
    return values


def check_model_options(args) -> None:
    """The flags of :func:`add_model_options`, checked before anything loads."""
    check_at_least("--input-size", getattr(args, "input_size", None), data.MIN_SIDE,
                   hint=" (images are resized and cropped to it; smaller ones are skipped)")
    check_at_least("--num-classes", getattr(args, "num_classes", None), 2)
    mean, std = _floats("--mean", getattr(args, "mean", None)), _floats("--std", getattr(args, "std", None))
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together: give both (or neither)")
    if std is not None and not all(v > 0 for v in std):
        raise UsageError(f"--std must be positive, got {getattr(args, 'std')}")


def model_options(args) -> dict:
    """The keyword arguments of :func:`build_model` that the model flags give."""
    return {
        "input_size": getattr(args, "input_size", None),
        "num_classes": getattr(args, "num_classes", None),
        "mean": _floats("--mean", getattr(args, "mean", None)),
        "std": _floats("--std", getattr(args, "std", None)),
    }


@contextlib.contextmanager
def one_line_skip_warnings() -> Iterator[None]:
    """Show every skipped-file warning as one ``prepdefense: warning: ...`` line on stderr."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, data.SkippedFileWarning):
            print(f"prepdefense: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", data.SkippedFileWarning)
        warnings.showwarning = show
        yield


# ---------------------------------------------------------------------------------------------
# Checks of the flags, run before anything is loaded: each raises a one-line UsageError that
# says what is wrong and how to fix it (issue 11, item 5).
# ---------------------------------------------------------------------------------------------

#: Largest seed every generator takes (torch's ``manual_seed`` stops at 2**64 - 1, the per-image
#: draw keys keep 63 bits): seeds are 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def check_at_least(flag: str, value: Optional[int], minimum: int = 1, *, hint: str = "") -> None:
    """``value`` (when given) must be an integer >= ``minimum``."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}{hint}")


def check_number(flag: str, value: Optional[float], *, positive: bool = False, non_negative: bool = False) -> None:
    """``value`` (when given) must be a finite number, and positive / non-negative when asked."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if positive and not value > 0:
        raise UsageError(f"{flag} must be positive, got {value:g}")
    if non_negative and value < 0:
        raise UsageError(f"{flag} must be 0 or more, got {value:g}")


def check_radius(flag: str, norm: str, eps: Optional[float]) -> None:
    """``eps`` (when given) as the attacks take it (:func:`prepdefense.attacks.ball.check_eps`:
    positive, at most 1 in the [0, 1] image unit), as a one-line usage error."""
    if eps is None:
        return
    from ..attacks.ball import check_eps

    try:
        check_eps(norm, eps)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None


def check_seed(seed: Optional[int], flag: str = "--seed") -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{flag} must be between 0 and 2**63-1 ({MAX_SEED}), got {seed}")


def check_data(source: str, flag: str = "--data") -> int:
    """A missing folder, a file, an empty folder or a bad labels.csv fails here, before any
    model loads. Returns how many images the source lists (an upper bound on those read)."""
    if str(source) == "builtin":
        return len(BUILTIN_IMAGES)
    if not str(source).strip():
        raise UsageError(f"{flag} is empty; give an image folder or 'builtin'")
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"image folder not found: {source} ({flag} takes a folder of images or 'builtin')")
    if not path.is_dir():
        raise UsageError(f"{flag} {source!r} is not a folder (give a folder of images or 'builtin')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.SkippedFileWarning)
        entries, _missing = data.loading.folder_entries(source, num_classes=None)
    return len(entries)


def check_model(name: str, weights: Optional[str] = None) -> None:
    """An unknown model name, a malformed or absent user model (``torchscript:PATH`` ...), a
    missing extra or a missing ``--weights`` file fails before anything loads."""
    if models.is_user_spec(name):
        try:
            models.check_user_spec(name, weights)
        except ModelUnavailableError as e:
            raise UsageError(str(e)) from None
    elif name not in models.names():
        raise UsageError(f"unknown --model {name!r}; known: {', '.join(models.names())}, or torchscript:PATH, "
                         "package.module:callable, torchvision:ARCH, timm:ARCH")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise UsageError(f"--weights file not found: {weights}")
        if not path.is_file():
            raise UsageError(f"--weights {weights} is not a file; give the path of a weights file")


def check_defense(name: Optional[str], *, flag: str = "--defense", allow_all: bool = False) -> str:
    """Check a defense name, ``name[key=value,...]`` or ``a+b`` chain (and build it once,
    cheaply); returns it normalised (:func:`prepdefense.defenses.normalize_name`: built-in
    names in lower case, ``package.module:Class`` parts as written, parameters canonical)."""
    known = ", ".join(defenses.names() + defenses.entry_point_names()) + ", or package.module:Class"
    try:
        text = defenses.normalize_name((name or "").strip())
    except ValueError as e:
        raise UsageError(f"bad {flag} {name!r}: {e}") from None
    if not text:
        raise UsageError(f"{flag} is empty; give a defense ({known}), a chain such as fd+rand, or none")
    if allow_all and text == "all":
        return text
    parts = defenses.split_chain(text)
    if len(parts) > 1:
        if not all(parts):
            raise UsageError(
                f"{flag} {name!r} has an empty part (a '+' at the start or end, or '++'); "
                f"join defense names with single '+', e.g. fd+rand"
            )
        bases = [defenses.parse_part(p)[0] for p in parts]
        unknown = [b for b in bases if ":" not in b and b not in defenses.names() + defenses.entry_point_names()]
        if unknown:
            raise UsageError(f"unknown defense {unknown[0]!r} in {flag} {name!r}; known: {known}")
    try:
        defenses.create(text)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown defense {text!r}; known: {known}") from None
    except defenses.UserDefenseError as e:
        raise UsageError(f"{flag} {name!r}: {e}") from None
    except (ValueError, TypeError, PrepDefenseError) as e:
        raise UsageError(f"bad {flag} {name!r}: {e}") from None
    return text


def check_shard(text: Optional[str]):
    """``--shard K/N`` as a :class:`~prepdefense.experiments.sharding.ShardSpec` (None when not given)."""
    if text is None:
        return None
    from ..experiments.sharding import parse_shard

    try:
        return parse_shard(text)
    except PrepDefenseError as e:
        raise UsageError(str(e)) from None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_under(path: Path, flag: str, given: str, *, folder: bool) -> None:
    """The folder that will hold ``path`` (``path`` itself for an existing output folder; for
    a file, its parent, so an existing file is replaced, atomically) exists or can be made
    under a writable folder."""
    base = _nearest_existing(path if folder and path.exists() else path.parent)
    if not base.is_dir():
        raise UsageError(f"{flag} {given}: {base} is a file, not a folder; choose a path under a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {given}: cannot write in {base} (permission denied); choose another path")


def check_out_folder(out: str, flag: str = "--out") -> None:
    """``out`` is (or can be made as) a folder: not an existing file, not under a file, writable."""
    if not str(out).strip():
        raise UsageError(f"{flag} is empty; give an output folder")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a folder; give a folder (it is created if missing)")
    _check_writable_under(path, flag, out, folder=True)


def check_out_file(out: str, flag: str = "--out") -> None:
    """``out`` is (or can be written as) a file: not an existing folder, not under a file, in a
    writable folder. An existing file is fine: it is replaced (atomically) by the new result."""
    if not str(out).strip():
        raise UsageError(f"{flag} is empty; give a file to write, e.g. table.json")
    path = Path(out).expanduser()
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        raise UsageError(f"{flag} {out} is a folder; give a file name, e.g. {path / 'table.json'}")
    _check_writable_under(path, flag, out, folder=False)


def check_common(args) -> None:
    """The flags of :func:`add_common_data_args`, checked before anything loads."""
    check_at_least("--batch-size", args.batch_size)
    check_at_least("--limit", args.limit)
    check_seed(args.seed)
    check_model(args.model, args.weights)
    check_model_options(args)
