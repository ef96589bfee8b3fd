import numpy as np
import pytest

from lean.errors import LeanError
from lean.tensorfile import CODE_TO_DTYPE, MAGIC, read_tensor, write_tensor

SHAPES = [(), (7,), (0, 5), (3, 5), (1, 6, 4, 4)]


def _sample(dtype, shape):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    values = np.linspace(float(info.min) / 2, float(info.max) / 2, int(np.prod(shape)))
    return values.astype(dtype).reshape(shape)


def assert_one_line_naming(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", sorted(CODE_TO_DTYPE))
def test_round_trip(tmp_path, code, shape):
    array = _sample(CODE_TO_DTYPE[code], shape)
    path = tmp_path / "a.tensor"
    write_tensor(path, array)
    back = read_tensor(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # the reader hands back a writable array
    header = np.fromfile(path, "<i4", 3 + len(shape))
    assert list(header) == [MAGIC, len(shape), code, *shape]
    assert path.stat().st_size == 4 * (3 + len(shape)) + array.nbytes


def test_big_endian_input_is_written_little_endian(tmp_path):
    path = tmp_path / "a.tensor"
    write_tensor(path, np.arange(6, dtype=">f4").reshape(2, 3))
    np.testing.assert_array_equal(read_tensor(path), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.tensor"
    write_tensor(path, np.zeros((2, 2), np.float32))
    write_tensor(path, np.ones((3,), np.int64))
    np.testing.assert_array_equal(read_tensor(path), np.ones(3, np.int64))
    assert [p.name for p in tmp_path.iterdir()] == ["a.tensor"]


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(LeanError) as e:
        write_tensor(tmp_path / "a.tensor", np.zeros(3, np.float64))
    assert_one_line_naming(e, tmp_path / "a.tensor")
    assert not (tmp_path / "a.tensor").exists()


def test_write_creates_missing_folder(tmp_path):
    path = tmp_path / "nope" / "a.tensor"
    write_tensor(path, np.zeros(3, np.float32))
    np.testing.assert_array_equal(read_tensor(path), np.zeros(3, np.float32))


def test_write_into_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    path = blocker / "a.tensor"  # a folder that cannot exist: its parent is a file
    with pytest.raises(LeanError) as e:
        write_tensor(path, np.zeros(3, np.float32))
    assert_one_line_naming(e, path)


def _valid_bytes():
    return np.array([MAGIC, 2, 3, 2, 3], "<i4").tobytes() + np.arange(6, dtype="<f4").tobytes()


BAD_FILES = {
    "wrong magic": lambda b: np.array([0x12345678], "<i4").tobytes() + b[4:],
    "unknown dtype": lambda b: b[:8] + np.array([9], "<i4").tobytes() + b[12:],
    "negative ndim": lambda b: b[:4] + np.array([-1], "<i4").tobytes() + b[8:],
    "huge ndim": lambda b: b[:4] + np.array([1000], "<i4").tobytes() + b[8:],
    "negative dim": lambda b: b[:12] + np.array([-2], "<i4").tobytes() + b[16:],
    "truncated data": lambda b: b[:-3],
    "truncated header": lambda b: b[:14],
    "shorter than header": lambda b: b[:5],
    "empty": lambda b: b"",
    "trailing bytes": lambda b: b + b"\0\0\0\0",
}


@pytest.mark.parametrize("damage", BAD_FILES)
def test_bad_file(tmp_path, damage):
    path = tmp_path / "bad.tensor"
    path.write_bytes(BAD_FILES[damage](_valid_bytes()))
    with pytest.raises(LeanError) as e:
        read_tensor(path)
    assert_one_line_naming(e, path)


def test_valid_bytes_read(tmp_path):
    (tmp_path / "ok.tensor").write_bytes(_valid_bytes())
    np.testing.assert_array_equal(read_tensor(tmp_path / "ok.tensor"), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_missing_file(tmp_path):
    path = tmp_path / "missing.tensor"
    with pytest.raises(LeanError) as e:
        read_tensor(path)
    assert_one_line_naming(e, path)


# -- property-based fuzzing: any bytes end in an array or a one-line LeanError -------------------------
import signal  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def tensor_files(draw):
    """Headers that are plausible (magic, small ndim, known codes) about as often as garbage."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    ndim = draw(st.integers(-2, 20))
    dims = draw(st.lists(st.integers(-5, 2**31 - 1) | st.integers(0, 6), min_size=max(0, ndim), max_size=max(0, ndim)))
    header = np.array([MAGIC if draw(st.booleans()) else draw(st.integers(0, 2**31 - 1)), ndim,
                       draw(st.integers(-1, 10)), *dims], "<i8").astype("<i4").tobytes()
    return header + draw(st.binary(max_size=300))


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=tensor_files())
def test_fuzzed_tensor_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.tensor"
    path.write_bytes(data)
    signal.alarm(20)  # a hang fails the test (SIGALRM's default action ends the run)
    try:
        array = read_tensor(path)
        assert array.nbytes <= len(data)
    except LeanError as e:
        assert str(e) and "\n" not in str(e)
    finally:
        signal.alarm(0)
