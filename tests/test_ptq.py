"""``python -m lean.ptq`` as a user runs it."""

from helpers import python


def ptq(*args):
    return python("-m", "lean.ptq", *args)


def test_calibrates_and_writes(tmp_path, small_float_ckpt, example_dir):
    out = tmp_path / "ptq.pth"
    r = ptq("--ckpt", small_float_ckpt, "--out", out, "--data", example_dir, "--method", "max", "--cameras", "2")
    assert r.returncode == 0, r.stderr
    assert "calibrating (max)" in r.stderr and f"wrote {out}" in r.stderr and out.stat().st_size > 0
    assert r.stdout == ""


def test_repeated_samples_are_counted_apart_and_few_are_warned(tmp_path, small_float_ckpt, example_dir):
    r = ptq("--ckpt", small_float_ckpt, "--out", tmp_path / "ptq.pth", "--data", example_dir, "--method", "max",
            "--cameras", "2", "--batches", "3")
    assert r.returncode == 0, r.stderr
    assert f"calibrating on 3 batches: 1 distinct samples of {example_dir}, each seen 3 times" in r.stderr
    assert "warning: only 1 distinct calibration samples: the scales fit this one" in r.stderr


def test_missing_checkpoint_is_one_line(tmp_path, example_dir):
    r = ptq("--ckpt", tmp_path / "nope.pth", "--out", tmp_path / "o.pth", "--data", example_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint {tmp_path / 'nope.pth'} does not exist: check the path, or run `make model` for the demo ones"]


def test_nuscenes_and_folders_of_samples_calibrate_and_export(tmp_path, small_float_ckpt, example_dir):
    """PTQ from a nuScenes tree and from a folder of example-data folders; both checkpoints export."""
    import shutil

    from lean.scene import make_nuscenes_tree

    # scene-0103 is mini_val's, scene-0104 no split's: 3 of the 6 samples are mini_val
    tree = make_nuscenes_tree(tmp_path / "ns", example_dir, scenes=2, samples_per_scene=3, sweeps_between=1,
                              version="v1.0-mini", start_scene=103)
    samples = tmp_path / "samples"
    for name in ("a", "b"):
        shutil.copytree(example_dir, samples / name)
    runs = {"nuscenes": ("--nuscenes", tree, "--version", "v1.0-mini", "--split", "mini_val", "--samples", "5"),
            "folders": ("--data", samples)}
    for name, source in runs.items():
        out = tmp_path / f"{name}.pth"
        r = ptq("--ckpt", small_float_ckpt, "--out", out, *source, "--method", "max", "--cameras", "2",
                "--workers", "2")
        assert r.returncode == 0, r.stderr
        assert "loader processes" in r.stderr and "samples/s" in r.stderr
        if name == "nuscenes":
            assert "split mini_val holds 3 samples; calibrating on all of them" in r.stderr
        r = python("export_camera.py", "--ckpt", out, "--out", tmp_path / f"onnx-{name}", "--data", example_dir,
                   "--cameras", "2")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / f"onnx-{name}" / "camera.backbone.onnx").exists()
    from lean.checkpoint import read_checkpoint

    meta = read_checkpoint(tmp_path / "nuscenes.pth").meta["calibration"]
    assert meta["nuscenes"]["split"] == "mini_val" and len(meta["nuscenes"]["tokens"]) == 3
    assert meta["samples"] == 3 and meta["batches"] == 3


def test_nuscenes_errors_are_one_line(tmp_path, small_float_ckpt, example_dir):
    cases = [
        (("--nuscenes", tmp_path / "none"), "is not a folder"),
        (("--nuscenes", tmp_path, "--data", example_dir), "pass --data or --nuscenes, not both"),
        (("--nuscenes", tmp_path), "no such nuScenes table"),
        (("--nuscenes", tmp_path, "--samples", "0"), "--samples must be at least 1"),
        (("--data", example_dir, "--workers", "-1"), "--workers must be at least 0"),
    ]
    for args, message in cases:
        r = ptq("--ckpt", small_float_ckpt, "--out", tmp_path / "o.pth", *args)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
