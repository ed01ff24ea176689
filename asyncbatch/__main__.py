"""The ``asyncbatch`` command (also ``python -m asyncbatch``).

Commands:

    asyncbatch demo [options]    live batched-vs-unbatched demo (see --help)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncbatch", description="asyncio-native micro-batching: tools and demo."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="simulate a slow backend and compare batched with unbatched calls"
    )
    _demo.build_parser(demo)
    demo.set_defaults(run=_demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
