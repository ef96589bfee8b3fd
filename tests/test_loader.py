"""The streaming calibration loader: worker processes, frames on the device, one-line errors."""

import shutil

import pytest
import torch

from helpers import SMALL
from lean.data import load_inputs
from lean.errors import LeanError
from lean.loader import Stream, default_workers, folder_set, nuscenes_set
from lean.nuscenes import plan_samples
from lean.scene import make_nuscenes_tree


def test_workers_give_what_the_folder_reader_gives(example_dir):
    _, img, depth = load_inputs(example_dir, SMALL)
    frames = list(Stream(folder_set([example_dir] * 3, SMALL), 5, "cpu", workers=2))
    assert len(frames) == 5  # cycles through the 3 items
    for frame in frames:
        got_img, got_depth = frame.inputs()
        assert torch.equal(got_img, img) and torch.equal(got_depth, depth)


def test_nuscenes_frames_through_workers(tmp_path, example_dir):
    tree = make_nuscenes_tree(tmp_path / "ns", example_dir, scenes=2, samples_per_scene=2, sweeps_between=1,
                              version="v1.0-test")
    plans = plan_samples(tree, "v1.0-test", "test", samples=4)
    stream = Stream(nuscenes_set(tree, plans, SMALL), 4, "cpu", workers=2)
    names = []
    for frame in stream:
        img, depth = frame.inputs()
        assert img.shape == (1, 2, 3, 64, 176) and img.dtype == torch.float32
        assert depth.shape == (1, 2, 1, 64, 176) and (depth > 0).sum() > 100
        names.append(frame.name)
    assert sorted(names) == sorted(p.token for p in plans)  # each once, in the sampler's order
    assert names == [p.token for p in plans]
    assert stream.waited >= 0.0


def test_a_broken_sample_is_one_line(tmp_path, example_dir):
    broken = tmp_path / "broken"
    shutil.copytree(example_dir, broken)
    (broken / "1-FRONT_RIGHT.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(LeanError, match=r"1-FRONT_RIGHT.jpg: cannot decode the image") as e:
        list(Stream(folder_set([example_dir, broken], SMALL), 2, "cpu", workers=1))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_counts():
    assert 0 <= default_workers() <= 16
    with pytest.raises(LeanError, match="no data"):
        Stream(folder_set([], SMALL), 1, "cpu")
    with pytest.raises(LeanError, match="--workers must be 0 or more"):
        Stream(folder_set(["x"], SMALL), 1, "cpu", workers=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_frames_arrive_pinned_and_on_the_gpu(example_dir):
    _, img, depth = load_inputs(example_dir, SMALL)
    for frame in Stream(folder_set([example_dir] * 2, SMALL), 2, "cuda", workers=1):
        got_img, got_depth = frame.inputs()
        assert got_img.is_cuda and torch.equal(got_img.cpu(), img) and torch.equal(got_depth.cpu(), depth)


@pytest.mark.parametrize("message,words", [
    ("DataLoader worker (pid 1234) is killed by signal: Killed. ", "(pid 1234) was killed by signal Killed, often the kernel's OOM"),
    ("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that ...", "/dev/shm"),
    ("DataLoader worker (pid(s) 12, 13) exited unexpectedly", "(pid 12, 13) was exited unexpectedly"),
    ("DataLoader worker (pid 5) exited unexpectedly with exit code 1. Details are lost", "with exit code 1"),
])
def test_a_dead_worker_is_one_line(message, words):
    from lean.loader import worker_deaths

    with pytest.raises(LeanError) as e, worker_deaths():
        raise RuntimeError(message)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="something else"), worker_deaths():
        raise RuntimeError("something else")
