import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lean.data import (
    CAMERA_NAMES,
    MEAN,
    STD,
    image_aug,
    image_file_names,
    load_example,
    preprocess_image,
    sample_folders,
    write_example,
)
from lean.errors import LeanError
from lean.scene import make_rig
from lean.tensorfile import read_tensor, write_tensor

from helpers import one_line

STANDARD_AUG = np.array([[0.48, 0, 0, -32], [0, 0.48, 0, -176], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
BLOCK = 50  # pixels per side of the colour blocks


def block_image(w=1600, h=900):
    """Blocks of BLOCK x BLOCK pixels, each an RGB colour that encodes its block row and column."""
    ys, xs = np.mgrid[0:h, 0:w] // BLOCK
    return np.stack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 5 % 256], -1).astype(np.uint8)


def normalized(levels):
    return (np.asarray(levels, np.float32) / 255 - MEAN) / STD


def source_coords(out_size, aug, in_size, resized):
    """Continuous input coordinates of the output pixel centres, for a resize + crop."""
    h, w = out_size
    xs = (np.arange(w) + 0.5 - aug[0, 3]) * in_size[0] / resized[0]
    ys = (np.arange(h) + 0.5 - aug[1, 3]) * in_size[1] / resized[1]
    return xs, ys


@pytest.mark.parametrize("image_size", [(256, 704), (512, 1408), (128, 352), (256, 640)])
def test_crop_and_resize_on_blocks(image_size):
    img = block_image()
    tensor, aug = preprocess_image(Image.fromarray(img), image_size)
    h, w = image_size
    assert tensor.shape == (3, h, w) and tensor.dtype == torch.float32
    resized, _, _ = image_aug((1600, 900), image_size)
    xs, ys = source_coords(image_size, aug, (1600, 900), resized)
    # Pixels whose source lies well inside a block see only that block's colour, whatever
    # the filter width; a crop or scale off by one output pixel moves some of them across.
    support = 1600 / resized[0] + 1
    inner_x = np.abs((xs + BLOCK / 2) % BLOCK - BLOCK / 2) > support
    inner_y = np.abs((ys + BLOCK / 2) % BLOCK - BLOCK / 2) > support
    assert inner_x.mean() > 0.5 and inner_y.mean() > 0.5
    expected = normalized(img[ys.astype(int)][:, xs.astype(int)])
    got = tensor.permute(1, 2, 0).numpy()
    mask = inner_y[:, None] & inner_x[None, :]
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-6)


def test_standard_aug_matrix():
    resized, crop, aug = image_aug((1600, 900))
    assert resized == (768, 432) and crop == (32, 176)
    np.testing.assert_array_equal(aug, STANDARD_AUG)
    _, aug2 = preprocess_image(Image.new("RGB", (1600, 900)))
    np.testing.assert_array_equal(aug2, STANDARD_AUG)


def test_ramps_and_normalization():
    # R ramps by 3 levels per input pixel along x, G along y, B is constant: bilinear
    # resampling of a linear ramp gives the ramp's value at the output pixel's source point
    # (nearest-neighbour would be off by up to 1.5 levels).
    ys, xs = np.mgrid[0:900, 0:1600]
    ramp = np.stack([np.clip(xs - 700, 0, 85) * 3, np.clip(ys - 500, 0, 85) * 3, np.full_like(xs, 77)], -1)
    tensor, _ = preprocess_image(Image.fromarray(ramp.astype(np.uint8)))
    got = tensor.numpy()
    sx, sy = source_coords((256, 704), STANDARD_AUG, (1600, 900), (768, 432))
    cols = np.flatnonzero((sx > 704) & (sx < 782))
    rows = np.flatnonzero((sy > 504) & (sy < 582))
    assert len(cols) > 30 and len(rows) > 30
    red = (got[0][:, cols] * STD[0] + MEAN[0]) * 255
    np.testing.assert_allclose(red, np.broadcast_to(3 * (sx[cols] - 700.5), red.shape), atol=0.51)
    green = (got[1][rows] * STD[1] + MEAN[1]) * 255
    np.testing.assert_allclose(green, np.broadcast_to(3 * (sy[rows] - 500.5)[:, None], green.shape), atol=0.51)
    np.testing.assert_allclose(got[2], (77 / 255 - 0.406) / 0.225, atol=1e-6)


def test_constant_image_normalization():
    tensor, _ = preprocess_image(Image.new("RGB", (1600, 900), (255, 0, 128)))
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(tensor.amax((1, 2)), expected, atol=1e-6)
    np.testing.assert_allclose(tensor.amin((1, 2)), expected, atol=1e-6)


def test_other_input_size_scales_from_actual_size():
    _, aug = preprocess_image(Image.new("RGB", (1920, 1080)))
    np.testing.assert_allclose(aug[:2, 3], [-(922 - 704) // 2, -(518 - 256)])


@pytest.mark.parametrize("size,image_size", [((1600, 900), (512, 704)), ((800, 450), (256, 704))])
def test_crop_that_does_not_fit(size, image_size):
    with pytest.raises(LeanError) as e:
        preprocess_image(Image.new("RGB", size), image_size)
    assert "\n" not in str(e.value)


def test_image_file_names():
    assert image_file_names(6) == [f"{i}-{n}.jpg" for i, n in enumerate(CAMERA_NAMES)]
    assert image_file_names(8)[6:] == ["6-CAMERA_6.jpg", "7-CAMERA_7.jpg"]


def write_folder(folder, n=6):
    rig = make_rig(n)
    images = [np.full((900, 1600, 3), 30 * i, np.uint8) for i in range(n)]
    points = np.arange(50, dtype=np.float32).reshape(10, 5)
    return write_example(folder, images, *rig, points), rig


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    write_folder(folder)
    return folder


@pytest.fixture
def folder(template, tmp_path):
    return shutil.copytree(template, tmp_path / "example-data")


def test_write_and_load(tmp_path):
    files, rig = write_folder(tmp_path)
    assert sorted(p.name for p in files) == sorted(
        image_file_names(6) + [f"{n}.tensor" for n in ("camera2lidar", "camera_intrinsics", "lidar2image",
                                                      "img_aug_matrix", "points")])
    assert read_tensor(tmp_path / "points.tensor").dtype == np.float16
    assert read_tensor(tmp_path / "lidar2image.tensor").dtype == np.float32
    sample = load_example(tmp_path)
    assert sample.img.shape == (1, 6, 3, 256, 704) and sample.img.dtype == torch.float32
    assert sample.points.shape == (10, 5) and sample.points.dtype == torch.float32
    for name in ("camera2lidar", "camera_intrinsics", "lidar2image", "img_aug_matrix"):
        m = getattr(sample, name)
        assert m.shape == (1, 6, 4, 4) and m.dtype == torch.float32
        np.testing.assert_array_equal(m.numpy(), getattr(rig, name))
    np.testing.assert_array_equal(sample.img_aug_matrix.numpy(), read_tensor(tmp_path / "img_aug_matrix.tensor"))
    # Constant images survive JPEG exactly, so each camera's normalized value is known.
    for i in range(6):
        np.testing.assert_allclose(sample.img[0, i, :, 100, 100], normalized([30 * i] * 3), atol=1e-6)
    assert sample.image_size == (256, 704) and sample.folder == tmp_path


def test_load_other_image_size_and_fewer_cameras(folder):
    sample = load_example(folder, image_size=(512, 1408), cameras=4)
    assert sample.img.shape == (1, 4, 3, 512, 1408)
    assert sample.lidar2image.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(sample.img_aug_matrix[0, 0].numpy(), np.diag([0.96, 0.96, 1, 1]) +
                               np.array([[0, 0, 0, -64], [0, 0, 0, -352], [0, 0, 0, 0], [0, 0, 0, 0]]), atol=1e-6)


@pytest.mark.parametrize("n", [5, 8])
def test_other_camera_counts(tmp_path, n):
    write_folder(tmp_path, n)
    (tmp_path / "0-FRONT.jpg").rename(tmp_path / "0-CAM_FRONT.jpg")  # found by its index prefix
    sample = load_example(tmp_path)
    assert sample.img.shape == (1, n, 3, 256, 704)
    assert sample.camera2lidar.shape == (1, n, 4, 4)


def _damage(folder, how):
    if how == "missing folder":
        shutil.rmtree(folder)
        return folder
    name, kind = how.split(":")
    path = folder / name
    if kind == "missing":
        path.unlink()
    elif kind == "magic":
        path.write_bytes(b"\0\0\0\0" + path.read_bytes()[4:])
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif kind == "garbage":
        path.write_bytes(b"this is not a jpeg")
    elif kind == "jpeg-truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "cameras5":
        write_tensor(path, read_tensor(path)[:, :5])
    elif kind == "no-batch":
        write_tensor(path, read_tensor(path)[0])
    elif kind == "4-columns":
        write_tensor(path, read_tensor(path)[:, :4])
    elif kind == "int":
        write_tensor(path, read_tensor(path).astype(np.int32))
    elif kind == "duplicate":
        shutil.copy(path, folder / "0-ANOTHER.jpg")
    return path


BAD_FOLDERS = [
    "missing folder",
    "camera2lidar.tensor:missing",
    "camera_intrinsics.tensor:missing",
    "lidar2image.tensor:missing",
    "img_aug_matrix.tensor:missing",
    "points.tensor:missing",
    "lidar2image.tensor:magic",
    "points.tensor:magic",
    "camera2lidar.tensor:truncated",
    "points.tensor:truncated",
    "camera_intrinsics.tensor:cameras5",
    "img_aug_matrix.tensor:no-batch",
    "points.tensor:4-columns",
    "lidar2image.tensor:int",
    "3-BACK.jpg:garbage",
    "2-FRONT_LEFT.jpg:jpeg-truncated",
    "0-FRONT.jpg:duplicate",
]


@pytest.mark.parametrize("how", BAD_FOLDERS)
def test_bad_folder(folder, how):
    culprit = _damage(folder, how)
    with pytest.raises(LeanError) as e:
        load_example(folder)
    message = str(e.value)
    assert "\n" not in message
    # Named by its path, or by folder and file name where the fault lies between files.
    assert str(culprit) in message or (str(folder) in message and culprit.name in message)


def test_missing_image_names_the_camera(folder):
    (folder / "5-BACK_RIGHT.jpg").unlink()
    with pytest.raises(LeanError, match=r"5-\*\.jpg") as e:
        load_example(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_too_many_cameras(folder):
    with pytest.raises(LeanError, match="6") as e:
        load_example(folder, cameras=7)
    assert "\n" not in str(e.value)


def test_write_example_checks_matrix_count(tmp_path):
    rig = make_rig(6)
    with pytest.raises(LeanError):
        write_example(tmp_path, [np.zeros((900, 1600, 3), np.uint8)] * 5, *rig, np.zeros((3, 5)))


# -- calibration frames and the nuScenes example writer ------------------------------------------


def test_frame_equals_the_runtime_preprocessing(example_dir):
    from helpers import SMALL
    from lean.data import load_inputs
    from lean.frames import folder_frame

    frame = folder_frame(example_dir, SMALL)
    assert frame.img.dtype == np.uint8 and frame.depth_index.dtype == np.int64
    img, depth = frame.to("cpu").inputs()
    _, want_img, want_depth = load_inputs(example_dir, SMALL)
    assert torch.equal(img, want_img) and torch.equal(depth, want_depth)


def test_nuscenes_sample_as_an_example_folder(tmp_path, example_dir):
    """``python -m lean.data nuscenes`` writes a folder the runtime layout reader takes, whose
    images are the original JPEGs and whose frame equals the loader's frame of that sample."""
    from helpers import SMALL, python
    from lean.frames import folder_frame, nuscenes_frame
    from lean.nuscenes import Tables
    from lean.scene import make_nuscenes_tree

    tree = make_nuscenes_tree(tmp_path / "ns", example_dir, scenes=1, samples_per_scene=2, sweeps_between=2,
                              version="v1.0-mini", start_scene=103)
    out = tmp_path / "sample"
    r = python("-m", "lean.data", "nuscenes", tree, "sample_0_1", "--out", out, "--version", "v1.0-mini",
               "--image-size", "64x176")
    assert r.returncode == 0, r.stderr
    assert "wrote 11 files" in r.stdout
    plan = Tables(tree, "v1.0-mini").plan("sample_0_1")
    assert (out / "0-FRONT.jpg").read_bytes() == (tree / plan.cameras[0].path).read_bytes()
    from_folder = folder_frame(out, SMALL).to("cpu")
    from_tree = nuscenes_frame(tree, plan, SMALL).to("cpu")
    assert torch.equal(from_folder.img, from_tree.img)
    for name in ("camera2lidar", "camera_intrinsics", "lidar2image", "img_aug_matrix"):
        assert torch.allclose(getattr(from_folder, name), getattr(from_tree, name)), name
    # points are stored as float16 in the runtime's layout: a few land on a neighbouring pixel
    a, b = from_folder.inputs()[1], from_tree.inputs()[1]
    both = (a > 0) & (b > 0)
    assert ((a > 0) == (b > 0)).float().mean() > 0.99 and both.sum() > 100
    assert (a[both] - b[both]).abs().median() < 0.05

    r = python("-m", "lean.data", "nuscenes", tree, "nope", "--out", out, "--version", "v1.0-mini")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "no sample 'nope'" in r.stderr
    assert (out / "0-FRONT.jpg").exists()  # the earlier folder stays


def test_sample_folders(tmp_path, example_dir):
    assert sample_folders(example_dir) == [example_dir]
    for name in ("b", "a"):
        shutil.copytree(example_dir, tmp_path / "many" / name)
    (tmp_path / "many" / "notes").mkdir()
    assert sample_folders(tmp_path / "many") == [tmp_path / "many" / "a", tmp_path / "many" / "b"]
    for bad, word in ((tmp_path / "nope", "no such folder"), (tmp_path / "many" / "notes", "no samples")):
        with pytest.raises(LeanError) as e:
            sample_folders(bad)
        assert word in one_line(e)
