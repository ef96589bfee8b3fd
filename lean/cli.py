"""What every command line of the project shares.

Each entry point (``export_camera.py``, ``python -m lean.ptq``, ``python -m lean.demo``,
``python -m bench``) is the same three pieces: ``parser()`` built from the argument groups
below, ``main(args)`` that turns the arguments into the library's options dataclass and calls
the library, and ``sys.exit(run(main, parser()))``. The library never sees argparse.

``run`` owns the user-facing behaviour: a ``LeanError`` (or a path the OS refused) is one line
on stderr and exit 2, any other exception is a bug with its traceback and exit 1, progress and
warnings of the ``lean`` logger go to stderr, tracebacks and third-party warnings only with
``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from lean.config import BACKBONES, DEFAULT_DATA, DEVICES, parse_bound, parse_image_size
from lean.errors import LeanError
from lean.log import logger


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line with a hint (exit 2), not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def new_parser(doc: str | None, prog: str) -> argparse.ArgumentParser:
    """``prog``: the command as the user types it (``python -m lean.ptq``), for usage lines and hints."""
    p = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show tracebacks and third-party library warnings")
    return p


def add_device(p) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where PyTorch runs; auto takes a GPU when there is one (default auto)")


def add_data(p, help: str) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"{help} (default {DEFAULT_DATA})")


def add_backbone(p, default: str | None = None) -> None:
    p.add_argument("--backbone", choices=BACKBONES, default=default,
                   help=f"camera backbone (default {default or 'from the checkpoint'})")


def add_cameras(p) -> None:
    p.add_argument("--cameras", type=int, default=None, help="cameras per sample (default: the checkpoint's, 6)")


def add_rig(p) -> None:
    """The rig of an export: everything defaults to what the checkpoint holds."""
    rig = p.add_argument_group("rig (default: from the checkpoint)")
    add_backbone(rig)
    rig.add_argument("--image-size", default=None, help="HxW network input, e.g. 256x704")
    add_cameras(rig)
    rig.add_argument("--xbound", default=None, help="BEV x range LOW,HIGH,STEP in metres (default -54,54,0.3)")
    rig.add_argument("--ybound", default=None, help="BEV y range LOW,HIGH,STEP in metres (default -54,54,0.3)")
    rig.add_argument("--rebuild-frustum", action="store_true",
                     help="derive the frustum and BEV grid buffers for --image-size/--xbound/--ybound")


def rig_options(args) -> dict:
    """``add_rig``'s arguments, parsed, as keyword arguments of an options dataclass."""
    return {
        "backbone": args.backbone,
        "image_size": parse_image_size(args.image_size) if args.image_size else None,
        "cameras": args.cameras,
        "xbound": parse_bound(args.xbound, "xbound") if args.xbound else None,
        "ybound": parse_bound(args.ybound, "ybound") if args.ybound else None,
        "rebuild_frustum": args.rebuild_frustum,
    }


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, '%H:%M:%S')} {prefix}{one_line(record.getMessage())}"


@contextmanager
def _log_to_stderr():
    """The ``lean`` logger's INFO and above on stderr, for the length of one command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed here once, not again by a root handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


MAX_MESSAGE = 1000  # characters of one error line; the rest of an OS error listing a whole tree is cut


def one_line(text: str) -> str:
    """``text`` as one printable line: newlines, terminal escapes and other control characters
    (which could forge a second ``error:`` line or hide text) are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _joined_bounds(argv: list[str]) -> list[str]:
    """``--xbound -54,54,0.3`` as ``--xbound=-54,54,0.3``: argparse takes a value that starts with
    a dash for an option, and every lower bound of a centred grid does."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--xbound", "--ybound") and arg.startswith("-"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up exactly as Ctrl-C does


def run(main, parser: argparse.ArgumentParser, argv=None) -> int:
    """Call ``main(args)``; a LeanError (or a bad path the OS refused) becomes one line and exit 2."""
    args = parser.parse_args(_joined_bounds(sys.argv[1:] if argv is None else list(argv)))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with _log_to_stderr():
            return _run(main, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def console(main, parser: argparse.ArgumentParser) -> None:
    """A console script's entry point (``pip install .``): ``run``, with usage lines and hints
    naming the command as installed."""
    parser.prog = Path(sys.argv[0]).name
    sys.exit(run(main, parser))


def _run(main, args) -> int:
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                warnings.simplefilter("ignore")  # third-party noise; our own warnings go through the logger
            code = main(args)
    except KeyboardInterrupt:
        print("error: interrupted; earlier outputs are untouched", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: close other programs, or use fewer --cameras or a smaller --image-size",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
        user_error = isinstance(e, (LeanError, OSError))
        if args.verbose or not user_error:
            traceback.print_exc()
        if not user_error:
            print("error: internal error (a bug): please report it with the traceback above", file=sys.stderr)
            return 1
        msg = str(e) if isinstance(e, LeanError) else f"{e.strerror or e} {e.filename or ''}".strip()
        msg = one_line(msg)
        print(f"error: {msg if len(msg) <= MAX_MESSAGE else msg[:MAX_MESSAGE] + '...'}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0  # a main may return its own exit code (the lint: 1 on errors)
