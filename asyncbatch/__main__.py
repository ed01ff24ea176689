"""The ``asyncbatch`` command (also ``python -m asyncbatch``).

Commands:

    asyncbatch demo [options]    live batched-vs-unbatched demo (see --help)
    asyncbatch --version         the installed version
    asyncbatch                   this help

Every duration it takes is in seconds, as in the API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, _demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncbatch",
        description="asyncio-native micro-batching: tools and demo.",
        epilog="Durations are in seconds everywhere. Run 'asyncbatch demo --help' for the "
        "demo's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo}")
    demo = commands.add_parser(
        "demo", help="simulate a slow backend and compare batched with unbatched calls"
    )
    _demo.build_parser(demo)
    demo.set_defaults(run=_demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit status.

    With no command it prints the help and returns 0; ``--version`` prints
    the version and exits (``SystemExit(0)``), as argparse does for
    ``--help``. Bad options exit with status 2 and a message on stderr.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
