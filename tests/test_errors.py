from lean.errors import LeanError, first_line


def test_first_line_of_an_exception():
    assert first_line(ValueError("bad thing\nmore detail")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"
    assert len(first_line(RuntimeError("x" * 500))) == 200
    assert issubclass(LeanError, Exception)
