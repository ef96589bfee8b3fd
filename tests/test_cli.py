"""The shared command-line behaviour: one-line errors, exit codes, the logger's lines on stderr."""

import warnings

import pytest

from lean import cli
from lean.errors import LeanError
from lean.log import logger


def parser():
    p = cli.new_parser("test")
    cli.add_rig(p)
    cli.add_device(p)
    return p


def run(main, *argv):
    return cli.run(main, parser(), list(argv))


def test_user_error_is_one_line_and_exit_2(capsys):
    def main(args):
        raise LeanError("the checkpoint is wrong: pass another")

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err == "error: the checkpoint is wrong: pass another\n"
    assert run(main, "--verbose") == 2 and "Traceback" in capsys.readouterr().err


def test_os_error_is_a_user_error(capsys):
    def main(args):
        open("/nonexistent/folder/file")

    assert run(main) == 2
    assert capsys.readouterr().err.startswith("error: No such file or directory /nonexistent")


def test_a_bug_shows_its_traceback_and_exit_1(capsys):
    def main(args):
        raise ZeroDivisionError("boom")

    assert run(main) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_interrupt_is_exit_130(capsys):
    def main(args):
        raise KeyboardInterrupt

    assert run(main) == 130 and "untouched" in capsys.readouterr().err


def test_our_warnings_show_without_verbose_third_party_ones_only_with(capsys, recwarn):
    def main(args):
        logger.info("progress line")
        logger.warning("calibrating without CUDA graphs")
        warnings.warn("some library's notice", FutureWarning)

    assert run(main) == 0
    err = capsys.readouterr().err
    assert "progress line" in err and "warning: calibrating without CUDA graphs" in err
    assert not [w for w in recwarn if "library's notice" in str(w.message)]
    assert run(main, "--verbose") == 0
    assert [w for w in recwarn if "library's notice" in str(w.message)]
    assert not [h for h in logger.handlers if isinstance(h.formatter, cli._Formatter)]  # run() cleans up
    assert logger.propagate


def test_rig_options_are_parsed():
    args = parser().parse_args(["--image-size", "128x352", "--xbound=-30,30,0.2", "--rebuild-frustum"])
    opts = cli.rig_options(args)
    assert opts["image_size"] == (128, 352) and opts["xbound"] == (-30.0, 30.0, 0.2) and opts["ybound"] is None
    assert opts["rebuild_frustum"] and opts["backbone"] is None
    with pytest.raises(LeanError):
        cli.rig_options(parser().parse_args(["--image-size", "huge"]))
