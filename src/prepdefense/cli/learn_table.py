"""``prepdefense learn-table``: learn the defensive quantization table with Algorithm 2 from
C&W adversarial examples of the default model (paper Section 5.2; issue 4, item 7).

The images are drawn among those the model classifies correctly, disjoint from the
evaluation protocol sample (``--exclude-sample-seed``/``--exclude-n``) and from the images
``usability`` measures (``--exclude-usability-n``); the table is written
with the model, image ids, attack settings, seed and success rate beside it. Pass the file
to a defense with ``table=PATH``; the package's own table (``defenses/tables/learned.json``)
was made by this command.
"""

from __future__ import annotations

from .common import (
    MODEL_HELP,
    WEIGHTS_HELP,
    UsageError,
    add_model_options,
    build_model,
    check_at_least,
    check_data,
    check_model,
    check_model_options,
    check_number,
    check_out_file,
    check_seed,
    model_options,
    one_line_skip_warnings,
    print_json,
    progress,
    resolve_device,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "learn-table",
        help="learn the quantization table (Algorithm 2) from C&W adversarial examples",
        description=(
            "Attack N correctly classified images (disjoint from the evaluation protocol sample and from the "
            "images 'usability' measures) "
            "with targeted C&W L2 on the model, and learn the 8x8 quantization table of Algorithm 2 "
            "from the (clean, adversarial) pairs. The paper's C&W: 5 binary-search steps, 1000 "
            "iterations, lr 0.1 (slow on a CPU: about N x 5000 forward+backward passes). The table's metadata "
            "records the iterations that ran (C&W's abort early can end a binary-search step early)."
        ),
    )
    p.add_argument("--data", required=True, help="image folder (labels.csv or synset sub-folders); 'builtin' has only 4 "
                                                 "images, too few once the evaluation and usability images are kept out")
    p.add_argument("--out", required=True, help="JSON file to write the table and its metadata to")
    p.add_argument("--n", type=int, default=100, help="images to attack (default 100)")
    p.add_argument("--exclude-sample-seed", type=int, default=0, help="seed of the evaluation protocol sample and of the usability images kept out (default 0)")
    p.add_argument("--exclude-n", type=int, default=100, help="size of that evaluation sample; 0 disables the exclusion (default 100)")
    p.add_argument("--exclude-usability-n", type=int, default=200,
                   help="also keep out the images 'prepdefense usability --n N' measures clean accuracy on (same seed); "
                        "0 disables it (default 200, usability's default)")
    p.add_argument("--steps", type=int, default=1000, help="C&W iterations per binary-search step (default 1000)")
    p.add_argument("--binary-steps", "--binary-search-steps", dest="binary_steps", type=int, default=5,
                   help="C&W binary-search steps over c (default 5; 'attack --attack cw' calls it --binary-search-steps)")
    p.add_argument("--lr", type=float, default=0.1, help="C&W Adam learning rate (default 0.1, the paper's)")
    p.add_argument("--initial-const", type=float, default=1e-2, help="C&W starting c (default 0.01)")
    p.add_argument("--no-abort-early", dest="abort_early", action="store_false",
                   help="run every C&W iteration: without it an image whose loss stopped falling is frozen for the rest "
                        "of a binary-search step (C&W's abort early, checked every max(10, STEPS/10) iterations, the "
                        "first check against the loss at iteration 0, where the distance term is 0), which can end a "
                        "step at its first check")
    p.add_argument("--batch-size", type=int, default=8, help="images attacked together (default 8)")
    p.add_argument("--model", default="efficientnet-lite0", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    add_model_options(p)
    p.add_argument("--seed", type=int, default=1, help="seed drawing the images and targets (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the checkpoints of an unfinished earlier run (OUT.partial/) instead of resuming it")
    p.add_argument("--note", default="", help="free text stored in the table's metadata")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.learn_table import learn_table

    # Every flag is checked before the model loads and the (long) attack runs (issue 11, item 5).
    for name in ("n", "steps", "binary_steps", "batch_size"):
        check_at_least(f"--{name.replace('_', '-')}", getattr(args, name))
    check_at_least("--exclude-n", args.exclude_n, 0, hint=" (0 disables the exclusion)")
    check_at_least("--exclude-usability-n", args.exclude_usability_n, 0, hint=" (0 disables it)")
    check_number("--lr", args.lr, positive=True)
    check_number("--initial-const", args.initial_const, positive=True)
    check_seed(args.seed)
    check_seed(args.exclude_sample_seed, "--exclude-sample-seed")
    check_model(args.model, args.weights)
    check_model_options(args)
    check_out_file(args.out)
    listed = check_data(args.data)
    needed = args.n + max(args.exclude_n, args.exclude_usability_n)  # at least; the two samples may overlap
    if needed > listed:
        raise UsageError(
            f"--n {args.n} images to attack plus the {max(args.exclude_n, args.exclude_usability_n)} kept out "
            f"(--exclude-n {args.exclude_n}, --exclude-usability-n {args.exclude_usability_n}) need {needed}, "
            f"but --data {args.data} lists {listed}; lower --n, --exclude-n or --exclude-usability-n "
            f"(0 disables an exclusion), or give a larger folder"
        )
    device = resolve_device(args.device)
    model = build_model(args.model, args.weights, device, **model_options(args))

    bar = progress(range(args.n), total=args.n, desc="C&W", unit="img", enabled=not args.json)
    done = [0]

    def on_batch(n_done: int, total: int) -> None:
        bar.update(n_done - done[0])
        done[0] = n_done

    try:
        with one_line_skip_warnings():
            summary = learn_table(
                data=args.data, out=args.out, n=args.n, seed=args.seed,
                exclude_sample_seed=args.exclude_sample_seed, exclude_n=args.exclude_n,
                exclude_usability_n=args.exclude_usability_n, steps=args.steps, binary_steps=args.binary_steps, lr=args.lr,
                initial_const=args.initial_const, abort_early=args.abort_early, batch_size=args.batch_size,
                model_name=args.model,
                model=model, device=device, on_batch=on_batch, note=args.note, fresh=args.fresh,
            )
    finally:
        bar.close()
    if args.json:
        out = {k: v for k, v in summary.items() if k != "metadata"}
        out["image_ids"] = summary["metadata"]["image_ids"]
        out["attack_settings"] = summary["metadata"]["attack_settings"]
        out["iterations_run"] = summary["metadata"].get("iterations_run")
        out["attack_seconds"] = summary["metadata"].get("attack_seconds")
        print_json(out)
        return 0
    print(f"learned table written to {summary['out']}")
    print(f"C&W success {summary['n_successful']}/{summary['n']} ({summary['success_rate']:.0%}), "
          f"mean normalised L2 {summary['mean_l2_rms']:.4f}, {summary['seconds']:.0f} s in this run")
    total = (summary["metadata"].get("attack_seconds") or {}).get("total")
    if total is not None and summary["metadata"].get("resumed_images"):
        print(f"C&W time over every batch, resumed ones included: {total:.0f} s")
    runs = summary["metadata"].get("iterations_run") or {}
    if runs.get("mean_per_binary_step") is not None:
        print(f"C&W iterations run per binary-search step: {runs['mean_per_binary_step']:g} on average of the "
              f"{runs['budget_per_binary_step']} allowed" + ("" if summary["metadata"]["attack_settings"].get("abort_early") is False
                                                            else " (abort early; --no-abort-early runs them all)"))
    for row in summary["table"]:
        print(" ".join(f"{v:6.1f}" for v in row))
    return 0
