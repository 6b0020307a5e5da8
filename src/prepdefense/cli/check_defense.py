"""``prepdefense check-defense NAME``: hold a defense (built-in, ``package.module:Class``, an
entry point or a ``+`` chain) to the defense contract and print one row per check
(:mod:`prepdefense.defenses.contract`; issue 12, item 2).

Exit status: 0 when every check holds, 1 when one fails (the row says why), 2 for a usage
error (an unknown name, a module that cannot be imported). ``--json`` prints the report as one
object instead of the table.
"""

from __future__ import annotations

from .. import defenses
from ..defenses.contract import check_contract
from .common import UsageError, check_at_least, check_defense, check_seed, print_json, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-defense",
        help="check a defense (yours or built-in) against the defense contract",
        description=(
            "Run the defense contract on NAME (a built-in defense, a user's package.module:Class, "
            "an entry point of the prepdefense.defenses group, or a + chain of them) and print a table: "
            "declared attributes, shape, range, dtype and device kept, input left unchanged, no global "
            "RNG, reproducible from a key / seed / generator, a batch equal to one image at a time, and "
            "the randomized and differentiable claims true, and two builds holding the same values (so a resumed "
            "run is the same defense). Exit 1 when a check fails."
        ),
    )
    p.add_argument("name", metavar="NAME", help="defense to check, e.g. my_pkg.blur:Blur or fd+my_pkg.blur:Blur")
    p.add_argument("--n", type=int, default=4, help="images to check on (default 4, at least 2)")
    p.add_argument("--size", type=int, default=64, help="side of the square test images (default 64, at least 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and draw keys (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    check_at_least("--n", args.n, 2)
    check_at_least("--size", args.size, 8)
    check_seed(args.seed)
    name = check_defense(args.name, flag="NAME")
    if name == "none":
        raise UsageError("NAME none is no defense; name one, e.g. fd or my_pkg.blur:Blur")
    device = resolve_device(args.device)
    defense = defenses.create(name).to(device)
    report = check_contract(defense, name=name, n=args.n, size=args.size, seed=args.seed, device=device,
                            rebuild=lambda: defenses.create(name))
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.table())
    return 0 if report.passed else 1
