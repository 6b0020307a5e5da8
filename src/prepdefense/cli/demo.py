"""``prepdefense demo``: the main job on the built-in images (issue 2, item 7; issue 3, item 7).

Classifies the built-in scikit-image photos with the bare model and the defended one, saves
for each image the clean image beside two independent defended draws (PNG), and writes
``OUT/README.md`` with the images and the top-5 predictions of both.
"""

from __future__ import annotations

from .. import defenses
from ..experiments.demo import default_defense_name, run_demo
from .common import UsageError, print_json, resolve_device
from .predict import build_model, one_line_skip_warnings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="classify the built-in images bare and defended; write images and a Markdown summary",
        description=(
            "Run the default model on the built-in scikit-image photos, bare and behind a defense "
            "(default: the paper's dct-distort when available), save each clean image beside two "
            "independent defended draws, and write OUT/README.md with the top-5 predictions."
        ),
    )
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--defense", default=None, help="defense name (default: dct-distort if registered, else none)")
    p.add_argument("--model", default="efficientnet-lite0", help="classifier name (default: efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="local weights file for torchvision models")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    device = resolve_device(args.device)
    name = (args.defense or default_defense_name()).strip().lower()
    try:
        defenses.create(name)  # fail early, with the known names, before loading anything
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown defense {name!r}") from None
    except ValueError as e:
        raise UsageError(f"bad --defense {args.defense!r}: {e}") from None
    with one_line_skip_warnings():
        model = build_model(args.model, args.weights, device)
        report, items = run_demo(model, args.out, model_name=args.model, defense_name=name, seed=args.seed, device=device)
    summary = {
        "report": str(report),
        "model": args.model,
        "defense": name,
        "seed": args.seed,
        "device": str(device),
        "n": len(items),
        "bare_correct": sum(it.bare_correct for it in items),
        "defended_correct": sum(it.defended_correct for it in items),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"demo: {len(items)} built-in images; bare model {summary['bare_correct']}/{len(items)} correct, "
            f"with {name} {summary['defended_correct']}/{len(items)}; report {report}"
        )
    return 0
