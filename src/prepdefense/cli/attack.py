"""``prepdefense attack``: run an attack on the protocol sample against a (defended) model
(issue 4, item 8; PROTOCOL.md "Attacks", "Protocol sample").

Images: the protocol sample of ``--n`` images the undefended model classifies correctly, with
a target each, drawn with ``--seed`` (``prepdefense.data.protocol_sample``). The attacked model
is ``Defended(defense, classifier)`` (``--defense none``: the bare classifier). Gradients go
through the defense with BPDA (identity through the non-differentiable parts, the real
gradient through differentiable ones), and through EOT over ``--eot`` draws when asked;
``--transfer`` instead generates on the undefended model and feeds the result to the defended
one (the setting of the paper's Table 3).

Verdict: the adversarial images are classified by the defended model under ``--draws`` fresh
draws of the defense (one for a deterministic defense); ``accuracy``/``asr`` are the expected
values over those draws, ``accuracy_worst``/``asr_worst`` the worst case (an image counts as
broken if any draw is fooled). ``--json`` prints one object with these, ``n``, ``history``
(per-round accuracy and ASR for iterative attacks), the ``adaptive`` attack's intervals and
diagnostics, and model/defense/attack/seed/device/versions.
"""

from __future__ import annotations

import math
import platform
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import __version__, attacks, data
from ..attacks.adaptive import AdaptiveAttack, evaluate_on_draws
from ..attacks.base import AttackResult
from ..attacks.bpda import with_bpda
from ..attacks.diagnostics import format_diagnostics, run_diagnostics
from ..attacks.eot import EOT
from ..attacks.protocol import ProtocolBPDA, merge_histories
from ..metrics import PAPER_L2_BOUND, PAPER_LINF_BOUND, l2_rms, linf
from ..seeding import child_seed, make_generator
from .common import UsageError, print_json, progress, resolve_device

#: Attacks that only exist untargeted.
UNTARGETED_ONLY = ("deepfool",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attack",
        help="attack a (defended) model on the protocol sample",
        description=(
            "Attack the protocol sample (N images the undefended model classifies correctly, a "
            "random target each, drawn with --seed) through a preprocessing defense and report "
            "accuracy and attack success rate. Attacks: "
            + ", ".join(attacks.names())
            + ". bpda / bpda-eot are the paper's protocol (Sections 6.2-6.3); adaptive is the "
            "strong EOT-PGD attack with BPDA, judged on fresh draws of the defense."
        ),
    )
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders), or 'builtin' (default)")
    p.add_argument("--model", default="efficientnet-lite0", help="classifier name (default: efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="local weights file for torchvision models (nothing downloads)")
    p.add_argument("--defense", required=True, help="defense name, a+b chain, or 'none' for the bare model")
    p.add_argument("--attack", required=True, help="attack name: " + ", ".join(attacks.names()))
    p.add_argument("--n", type=int, default=100, help="images in the protocol sample (default 100)")
    p.add_argument("--norm", choices=("l2", "linf"), default=None, help="threat model (default: the attack's own; adaptive: l2)")
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help=(
            "bound: for --norm l2 the NORMALISED (RMS) L2 of the paper, sqrt(sum d^2 / (C*H*W)) "
            f"(default {PAPER_L2_BOUND}); for linf the max-abs radius (default 8/255 = {PAPER_LINF_BOUND:.4f}). "
            "bpda/bpda-eot: the l2 bound at which an image stops"
        ),
    )
    p.add_argument("--steps", type=int, default=None, help="iterations (rounds for bpda/bpda-eot; max_iterations for lbfgs); default: the attack's")
    p.add_argument("--eot", type=int, default=None, help="EOT draws per gradient (adaptive default 30, bpda-eot 30; others: 1)")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--targeted", dest="targeted", action="store_true", default=None, help="targeted at the sample's random targets (default, as the paper)")
    grp.add_argument("--untargeted", dest="targeted", action="store_false", help="untargeted (success = not the true label)")
    p.add_argument("--until-bound", action="store_true", help="bpda/bpda-eot: continue past --steps until every image stops (success or l2 bound)")
    p.add_argument("--transfer", action="store_true", help="generate on the undefended model, evaluate on the defended one (Table 3 setting)")
    p.add_argument("--draws", type=int, default=10, help="fresh draws of a random defense for the verdict (default 10)")
    p.add_argument("--diagnostics", action="store_true", help="print the Carlini et al. checklist (always on for adaptive)")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the checklist even for adaptive")
    p.add_argument("--diag-n", type=int, default=4, help="images used by the diagnostics (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="images attacked together (default 16)")
    p.add_argument("--eot-chunk", type=int, default=None, help="EOT draws per classifier call (memory; default all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, targets, defense and attack (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress bar")
    p.set_defaults(func=run)


def build_attack(name: str, args, *, progress_cb=None) -> Any:
    """Create attack ``name`` with --norm/--eps/--steps/--eot mapped onto its hyperparameters."""
    name = name.strip().lower()
    if name not in attacks.names():
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(attacks.names())}")
    kw: Dict[str, Any] = {}
    if name == "adaptive":
        kw.update(norm=args.norm or "l2", eps=args.eps, draws=max(1, args.draws), chunk=args.eot_chunk, batch_size=args.batch_size, progress=progress_cb)
        if args.steps is not None:
            kw["steps"] = args.steps
        if args.eot is not None:
            kw["eot"] = args.eot
    elif name in ("bpda", "bpda-eot"):
        if args.norm == "linf":
            raise UsageError(f"{name} is the paper's L2 protocol; --norm linf does not apply (use adaptive or pgd)")
        kw.update(chunk=args.eot_chunk, batch_size=args.batch_size, progress=progress_cb, until_bound=args.until_bound)
        if args.eps is not None:
            kw["l2_bound"] = args.eps
        if args.steps is not None:
            kw["rounds"] = args.steps
        if args.eot is not None:
            if name == "bpda" and args.eot > 1:
                raise UsageError("bpda uses one draw per gradient; use --attack bpda-eot for EOT")
            if name == "bpda-eot":
                kw["eot"] = args.eot
    else:
        probe = attacks.create(name)  # the attack's own defaults, to see what it takes
        if args.norm is not None or args.eps is not None:
            if hasattr(probe, "norm"):
                norm = args.norm or probe.norm
                kw["norm"] = norm
                if args.eps is not None:
                    kw["rms_eps" if norm == "l2" and hasattr(probe, "rms_eps") else "eps"] = args.eps
            elif args.eps is not None or (args.norm not in (None, "l2")):
                raise UsageError(f"{name} is an unbounded L2 attack: --eps/--norm linf do not apply")
        if args.steps is not None:
            key = "steps" if hasattr(probe, "steps") else ("max_iterations" if hasattr(probe, "max_iterations") else None)
            if key is None:
                raise UsageError(f"{name} takes no number of steps")
            kw[key] = args.steps
        if hasattr(probe, "record_history"):
            kw["record_history"] = True
    try:
        return attacks.create(name, **kw)
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad settings for {name}: {e}") from None


def _merge_results(results: List[AttackResult]) -> AttackResult:
    adv = torch.cat([r.adversarial for r in results])
    succ = torch.cat([r.success.cpu() for r in results])
    hist: List[Dict[str, Any]] = []
    if all(r.history for r in results):
        per = []
        for r in results:
            n = r.adversarial.shape[0]
            per.append([
                {"round": h.get("round", h.get("step", i + 1)), "n": n, "n_correct": round(h["accuracy"] * n), "n_success": round(h["asr"] * n), "n_running": 0}
                for i, h in enumerate(r.history)
            ])
        hist = [{k: v for k, v in h.items() if k in ("round", "accuracy", "asr", "n")} for h in merge_histories(per)]
    return AttackResult(adversarial=adv, success=succ, history=hist, info=results[0].info if len(results) == 1 else {})


def _versions() -> Dict[str, str]:
    import numpy

    return {"prepdefense": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def run(args) -> int:
    from .common import build_defended, build_model

    for flag, v in (("--n", args.n), ("--batch-size", args.batch_size), ("--draws", args.draws), ("--diag-n", args.diag_n)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be at least 1, got {v}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.eot is not None and args.eot < 1:
        raise UsageError(f"--eot must be at least 1, got {args.eot}")
    if args.eps is not None and not args.eps > 0:
        raise UsageError(f"--eps must be positive, got {args.eps}")
    name = args.attack.strip().lower()
    if name not in attacks.names():
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(attacks.names())}")
    targeted = args.targeted
    if targeted is None:
        targeted = name not in UNTARGETED_ONLY
    elif targeted and name in UNTARGETED_ONLY:
        raise UsageError(f"{name} is untargeted only; use --untargeted")

    device = resolve_device(args.device)
    t0 = time.time()
    classifier = build_model(args.model, args.weights, device)
    defended = build_defended(classifier, args.defense, args.seed, device)
    sample = data.protocol_sample(classifier, args.data, n=args.n, seed=args.seed, batch_size=args.batch_size, device=device)
    x = sample.x.to(device)
    labels = sample.labels.to(device)
    targets = sample.targets.to(device) if targeted else None

    show = not args.json
    bar = progress(None, total=1, desc=f"{name} on {args.defense}", enabled=show, unit="step")

    def on_progress(done, total, *_):
        bar.total = total
        bar.update(done - bar.n)

    attack = build_attack(name, args, progress_cb=on_progress)
    g = make_generator(args.seed)
    attack_g = make_generator(child_seed(g))
    verdict_g = make_generator(child_seed(g))

    ours = isinstance(attack, (AdaptiveAttack, ProtocolBPDA))
    if args.transfer:
        target_model: nn.Module = classifier
    elif ours:
        target_model = defended
    else:
        target_model = with_bpda(defended)
        if args.eot and args.eot > 1 and getattr(target_model, "randomized", False):
            target_model = EOT(target_model, args.eot, chunk=args.eot_chunk)

    if ours:
        result = attack(target_model, x, labels=labels, targets=targets, generator=attack_g)
    else:
        parts = []
        nb = math.ceil(x.shape[0] / args.batch_size)
        bar.total = nb
        for i, start in enumerate(range(0, x.shape[0], args.batch_size)):
            sl = slice(start, start + args.batch_size)
            parts.append(attack(target_model, x[sl], labels=labels[sl], targets=None if targets is None else targets[sl], generator=make_generator(child_seed(attack_g))))
            bar.update(1)
        result = _merge_results(parts)
    bar.close()

    adv = result.adversarial.detach()
    if isinstance(attack, AdaptiveAttack) and not args.transfer:
        verdict = {k: v for k, v in result.info.items() if k in _VERDICT_KEYS}
    else:
        verdict = evaluate_on_draws(defended, adv, labels, targets, draws=args.draws, generator=verdict_g)
        verdict = {k: v for k, v in verdict.items() if k in _VERDICT_KEYS}
    clean = evaluate_on_draws(defended, x, labels, targets, draws=args.draws, generator=make_generator(child_seed(g)))

    out: Dict[str, Any] = {
        "accuracy": verdict["robust_accuracy_expected"],
        "asr": verdict["asr_expected"],
        "accuracy_worst": verdict["robust_accuracy_worst"],
        "asr_worst": verdict["asr_worst"],
        "accuracy_ci95": verdict["robust_accuracy_expected_ci95"],
        "asr_ci95": verdict["asr_expected_ci95"],
        "accuracy_worst_ci95": verdict["robust_accuracy_worst_ci95"],
        "asr_worst_ci95": verdict["asr_worst_ci95"],
        "draws": verdict["draws"],
        "clean_accuracy": clean["robust_accuracy_expected"],
        "n": int(x.shape[0]),
        "targeted": bool(targeted),
        "l2_rms_max": float(l2_rms(adv, x).max()),
        "l2_rms_mean": float(l2_rms(adv, x).mean()),
        "linf_max": float(linf(adv, x).max()),
        "history": result.history,
        "model": args.model,
        "defense": (args.defense or "none").strip().lower(),
        "attack": name,
        "attack_settings": _settings(attack),
        "transfer": bool(args.transfer),
        "seed": args.seed,
        "device": str(device),
        "data": str(args.data),
        "ids": list(sample.ids),
        "versions": _versions(),
    }
    info = {k: v for k, v in result.info.items() if k not in _VERDICT_KEYS and not k.startswith("per_image") and k != "stop_reason"}
    if info:
        out["info"] = info

    diag_text = None
    want_diag = (args.diagnostics or name == "adaptive") and not args.no_diagnostics and not args.transfer
    if want_diag:
        d_attack = _with_no_progress(attack)
        diag = run_diagnostics(
            d_attack, target_model if not ours else defended, classifier, x, labels=labels, targets=targets,
            generator=make_generator(child_seed(g)), n=args.diag_n, gradient_draws=min(30, getattr(attack, "eot", 30) or 30),
            main_result=result,
        )
        out["diagnostics"] = diag
        diag_text = format_diagnostics(diag)
    out["seconds"] = round(time.time() - t0, 2)

    if args.json:
        print_json(out)
    else:
        _print_text(out, diag_text)
    return 0


_VERDICT_KEYS = (
    "draws",
    "robust_accuracy_expected",
    "robust_accuracy_expected_ci95",
    "robust_accuracy_worst",
    "robust_accuracy_worst_ci95",
    "asr_expected",
    "asr_expected_ci95",
    "asr_worst",
    "asr_worst_ci95",
)


def _with_no_progress(attack):
    import copy

    a = copy.copy(attack)
    if hasattr(a, "progress"):
        a.progress = None
    return a


def _settings(attack) -> Dict[str, Any]:
    if hasattr(attack, "hyperparameters"):
        return attack.hyperparameters()
    keep = {}
    for k, v in vars(attack).items():
        if k == "progress" or k.startswith("_"):
            continue
        if isinstance(v, (int, float, str, bool, type(None), tuple, list)):
            keep[k] = v
        else:
            keep[k] = type(v).__name__
    return keep


def _print_text(out: Dict[str, Any], diag_text: Optional[str]) -> None:
    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"

    print(
        f"{out['attack']} on {out['model']} + {out['defense']} ({'targeted' if out['targeted'] else 'untargeted'}, "
        f"{out['n']} images, seed {out['seed']}, device {out['device']})"
    )
    print(f"  clean accuracy {out['clean_accuracy']:.3f}")
    print(f"  accuracy {out['accuracy']:.3f} {ci(out['accuracy_ci95'])}, worst case over {out['draws']} draws {out['accuracy_worst']:.3f} {ci(out['accuracy_worst_ci95'])}")
    print(f"  ASR {out['asr']:.3f} {ci(out['asr_ci95'])}, worst case {out['asr_worst']:.3f} {ci(out['asr_worst_ci95'])}")
    print(f"  l2 (RMS) mean {out['l2_rms_mean']:.4f} max {out['l2_rms_max']:.4f}; linf max {out['linf_max']:.4f}")
    if out["history"]:
        h = out["history"]
        picks = sorted({0, len(h) // 4, len(h) // 2, 3 * len(h) // 4, len(h) - 1})
        print("  per round (single draw): " + "; ".join(f"{h[i].get('round', i + 1)}: ACC {h[i]['accuracy']:.2f} ASR {h[i]['asr']:.2f}" for i in picks))
    if diag_text:
        print(diag_text)
    print(f"  {out['seconds']} s")
