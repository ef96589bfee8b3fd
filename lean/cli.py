"""What every command line of the project shares: one error type shown as one line, tracebacks
only with --verbose, progress on stderr."""

from __future__ import annotations

import argparse
import sys
import time


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library warnings")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run(main, argv=None, parser: argparse.ArgumentParser | None = None) -> int:
    """Call ``main(args)``; a LeanError (or a bad path the OS refused) becomes one line and exit 2."""
    args = parser.parse_args(argv)
    if not args.verbose:
        import warnings

        warnings.filterwarnings("ignore")
    try:
        main(args)
    except KeyboardInterrupt:
        print("error: interrupted; earlier outputs are untouched", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
        from lean.errors import LeanError

        user_error = isinstance(e, (LeanError, OSError))
        if args.verbose or not user_error:
            import traceback

            traceback.print_exc()
        if not user_error:
            print("error: internal error (a bug): please report it with the traceback above", file=sys.stderr)
            return 1
        msg = str(e) if isinstance(e, LeanError) else f"{e.strerror or e} {e.filename or ''}".strip()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
