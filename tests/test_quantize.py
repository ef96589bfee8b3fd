"""The quantize stage as a library call: data folders, refusals before any work, what is saved."""

import shutil

import pytest

from lean.checkpoint import read_checkpoint
from lean.errors import LeanError
from lean.quantize import PTQOptions, calibration_folders, run_ptq

from helpers import one_line


def test_calibration_folders(tmp_path, example_dir):
    assert calibration_folders(example_dir) == [example_dir]
    for name in ("b", "a"):
        shutil.copytree(example_dir, tmp_path / "many" / name)
    (tmp_path / "many" / "notes").mkdir()
    assert calibration_folders(tmp_path / "many") == [tmp_path / "many" / "a", tmp_path / "many" / "b"]
    for bad, word in ((tmp_path / "nope", "not a folder"), (tmp_path / "many" / "notes", "no samples")):
        with pytest.raises(LeanError) as e:
            calibration_folders(bad)
        assert word in one_line(e)


def test_refusals_come_before_any_work(tmp_path, small_ptq_ckpt, example_dir):
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=tmp_path / "missing.pth", out=tmp_path / "o.pth", data=example_dir, method="minmax"))
    assert "minmax" in one_line(e)
    with pytest.raises(LeanError) as e:
        run_ptq(PTQOptions(ckpt=small_ptq_ckpt, out=tmp_path / "o.pth", data=example_dir, progress=False))
    assert "already quantized" in one_line(e)
    assert not (tmp_path / "o.pth").exists()


def test_ptq_checkpoint_holds_amax_config_and_provenance(small_ptq_ckpt, small_float_ckpt):
    ckpt = read_checkpoint(small_ptq_ckpt)
    assert (ckpt.kind, ckpt.source, ckpt.config.image_size) == ("ptq", "lean-ptq", (64, 176))
    assert sum(k.endswith("._amax") for k in ckpt.state_dict) > 100
    cal = ckpt.meta["calibration"]
    assert (cal["method"], cal["batches"], cal["samples"]) == ("max", 1, 1)
    assert ckpt.meta["source"]["sha256"] == read_checkpoint(small_float_ckpt).sha256
    assert "nvidia-modelopt" in ckpt.meta["versions"]
