"""The attack's own flags of ``prepdefense attack``, built from the registry (issue 9, item 7).

Every registered attack declares its hyperparameters as keyword-only constructor arguments
with defaults (:meth:`prepdefense.registry.Registry.parameters`). Each hyperparameter is a
flag ``--name-with-dashes`` whose type comes from its annotation and default; a few keep
the spelling the command always had (:data:`ALIASES`: ``--steps`` is ``rounds`` for
bpda/bpda-eot and ``max_iterations`` for lbfgs; ``--eps`` is every attack's ``eps``, for L2 in
the paper's RMS unit).
The parser holds the union of these flags; :func:`attack_kwargs` then rejects any flag the
chosen attack does not take, naming the ones it does (exit 2 through ``UsageError``).
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import attacks
from ..attacks.losses import LOSSES
from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND
from .common import UsageError

#: Hyperparameters the command sets itself, never from an attack flag.
RUN_SET = {
    "approx": "BPDA approximation: identity / real gradient (None)",
    "chunk": "--eot-chunk",
    "batch_size": "--batch-size",
    "progress": "the progress bar",
    "record_history": "always on (per-round history)",
    "draws": "--draws",
}

#: Hyperparameter -> the flag (dest) that sets it, where the command keeps an older spelling.
ALIASES = {"rounds": "steps", "max_iterations": "steps"}

#: What each flag means, in the command's units; a hyperparameter missing here is described
#: generically from its name.
DESCRIPTIONS = {
    "norm": "threat model, l2 or linf (an L2-only attack takes l2 only)",
    "eps": (
        "bound: for --norm l2 the NORMALISED (RMS) L2 of the paper, sqrt(sum d^2 / (C*H*W)) "
        f"(default {PAPER_L2_BOUND}); for linf the max-abs radius (adaptive, pgd: 8/255 = {PAPER_LINF_BOUND:.4f}; "
        "fgsm, bim, mi-fgsm: 0.03). bpda/bpda-eot: the l2 bound at which an image stops"
    ),
    "steps": "iterations (rounds for bpda/bpda-eot; max_iterations for lbfgs)",
    "eot": (
        "EOT draws per gradient: the attack's own (adaptive, bpda-eot) or, for the other attacks "
        "except bpda (one draw by definition), the model-side EOT wrapper (default 1)"
    ),
    "step_size": "absolute step (linf: per pixel; l2: RMS length); overrides --rel-stepsize",
    "rel_stepsize": "step as a fraction of the radius",
    "random_start": "start from a uniform draw in the ball",
    "momentum": (
        "mi-fgsm: decay of the L1-normalised gradient accumulator; apgd, apgd-ce, apgd-dlr: weight of the new "
        "step against the previous move"
    ),
    "rho": (
        "APGD: halve the step at a checkpoint when fewer than this fraction of the steps since the last "
        "checkpoint raised the loss"
    ),
    "p_init": "Square: initial fraction of pixels changed per iteration",
    "queries": "gradient-free attacks: loss evaluations per image (spsa: the query budget, which sets the steps to queries // (2 * samples); not with --steps)",
    "samples": "SPSA: random directions per step, each costing two queries",
    "delta": "SPSA: finite-difference size, in pixel units",
    "query_batch": "SPSA: images per model call while estimating (memory only)",
    "loss": "objective: " + " or ".join(LOSSES),
    "losses": "comma-separated objectives, one restart each (" + ", ".join(LOSSES) + ")",
    "kappa": "confidence of the margin (C&W) loss",
    "keep_best": "return each image's best successful iterate instead of the last",
    "restarts": "restarts in all, cycling through --losses (default: one per loss)",
    "step_fraction": "initial step as a fraction of the radius (cosine-decayed to 1% of it)",
    "lr": "step size (bpda: on the raw gradient; cw, spsa: Adam's learning rate)",
    "until_bound": "bpda/bpda-eot: continue past --steps until every image stops (success or l2 bound)",
    "max_rounds": "cap on the rounds of --until-bound",
    "binary_search_steps": "binary-search steps over the constant c",
    "initial_const": "initial constant c",
    "abort_early": "stop a binary-search step when the loss stops falling",
    "overshoot": "DeepFool overshoot",
    "candidates": "DeepFool candidate classes (top-k)",
}


@dataclass
class Flag:
    """One attack flag: its dest, how argparse reads it, and the attacks that take it
    (attack -> the hyperparameter it sets, or ``None`` for the model-side EOT wrapper)."""

    dest: str
    kind: str  # "int", "float", "str", "bool", "list"
    choices: Optional[Tuple[str, ...]] = None
    takers: Dict[str, Optional[str]] = field(default_factory=dict)
    defaults: Dict[str, Any] = field(default_factory=dict)

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _kind(annotation: Any, default: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "")
    if isinstance(default, bool) or text == "bool":
        return "bool"
    if text.startswith(("Sequence", "Tuple", "List", "tuple", "list")) or isinstance(default, (tuple, list)):
        return "list"
    for kind in ("int", "float", "str"):
        if text in (kind, f"Optional[{kind}]") or type(default).__name__ == kind:
            return kind
    return "str"


def _attack_class(name: str) -> Optional[type]:
    return attacks.REGISTRY.entry(name).target


def _takes_model_side_eot(name: str) -> bool:
    """An attack without an ``eot`` of its own runs on an EOT-wrapped model, unless its
    registration pins ``eot`` (``bpda``: one draw by definition)."""
    entry = attacks.REGISTRY.entry(name)
    return "eot" not in attacks.REGISTRY.parameters(name) and "eot" not in entry.fixed


def attack_flags() -> Dict[str, Flag]:
    """Every attack flag, by dest, with the attacks that take it."""
    flags: Dict[str, Flag] = {}
    for name in attacks.names():
        params = attacks.REGISTRY.parameters(name)
        for p in params.values():
            if p.name in RUN_SET:
                continue
            dest = ALIASES.get(p.name, p.name)
            flag = flags.get(dest)
            if flag is None:
                kind = _kind(p.annotation, p.default)
                choices = {"norm": ("l2", "linf"), "loss": tuple(LOSSES)}.get(dest)
                flag = flags[dest] = Flag(dest, kind, choices)
            flag.takers.setdefault(name, p.name)
            if p.default is not inspect.Parameter.empty:
                flag.defaults.setdefault(name, p.default)
        if "norm" not in params:  # an L2-only attack (cw, deepfool, lbfgs, bpda): --norm l2 is fine
            flags.setdefault("norm", Flag("norm", "str", ("l2", "linf"))).takers[name] = None
        if _takes_model_side_eot(name):
            flags.setdefault("eot", Flag("eot", "int")).takers[name] = None
    return flags


def _fmt_default(v: Any) -> str:
    if v is None:
        return "auto"
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def add_attack_flags(p: argparse.ArgumentParser) -> None:
    """Add the union of the attacks' flags (default None: the attack's own default)."""
    group = p.add_argument_group(
        "attack hyperparameters",
        "Built from each attack's declared hyperparameters; a flag the chosen --attack does not take "
        "is an error that lists the ones it does. Default: the attack's own.",
    )
    for dest, flag in sorted(attack_flags().items()):
        what = DESCRIPTIONS.get(dest, f"the attack's {dest!r}")
        own = ", ".join(f"{a} {_fmt_default(v)}" for a, v in flag.defaults.items())
        text = f"{what} [{', '.join(sorted(flag.takers))}]" + (f" (defaults: {own})" if own else "")
        kw: Dict[str, Any] = {"dest": dest, "default": None, "help": text.replace("%", "%%")}
        if flag.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif flag.kind == "list":
            kw.update(type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), metavar="A,B")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[flag.kind]
            if flag.choices:
                kw["choices"] = flag.choices
        group.add_argument(flag.option, **kw)


def valid_flags(name: str) -> List[str]:
    """The attack flags ``name`` takes, as spelled on the command line."""
    return [f.option for d, f in sorted(attack_flags().items()) if name in f.takers]


def attacks_by_flags() -> str:
    """One line per attack: its description and its flags (for ``--help``)."""
    lines = ["attacks and their flags:"]
    for name in attacks.names():
        lines.append(f"  {name}: {attacks.REGISTRY.describe(name)}")
        lines.append(f"      {' '.join(valid_flags(name)) or '(none)'}")
    return "\n".join(lines)


def attack_kwargs(name: str, args: argparse.Namespace, *, progress: Optional[Callable[..., None]] = None) -> Tuple[Dict[str, Any], Optional[int]]:
    """Map the parsed flags onto ``name``'s hyperparameters.

    Returns ``(kwargs for attacks.create, model-side EOT draws or None)``. Raises
    ``UsageError`` for a flag ``name`` does not take (naming those it does) or a value it
    cannot have.
    """
    flags = attack_flags()
    given = {d: getattr(args, d) for d in flags if getattr(args, d, None) is not None}
    wrong = [flags[d].option for d in sorted(given) if name not in flags[d].takers]
    if wrong:
        takes = ", ".join(valid_flags(name)) or "none"
        raise UsageError(
            f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --attack {name}; "
            f"its flags: {takes} (and the run options in --help)"
        )
    check_attack_values(name, given)
    params = attacks.REGISTRY.parameters(name)
    cls = _attack_class(name)
    kw: Dict[str, Any] = {}
    model_eot = None
    norm = given.get("norm")
    if "norm" not in params and norm is not None and norm not in getattr(cls, "norms", ("l2",)):
        raise UsageError(f"{name} is an L2 attack; --norm {norm} does not apply (use adaptive or pgd)")
    for dest, value in given.items():
        hp = flags[dest].takers[name]
        if hp is None:  # --norm l2 of an L2 attack, or the model-side EOT wrapper
            if dest == "eot":
                model_eot = int(value)
            continue
        kw[hp] = value
    run_set = {
        "chunk": getattr(args, "eot_chunk", None),
        "batch_size": getattr(args, "batch_size", None),
        "progress": progress,
        "record_history": True,
        "draws": max(1, int(getattr(args, "draws", 1) or 1)),
    }
    for hp, value in run_set.items():
        if hp in params and value is not None:
            kw[hp] = value
    return kw, model_eot


#: Least value of each integer attack flag (DeepFool compares the true class with at least one other).
INT_MINIMUM = {"steps": 1, "eot": 1, "binary_search_steps": 1, "restarts": 1, "max_rounds": 1, "candidates": 2}
#: Float attack flags that must be > 0; every other float flag must be >= 0. All must be finite.
POSITIVE = ("eps", "lr", "initial_const", "step_size", "rel_stepsize", "step_fraction")


def check_attack_values(name: str, given: Dict[str, Any]) -> None:
    """The values of the attack flags ``given`` (dest -> value) that no attack can use, as
    one-line usage errors naming the fix (issue 11, item 5)."""
    flags = attack_flags()
    for dest, value in given.items():
        flag = flags[dest]
        option = flag.option
        if flag.kind == "int" and value < INT_MINIMUM.get(dest, 1):
            raise UsageError(f"{option} must be at least {INT_MINIMUM.get(dest, 1)}, got {value}")
        if flag.kind == "float":
            if not math.isfinite(value):
                raise UsageError(f"{option} must be a finite number, got {value}")
            if dest in POSITIVE and not value > 0:
                raise UsageError(f"{option} must be positive, got {value:g}")
            if value < 0:
                raise UsageError(f"{option} must be 0 or more, got {value:g}")
        if dest == "losses":
            bad = [v for v in value if v not in LOSSES]
            if not value or bad:
                raise UsageError(f"--losses {','.join(value) or repr('')}: give one or more of {', '.join(LOSSES)}, "
                                 f"comma-separated" + (f" ({bad[0]!r} is not one)" if bad else ""))


def given_attack_flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The attack flags set on the command line (dest -> value)."""
    return {d: getattr(args, d) for d in attack_flags() if getattr(args, d, None) is not None}


def check_attack_combinations(name: str, given: Dict[str, Any]) -> None:
    """Attack flags that contradict each other or do nothing together (issue 11, item 5);
    ``prepdefense attack`` checks them before anything loads."""
    flags = attack_flags()
    if "step_size" in given and "rel_stepsize" in given:
        raise UsageError("--step-size and --rel-stepsize both set the step; give only one")
    if "steps" in given and "queries" in given and name == "spsa":
        raise UsageError("--queries sets spsa's steps (queries // (2 * samples)); give --steps or --queries, not both")
    if "max_rounds" in given:
        if not given.get("until_bound"):
            raise UsageError("--max-rounds caps the rounds of --until-bound; add --until-bound or drop --max-rounds")
        steps = given.get("steps", attacks.REGISTRY.parameters(name)["rounds"].default)
        if given["max_rounds"] < steps:
            raise UsageError(f"--max-rounds {given['max_rounds']} is below the {steps} rounds of --steps; "
                             f"raise --max-rounds or lower --steps")
    if "kappa" in given and name in flags["kappa"].takers:
        if "loss" in flags and name in flags["loss"].takers:
            loss = given.get("loss", flags["loss"].defaults.get(name))
            if loss != "margin":
                raise UsageError(f"--kappa is the confidence of the margin loss, and {name} uses --loss {loss}; "
                                 "add --loss margin or drop --kappa")
        elif "losses" in flags and name in flags["losses"].takers:
            losses = given.get("losses", flags["losses"].defaults.get(name)) or ()
            if "margin" not in losses:
                raise UsageError(f"--kappa is the confidence of the margin loss, and --losses {','.join(losses)} "
                                 "has none; add margin to --losses or drop --kappa")


def handles_defense(name: str) -> bool:
    """Whether the attack differentiates the defended model itself (BPDA, EOT, batching):
    it declares a BPDA approximation ``approx``."""
    return "approx" in attacks.REGISTRY.parameters(name)


def supports_targeted(name: str) -> bool:
    return bool(getattr(_attack_class(name), "supports_targeted", True))
