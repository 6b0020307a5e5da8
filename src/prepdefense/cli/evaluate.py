"""``prepdefense evaluate``: how robust a defense is, by an ensemble of attacks (issue 10, item 4).

    prepdefense evaluate --defense NAME --norm linf|l2 [--eps E] [--n N]
                         [--budget quick|standard|autoattack-rand|paper] [--out DIR] [--json]

Runs the budget's attacks (:mod:`prepdefense.attacks.ensemble`) on the protocol sample (N
images the undefended model classifies correctly, drawn with ``--seed``), each only on the
images still robust; judges every kept example on R >= 10 fresh draws of the defense; prints
the robust accuracy (expected over draws and worst case, 95% intervals), which attack broke
each image, a per-attack table and the checklist flags. With ``--out DIR`` it keeps the run
there (resumable per attack x image shard) and writes ``card.json`` (the robustness card,
schema in :mod:`prepdefense.experiments.evaluation`), ``report.md``, ``accuracy_vs_eps.png``
and ``adversarial.pt``. ``--json`` prints the card on stdout. ``--shard K/N`` runs one shard of
the attacks into its own ``--out``; ``prepdefense merge`` combines the shards, and the command
without ``--shard`` on the merged folder finishes the run.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..attacks import ensemble as E
from .common import (DEFENSE_HELP, MODEL_HELP, WEIGHTS_HELP, UsageError, add_model_options, check_at_least, check_data, check_radius, check_defense, check_model,
                     check_model_options, check_number, check_out_folder, check_seed, check_shard, model_options,
                     add_defend_at_option, check_defend_at, one_line_skip_warnings,
                     print_json, resolve_device)


def _budgets_epilog() -> str:
    lines = ["budgets (cost in model passes per image, at most: every attack on every image):"]
    for name in E.PUBLIC_BUDGETS:
        lines += textwrap.wrap(E.BUDGETS[name].describe(), width=100, initial_indent="  ", subsequent_indent="      ")
    lines += ["", "Deterministic defenses get EOT 1 (the mean of identical draws is one draw) and are judged once.",
              "The unbounded and more-steps checks add at most 25% of the attacks' counted passes; the curve adds its "
              "attack at the curve's radii (its steps are in the budget)."]
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="robust accuracy of a defense under an ensemble of attacks (APGD, EOT-PGD, transfer, Square, SPSA), with a robustness card",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_budgets_epilog(),
        description=textwrap.fill(
            "Attack the protocol sample (N images the undefended model classifies correctly, drawn with --seed) through a "
            "defense with an ensemble of attacks, untargeted, inside the Linf or L2 ball: each attack runs only on the images "
            "still robust (AutoAttack's rule); every kept example is judged on >= 10 fresh draws of the defense, and per image "
            "the worst case over attacks counts. Prints robust accuracy expected over draws and worst case with 95% intervals, "
            "which attack broke each image, a per-attack table and Carlini et al.'s checklist flags (a gradient-free attack "
            "beating the gradient ones, an unbounded attack short of 100%, more steps helping, transfer tried). With --out it "
            "keeps a resumable run and writes card.json, report.md, accuracy_vs_eps.png and adversarial.pt."
        ),
    )
    p.add_argument("--defense", required=True, help=DEFENSE_HELP)
    p.add_argument("--norm", required=True, choices=("linf", "l2"), help="threat model: linf, or l2 (the paper's normalised RMS L2)")
    p.add_argument("--eps", type=float, default=None,
                   help="radius: Linf max-abs (default 8/255), or for l2 the normalised RMS L2 sqrt(sum d^2/(C*H*W)) (default 0.05)")
    p.add_argument("--n", type=int, default=100, help="images in the protocol sample (default 100)")
    p.add_argument("--budget", default="quick", choices=E.PUBLIC_BUDGETS, help="attack budget (default quick; see below)")
    p.add_argument("--out", default=None, help="folder of the run (resumable) and of card.json, report.md, accuracy_vs_eps.png, "
                                               "adversarial.pt (default: none kept)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier evaluation in --out and start over")
    p.add_argument("--data", default="builtin", help="image folder (labels.csv or synset sub-folders), or 'builtin' (default)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    add_model_options(p)
    add_defend_at_option(p, "evaluate")
    p.add_argument("--draws", type=int, default=E.MIN_DRAWS, help=f"fresh draws judging each kept example (at least {E.MIN_DRAWS}; default {E.MIN_DRAWS})")
    p.add_argument("--shard-size", type=int, default=10, help="images per unit of work (resumption granularity; default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images attacked together (default: a whole shard)")
    p.add_argument("--no-checks", dest="checks", action="store_false", help="skip the unbounded and more-steps checks")
    p.add_argument("--no-curve", dest="curve", action="store_false", help="skip the accuracy-vs-epsilon curve's attacks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the attacks and the draws (default 0)")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--json", action="store_true", help="print the robustness card (one JSON object) on stdout")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only shard K of N (1/N .. N/N) into its own --out: the clean verdicts and attacks of the image "
                        "shards dealt to it (whole chains, balanced by cost); 'prepdefense merge OUT SHARD_OUT...' combines "
                        "the shards, then this command without --shard and with --out OUT reuses them and runs the checks, "
                        "the curve and the card (equal to an unsharded run's)")
    p.set_defaults(func=run)


def _check(args) -> str:
    """Every flag, before anything loads (one-line usage errors)."""
    check_at_least("--n", args.n)
    check_at_least("--draws", args.draws, E.MIN_DRAWS, hint=" (every kept example is judged on at least that many fresh draws)")
    check_at_least("--shard-size", args.shard_size)
    check_at_least("--batch-size", args.batch_size)
    check_number("--eps", args.eps, positive=True)
    check_radius("--eps", args.norm, args.eps)
    check_seed(args.seed)
    args.shard = check_shard(args.shard)
    if args.shard is not None and args.out is None:
        raise UsageError(f"--shard {args.shard} needs --out (each shard keeps its units there for 'prepdefense merge')")
    if args.shard is not None and args.json:
        raise UsageError("--json prints the card, which needs every shard: merge the shards, then run without --shard and with --json")
    if args.out is not None:
        check_out_folder(args.out)
    elif args.fresh:
        raise UsageError("--fresh deletes an earlier run in --out; without --out nothing is kept: add --out or drop --fresh")
    defense = check_defense(args.defense)
    check_model(args.model, args.weights)
    check_model_options(args)
    check_defend_at(args)
    resolve_device(args.device)
    listed = check_data(args.data)
    if args.n > listed:
        raise UsageError(f"--n {args.n} asks for more images than --data {args.data} lists ({listed}); lower --n or give a larger folder")
    return defense


def run(args) -> int:
    from ..experiments.evaluation import EvaluateConfig, evaluate_defense

    defense = _check(args)
    cfg = EvaluateConfig(
        defense=defense, norm=args.norm, eps=args.eps, budget=args.budget, n=args.n, seed=args.seed,
        out=Path(args.out) if args.out is not None else None, data=args.data, model=args.model, weights=args.weights,
        model_options=model_options(args), device=args.device, draws=args.draws, shard_size=args.shard_size,
        batch_size=args.batch_size, fresh=args.fresh, quiet=args.quiet or args.json, checks=args.checks, curve=args.curve,
        shard=args.shard, defend_at=args.defend_at,
    )
    # The log lines go to stderr, the card (--json) alone to stdout: `--json > card.json 2> run.log`
    # keeps both.
    with one_line_skip_warnings():
        outcome = evaluate_defense(cfg)
    if outcome.card is None:
        print(f"shard {args.shard}: {len(outcome.shard_units or [])} unit(s) in {args.out} ({outcome.ran} run, {outcome.reused} reused)")
        print(f"next, once all {args.shard.count} shards are done: prepdefense merge OUT {args.out} <the other shards' --out>; "
              "then this command without --shard and with --out OUT (checks, curve, card)")
    elif args.json:
        print_json(outcome.card)
    else:
        _print_text(outcome)
    return 0


def _ci(v) -> str:
    return "" if not v or v[0] is None else f" [{v[0]:.2f}, {v[1]:.2f}]"


def _print_text(outcome) -> None:
    card = outcome.card
    tm, ens, clean = card["threat_model"], card["ensemble"], card["clean"]
    print(f"evaluate {card['defense']['name']} on {card['model']['name']}: {tm['norm']} eps {tm['eps']:.4g}, budget {card['budget']['name']}, "
          f"{card['n']} images, seed {card['seed']}, {card['draws']} draw(s) per example")
    print(f"  clean accuracy (defended) {clean['robust_accuracy_expected']:.3f}{_ci(clean['robust_accuracy_expected_ci95'])}")
    print(f"  robust accuracy {ens['robust_accuracy_expected']:.3f}{_ci(ens['robust_accuracy_expected_ci95'])} expected, "
          f"{ens['robust_accuracy_worst']:.3f}{_ci(ens['robust_accuracy_worst_ci95'])} worst case")
    print("  per attack (ran on / broke / robust after, worst case):")
    for r in card["per_attack"]:
        extra = f" (skipped: {r['skipped']})" if r.get("skipped") else ""
        print(f"    {r['attack']:<10} {r['kind']:<13} {r['ran_on']:>4} / {r['broke']:>4} / {r['after']['robust_accuracy_worst']:.3f}{extra}")
    broken = {}
    for p in card["per_image"]:
        broken[p["broken_by"] or "robust"] = broken.get(p["broken_by"] or "robust", 0) + 1
    print("  images by what broke them: " + ", ".join(f"{k} {v}" for k, v in broken.items()))
    curve = card.get("curve") or []
    if curve:
        print("  accuracy vs eps (worst case): " + ", ".join(f"{p['eps']:.4g}: {p['robust_accuracy_worst']:.2f}" for p in curve))
    for w in card["flags"].get("warnings", []):
        print(f"  WARNING: {w}")
    if not card["flags"].get("warnings"):
        print("  checklist: no flag raised")
    if outcome.files:
        print(f"  card: {outcome.files['card']}; report: {outcome.files['report']}")
