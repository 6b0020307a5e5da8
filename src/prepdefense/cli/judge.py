"""``prepdefense judge --adv FILE|DIR --defense NAME``: re-judge adversarial examples made by any
tool on fresh draws of the defended model (issue 12, item 4; :mod:`prepdefense.experiments.judge`).

``--adv`` is a ``.npz`` / ``.pt`` file (``x_adv``, ``labels``, optionally ``x``, ``targets``,
``ids``) or a folder of images with ``labels.csv`` (``file,label``, optionally ``target``);
``--clean DIR`` gives a folder's clean images (same file names). The images are judged at their
own size and values: 8-bit files as the 1/255 grid they hold, float arrays as given unless
``--quantize`` rounds them to 8 bits; the report's notes say which, and every conversion made.

Prints robust accuracy and ASR (expected over ``--draws`` fresh draws, at least 10, and worst
case) with 95% intervals, the bare model's accuracy on the same images, and with clean images
the clean accuracy and L2 (RMS) / Linf distances. ``--json`` prints the report as one object;
``--out FILE`` also writes it there (atomically).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_io import atomic_write_text
from ..experiments.judge import MIN_DRAWS, judge, load_adversarial
from .common import (DEFENSE_HELP, MODEL_HELP, WEIGHTS_HELP, UsageError, add_defend_at_option, add_model_options, build_model, check_defend_at,
                     check_defense, check_model,
                     check_model_options, check_out_file, check_seed, model_options, print_json, resolve_device)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "judge",
        help="re-judge adversarial examples made by any tool on fresh draws of a defended model",
        description=(
            "Classify adversarial examples (a .npz/.pt file with x_adv, labels and optionally x, targets, ids; or a "
            "folder of images with labels.csv: file,label[,target]) with the defended model under --draws fresh draws "
            "of the defense, and report robust accuracy and attack success rate (expected and worst case, 95% "
            "intervals), the bare model's accuracy, and L2 (RMS) / Linf distances to the clean images when given. "
            "Images are judged at their own size and values: 8-bit files as the 1/255 grid they hold."
        ),
    )
    p.add_argument("--adv", required=True, help="adversarial examples: a .npz or .pt file, or a folder of images with labels.csv")
    p.add_argument("--clean", default=None, help="for a folder: the folder of the clean images (same file names), for the distances")
    p.add_argument("--defense", required=True, help=DEFENSE_HELP)
    add_defend_at_option(p, "judge")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    add_model_options(p)
    p.add_argument("--draws", type=int, default=MIN_DRAWS, help=f"fresh draws of a random defense (default and minimum {MIN_DRAWS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0); image i's draws depend on it and its id alone")
    p.add_argument("--quantize", action="store_true", help="round float images to 8 bits first, as saving them to an 8-bit file would")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.draws < MIN_DRAWS:
        raise UsageError(f"--draws must be at least {MIN_DRAWS} (the protocol judges a random defense on at least "
                         f"{MIN_DRAWS} fresh draws), got {args.draws}")
    check_seed(args.seed)
    defense = check_defense(args.defense)
    check_model(args.model, args.weights)
    check_model_options(args)
    check_defend_at(args)
    if args.out is not None:
        check_out_file(args.out)
    if args.clean is not None and not Path(args.adv).expanduser().is_dir():
        raise UsageError("--clean is for a folder of images; a .npz/.pt file carries its clean images as x")
    device = resolve_device(args.device)
    adv = load_adversarial(args.adv, clean=args.clean)  # a bad file fails before the model loads
    model = build_model(args.model, args.weights, device, **model_options(args))
    report = judge(model, defense, adv, draws=args.draws, seed=args.seed, quantize=args.quantize, device=device,
                   defense_name=defense, defend_at=args.defend_at)
    report["model"] = args.model
    if args.out is not None:
        atomic_write_text(Path(args.out).expanduser(), json.dumps(report, sort_keys=True) + "\n")
    if args.json:
        print_json(report)
    else:
        _print_text(report)
    return 0


def _print_text(r) -> None:
    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"

    print(f"judge {r['source']} ({r['format']}, {r['n']} images, {'targeted' if r['targeted'] else 'untargeted'}) "
          f"on {r['model']} + {r['defense']}, seed {r['seed']}, device {r['device']}")
    print(f"  accuracy {r['accuracy']:.3f} {ci(r['accuracy_ci95'])}, worst case over {r['draws']} draws "
          f"{r['accuracy_worst']:.3f} {ci(r['accuracy_worst_ci95'])}")
    print(f"  ASR {r['asr']:.3f} {ci(r['asr_ci95'])}, worst case {r['asr_worst']:.3f} {ci(r['asr_worst_ci95'])}")
    print(f"  bare model (no defense): accuracy {r['bare_accuracy']:.3f}, ASR {r['bare_asr']:.3f}")
    if "clean_accuracy" in r:
        print(f"  clean accuracy {r['clean_accuracy']:.3f}; l2 (RMS) mean {r['l2_rms_mean']:.4f} max {r['l2_rms_max']:.4f}; "
              f"linf mean {r['linf_mean']:.4f} max {r['linf_max']:.4f}")
    for note in r["notes"]:
        print(f"  note: {note}")
