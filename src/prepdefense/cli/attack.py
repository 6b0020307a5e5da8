"""``prepdefense attack``: run an attack on the protocol sample against a (defended) model
(issue 4, item 8; PROTOCOL.md "Attacks", "Protocol sample").

Images: the protocol sample of ``--n`` images the undefended model classifies correctly, with
a target each, drawn with ``--seed`` (``prepdefense.data.protocol_sample``). The attacked model
is ``Defended(defense, classifier)`` (``--defense none``: the bare classifier). Gradients go
through the defense with BPDA (identity through the non-differentiable parts, the real
gradient through differentiable ones), and through EOT over ``--eot`` draws when asked;
``--transfer`` instead generates on the undefended model and feeds the result to the defended
one (the setting of the paper's Table 3).

Flags: the run's own (``--data`` ... ``--json``) and the attack's, built from its declared
hyperparameters (:mod:`.attack_flags`); a flag the chosen attack does not take is a usage
error naming those it does.

Verdict: the adversarial images are classified by the defended model under ``--draws`` fresh
draws of the defense (one for a deterministic defense); ``accuracy``/``asr`` are the expected
values over those draws, ``accuracy_worst``/``asr_worst`` the worst case (an image counts as
broken if any draw is fooled). ``--json`` prints one object with these, ``n``, ``history``
(per-round accuracy and ASR for iterative attacks), the ``adaptive`` attack's intervals,
the model passes of the attack (``attack_passes``), the checks run after it with the images
each ran on and their cost (:mod:`.attack_checks`; by default for ``adaptive``, at most 25%
of the attack's passes), and model/defense/attack/seed/device/versions.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import __version__, attacks, data, defenses
from ..attacks.verdict import evaluate_on_draws
from ..draws import DRAW_SCHEME, DrawKey, KeyLike, image_id
from ..attacks.base import AttackResult
from ..attacks.bpda import with_bpda
from ..attacks.eot import EOT
from ..defenses.defended import undefended_at
from ..experiments.judge import MIN_DRAWS
from ..metrics import l2_rms, linf
from ..seeding import child_seed, make_generator
from .attack_checks import DEFAULT_SUBSET, HELP as CHECKS_HELP, MODES, Checks, PassCounter, format_checks
from .attack_flags import (add_attack_flags, attack_kwargs, attacks_by_flags, check_attack_combinations,
                           given_attack_flags, handles_defense, supports_targeted)
from .common import (DEFENSE_HELP, MODEL_HELP, WEIGHTS_HELP, UsageError, add_defend_at_option, add_model_options, check_data,
                     check_defend_at, check_out_file, check_defense, check_model,
                     check_model_options, check_number, check_seed, model_options, one_line_skip_warnings, print_json,
                     progress, resolve_device)

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attack",
        help="attack a (defended) model on the protocol sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=attacks_by_flags(),
        description=textwrap.fill(
            "Attack the protocol sample (N images the undefended model classifies correctly, a "
            "random target each, drawn with --seed) through a preprocessing defense and report "
            "accuracy and attack success rate. Attacks: "
            + ", ".join(attacks.names())
            + ". bpda / bpda-eot are the paper's protocol (Sections 6.2-6.3); adaptive is the "
            "strong EOT-PGD attack with BPDA, judged on fresh draws of the defense."
        ),
    )
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders), or 'builtin' (default)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    add_model_options(p)
    add_defend_at_option(p, "attack")
    p.add_argument("--defense", required=True, help=DEFENSE_HELP)
    p.add_argument("--attack", required=True, help="attack name: " + ", ".join(attacks.names()))
    p.add_argument("--n", type=int, default=100, help="images in the protocol sample (default 100)")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--targeted", dest="targeted", action="store_true", default=None, help="targeted at the sample's random targets (default, as the paper)")
    grp.add_argument("--untargeted", dest="targeted", action="store_false", help="untargeted (success = not the true label)")
    p.add_argument("--transfer", action="store_true", help="generate on the undefended model, evaluate on the defended one (Table 3 setting)")
    p.add_argument("--draws", type=int, default=MIN_DRAWS, help=f"fresh draws of a random defense for the verdict (default {MIN_DRAWS}, the protocol's; "
                        "fewer is a quick look and gets a warning)")
    p.add_argument("--diagnostics", nargs="?", const="default", default=None, choices=MODES, help=CHECKS_HELP.replace("%", "%%"))
    p.add_argument("--no-diagnostics", action="store_true", help="same as --diagnostics off")
    p.add_argument("--diag-n", type=int, default=None, help=f"most images a check runs on (default {DEFAULT_SUBSET})")
    p.add_argument("--batch-size", type=int, default=16, help="images attacked together (default 16)")
    p.add_argument("--eot-chunk", type=int, default=None, help="EOT draws per classifier call (memory; default all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, targets, defense and attack (default 0)")
    p.add_argument("--save-adv", default=None, metavar="FILE.npz",
                   help="write the adversarial images (x_adv), the clean images (x), labels, targets and ids to this .npz "
                        "(written atomically), for 'prepdefense judge --adv FILE.npz' or another tool")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress bar")
    add_attack_flags(p)
    p.set_defaults(func=run)


def build_attack(name: str, args, *, progress_cb=None) -> Tuple[Any, Optional[int]]:
    """Create attack ``name`` from its flags (:mod:`.attack_flags`); returns the attack and
    the model-side EOT draws (None: no wrapper)."""
    name = name.strip().lower()
    if name not in attacks.names():
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(attacks.names())}")
    kw, model_eot = attack_kwargs(name, args, progress=progress_cb)
    try:
        return attacks.create(name, **kw), model_eot
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad settings for {name}: {e}") from None


def _versions() -> Dict[str, str]:
    import numpy

    return {"prepdefense": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def _check_values(args) -> None:
    for flag, v in (("--n", args.n), ("--batch-size", args.batch_size), ("--draws", args.draws), ("--diag-n", args.diag_n)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be at least 1, got {v}")
    for flag, v in (("--steps", args.steps), ("--eot", args.eot), ("--eot-chunk", args.eot_chunk)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be at least 1, got {v}")
    check_number("--eps", args.eps, positive=True)
    check_seed(args.seed)
    if getattr(args, "no_diagnostics", False):
        if args.diagnostics not in (None, "off"):
            raise UsageError(f"--no-diagnostics and --diagnostics {args.diagnostics} contradict each other: drop one")
        args.diagnostics = "off"


def _check_combinations(args, name: str, mode: str) -> None:
    """Flags that contradict each other or do nothing in this run (issue 11, item 5)."""
    if args.transfer:
        if args.diagnostics not in (None, "off"):
            raise UsageError(f"--diagnostics {args.diagnostics} checks an attack on the defended model; "
                             "--transfer attacks the undefended one: drop one of them")
        if check_defense(args.defense) == "none":
            raise UsageError("--transfer generates on the undefended model and judges on the defended one; "
                             "with --defense none they are the same model: name a defense or drop --transfer")
    if args.eot_chunk is not None:
        declared = attacks.REGISTRY.parameters(name).get("eot")  # cw, deepfool, lbfgs: the model-side EOT wrapper
        eot = args.eot if args.eot is not None else (declared.default if declared is not None else 1)
        if eot == 1:
            source = "--eot 1" if args.eot is not None else f"{name}'s default EOT of 1 draw"
            raise UsageError(f"--eot-chunk splits EOT's draws over classifier calls, but this run has {source}: "
                             "drop --eot-chunk or give --eot N (N > 1)")
    if args.diag_n is not None and mode == "off":
        why = "--diagnostics off runs none" if args.diagnostics == "off" else f"{name} runs none unless asked"
        raise UsageError(f"--diag-n sets how many images the checks run on, but {why}; "
                         "drop --diag-n or add --diagnostics (default or full)")


def run_attack(attack: Any, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor],
               generator: KeyLike, *, batch_size: int) -> AttackResult:
    """One attack call in batches of ``batch_size`` (the attack's own, when it was set)."""
    if attack.batch_size is None:
        attack.batch_size = batch_size
    return attack(model, x, labels=labels, targets=targets, generator=generator)


def run(args) -> int:
    from .common import build_defended, build_model

    _check_values(args)
    name = args.attack.strip().lower()
    if name not in attacks.names():
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(attacks.names())}")
    kwargs, _ = attack_kwargs(name, args)  # a flag the attack does not take fails here, before any loading
    check_attack_combinations(name, given_attack_flags(args))
    targeted = args.targeted
    if targeted is None:
        targeted = supports_targeted(name)
    elif targeted and not supports_targeted(name):
        raise UsageError(f"{name} is untargeted only; use --untargeted")
    mode = args.diagnostics or ("default" if name == "adaptive" else "off")
    _check_combinations(args, name, mode)
    if args.transfer:
        mode = "off"
    build_attack(name, args)  # a value the attack refuses fails here, before any loading
    defense_name = check_defense(args.defense)
    random_defense = bool(getattr(defenses.create(defense_name), "randomized", False))  # built cheaply, as check_defense did
    if args.draws < MIN_DRAWS and random_defense:
        print(f"prepdefense attack: warning: --draws {args.draws} is below the protocol's {MIN_DRAWS} fresh draws of a "
              f"random defense: a quick look, not the protocol's verdict ('prepdefense judge' and 'evaluate' take at "
              f"least {MIN_DRAWS})", file=sys.stderr)
    if not random_defense and not args.transfer:
        idle = [flag for flag, given in (("--eot", args.eot is not None and args.eot > 1),
                                         ("--eot-chunk", args.eot_chunk is not None)) if given]
        if idle:
            print(f"prepdefense attack: warning: {' and '.join(idle)} change nothing here: EOT averages over a random "
                  f"defense's draws, and --defense {defense_name} is deterministic (every draw is the same), so the "
                  "attack calls it once per step", file=sys.stderr)
    check_model(args.model, args.weights)
    check_model_options(args)
    check_defend_at(args)
    listed = check_data(args.data)
    if args.save_adv:
        if not args.save_adv.endswith(".npz"):
            raise UsageError(f"--save-adv {args.save_adv!r}: give a file name ending in .npz")
        check_out_file(args.save_adv, "--save-adv")
    if args.n > listed:
        raise UsageError(f"--n {args.n} asks for more images than --data {args.data} lists ({listed}); "
                         f"lower --n or give a larger folder")

    device = resolve_device(args.device)
    t0 = time.time()
    classifier = build_model(args.model, args.weights, device, **model_options(args))
    defended = build_defended(classifier, defense_name, args.seed, device, defend_at=args.defend_at)
    # The undefended model in the attacked images' geometry (resized from --defend-at S when set).
    bare = undefended_at(classifier, args.defend_at)
    with one_line_skip_warnings():
        sample = data.protocol_sample(classifier, args.data, n=args.n, seed=args.seed, batch_size=args.batch_size, device=device,
                                      load_size=args.defend_at)
    x = sample.x.to(device)
    labels = sample.labels.to(device)
    targets = sample.targets.to(device) if targeted else None

    show = not args.json
    bar = progress(None, total=1, desc=f"{name} on {args.defense}", enabled=show, unit="step")

    def on_progress(done, total, *_):
        bar.total = total
        bar.update(done - bar.n)

    attack, model_eot = build_attack(name, args, progress_cb=on_progress)
    # Every image's randomness follows its id (its file name), not its place in the sample
    # or the batch: the run's key, with a sub-stream per use.
    run_key = DrawKey.from_seed(args.seed, x.shape[0], [image_id(i) for i in sample.ids])
    g = make_generator(args.seed)

    own_defense = handles_defense(name)  # the attack does BPDA, EOT and batching itself

    def attacked_model(eot: Optional[int]) -> nn.Module:
        if own_defense:
            return defended
        m = with_bpda(defended)
        if eot and eot > 1 and getattr(m, "randomized", False):
            m = EOT(m, eot, chunk=args.eot_chunk)
        return m

    def run_on(a, model, xs, ys, ts, key) -> AttackResult:
        return run_attack(a, model, xs, ys, ts, key, batch_size=args.batch_size)

    counter = PassCounter(classifier)
    try:
        target_model = bare if args.transfer else attacked_model(model_eot)
        result = run_on(attack, target_model, x, labels, targets, run_key.child("attack"))
        attack_passes = counter.images
        bar.close()

        adv = result.adversarial.detach()
        if args.save_adv:  # saved before the verdict and the checks, so nothing made is lost to a later error
            saved_path = save_adversarial(args.save_adv, adv, x, labels, targets, sample.ids, defend_at=args.defend_at)
        # Judged on the fresh draws `prepdefense judge` uses (the run key's "judge" stream), so that
        # judging the saved examples again reproduces this verdict; an attack that judged its own
        # result (adaptive) did so on other fresh draws, kept in its info.
        full_verdict = evaluate_on_draws(defended, adv, labels, targets, draws=args.draws, key=run_key.child("judge"))
        verdict = {k: v for k, v in full_verdict.items() if k in _VERDICT_KEYS}
        clean = evaluate_on_draws(defended, x, labels, targets, draws=args.draws, key=run_key.child("clean"))

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
            "defense": defense_name,
            "defend_at": args.defend_at,
            "attack": name,
            "attack_settings": _settings(attack),
            "transfer": bool(args.transfer),
            "seed": args.seed,
            "device": str(device),
            "data": str(args.data),
            "ids": list(sample.ids),
            "versions": _versions(),
            "draw_scheme": DRAW_SCHEME,
            "attack_passes": attack_passes,
        }
        info = {k: v for k, v in result.info.items() if k not in _VERDICT_KEYS and not k.startswith("per_image") and k != "stop_reason"}
        if info:
            out["info"] = info

        diag_text = None
        if mode != "off":
            checks = Checks(
                name=name, kwargs=kwargs, model_eot=model_eot, attacked_model=attacked_model, run_attack=run_on,
                defended=defended, classifier=bare, counter=counter, attack_passes=attack_passes,
                fooled_fraction=list(full_verdict["per_image_fooled_fraction"]), draws=args.draws, main_info=result.info,
            )
            diag = checks.run(mode, x, labels, targets, generator=make_generator(child_seed(g)),
                              subset=args.diag_n if args.diag_n is not None else DEFAULT_SUBSET)
            out["diagnostics"] = diag
            diag_text = format_checks(diag)
    finally:
        counter.remove()
    out["seconds"] = round(time.time() - t0, 2)
    if args.save_adv:
        out["saved_adversarial"] = str(saved_path)

    if args.json:
        print_json(out)
    else:
        _print_text(out, diag_text)
    return 0


def save_adversarial(path: str, adv: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor],
                     ids, defend_at: Optional[int] = None) -> Path:
    """Write an ``.npz`` that ``prepdefense judge`` (and numpy users) read: ``x_adv`` and ``x``
    (N, C, H, W) float32 in [0, 1], ``labels`` (N,) int64, ``targets`` when targeted, ``ids`` (N,)
    file names, ``defend_at`` (a scalar) when the defense ran at another side. Written atomically."""
    import io

    import numpy as np

    from ..atomic_io import atomic_write_bytes

    arrays = {"x_adv": adv.detach().float().cpu().numpy(), "x": x.detach().float().cpu().numpy(),
              "labels": labels.cpu().numpy().astype(np.int64), "ids": np.asarray([str(i) for i in ids])}
    if targets is not None:
        arrays["targets"] = targets.cpu().numpy().astype(np.int64)
    if defend_at is not None:
        arrays["defend_at"] = np.asarray(int(defend_at), dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(Path(path).expanduser(), buf.getvalue())


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
        f"{out['n']} images, seed {out['seed']}, device {out['device']}"
        + (f"; --transfer: generated on the bare {out['model']}, judged on the defended one" if out.get("transfer") else "")
        + ")"
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
