"""Entry point of the ``prepdefense`` command.

Each sub-command lives in its own module of this package, exposing
``add_parser(subparsers)`` (which registers the sub-command and sets ``func``) and the
function it runs. Errors the user can fix (a missing folder, a bad name) are raised as
:class:`~prepdefense.errors.PrepDefenseError` and printed as one line with exit status 2, never a traceback;
argparse's own errors (a non-number, a missing required flag) are one line too (:class:`_Parser`).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from .. import __version__
from ..errors import PrepDefenseError
from . import attack, check_defense, demo, evaluate, judge, learn_table, merge, predict, randomness, reproduce, usability

#: Sub-commands in the order ``--help`` lists them.
_SUBCOMMANDS = (predict, demo, randomness, attack, evaluate, judge, usability, learn_table, reproduce, merge, check_defense)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``PROG: error: MESSAGE (see PROG --help)``, exit 2
    (argparse's default prints the whole usage block before the message). Flags are matched
    whole: an abbreviation (``--dat`` for ``--data``) is an unknown flag, not a guess."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prepdefense",
        description=(
            "Input-preprocessing defenses against adversarial examples, and the adaptive "
            "attacks (BPDA, EOT, learned BPDA, projected EOT-PGD) that test them. "
            "Images are read from a folder with labels.csv, an ImageNet-style folder of "
            "synset sub-folders, or the built-in scikit-image photos."
        ),
    )
    parser.add_argument("--version", action="version", version=f"prepdefense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _unknown_by_owner(argv: List[str], command: Optional[str], unknown: List[str]) -> List[Tuple[str, List[str]]]:
    """The unknown arguments grouped by whose help lists the valid ones: those before the
    sub-command's name belong to ``prepdefense`` itself, the others to the sub-command."""
    if not command or command not in argv:
        return [("prepdefense", unknown)]
    at, before, after, pos = argv.index(command), [], [], 0
    for arg in unknown:  # argparse keeps them in the order given
        pos = argv.index(arg, pos)
        (before if pos < at else after).append(arg)
        pos += 1
    return [(owner, flags) for owner, flags in (("prepdefense", before), (f"prepdefense {command}", after)) if flags]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        for command, flags in _unknown_by_owner(argv, getattr(args, "command", None), unknown):
            print(f"{command}: error: unrecognized arguments: {' '.join(flags)} (see '{command} --help')", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        names = ", ".join(m.__name__.rsplit(".", 1)[-1].replace("_", "-") for m in _SUBCOMMANDS)
        print(f"prepdefense: error: no command given; choose one of {names} (see 'prepdefense --help')",
              file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except PrepDefenseError as e:
        print(f"prepdefense {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
