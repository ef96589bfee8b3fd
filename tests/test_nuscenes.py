"""nuScenes tables -> sample plans, rig matrices and points, on a small tree written by
``lean.scene.make_nuscenes_tree`` (two scenes, three samples each, two sweeps between key frames),
checked against hand computation and an independent projection."""

import json
import math

import numpy as np
import pytest
import torch

from lean.errors import LeanError
from lean.geometry import depth_image
from lean.nuscenes import (CAMERA_CHANNELS, SWEEPS, Tables, plan_samples, pose_matrix, quaternion_matrix,
                           rig_matrices, sample_points, select, split_scenes)
from lean.scene import CAMERA_DELAY_US, LIDAR2EGO, SWEEP_PERIOD_US, ego_pose, make_nuscenes_tree, yaw_quaternion
from lean.tensorfile import read_tensor

WIDE = (-200.0, 200.0, 0.5)  # a grid that cuts no point of the scene


@pytest.fixture(scope="module")
def tree(tmp_path_factory, example_dir):
    return make_nuscenes_tree(tmp_path_factory.mktemp("nuscenes"), example_dir, scenes=2, samples_per_scene=3,
                              sweeps_between=2, version="v1.0-trainval")


@pytest.fixture(scope="module")
def tables(tree):
    return Tables(tree, "v1.0-trainval")


def test_quaternion_by_hand():
    assert np.allclose(quaternion_matrix([1, 0, 0, 0]), np.eye(3))
    # 90 degrees about z: x -> y, y -> -x
    assert np.allclose(quaternion_matrix(yaw_quaternion(90.0)), [[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    # 180 degrees about x, not normalized on disk
    assert np.allclose(quaternion_matrix([0, 2, 0, 0]), np.diag([1, -1, -1]))
    m = pose_matrix([1, 2, 3], yaw_quaternion(90.0))
    assert np.allclose(m @ [1, 0, 0, 1], [1, 3, 3, 1])


def test_samples_in_time_order_by_scene(tables):
    by_scene = tables.samples_by_scene("train")
    assert list(by_scene) == ["scene-0001", "scene-0002"]
    assert by_scene["scene-0001"] == ["sample_0_0", "sample_0_1", "sample_0_2"]
    with pytest.raises(LeanError, match="no sample of split 'val'"):
        tables.samples_by_scene("val")  # scene-0001/2 are train scenes
    with pytest.raises(LeanError, match="not one of v1.0-trainval's"):
        tables.samples_by_scene("mini_val")


def test_official_splits():
    assert len(split_scenes("val")) == 150 and "scene-0003" in split_scenes("val")
    assert split_scenes("mini_val") == {"scene-0103", "scene-0916"}
    assert split_scenes("train") is None and split_scenes("test") is None


def test_selection_is_deterministic_and_spread_over_scenes():
    scenes = {f"scene-{s:04d}": [f"s{s}_{k}" for k in range(10)] for s in range(7)}
    a = select(scenes, 20, seed=3)
    assert a == select(scenes, 20, seed=3) and a != select(scenes, 20, seed=4)
    assert len(set(a)) == 20
    per_scene = [sum(t.startswith(f"s{s}_") for t in a) for s in range(7)]
    assert max(per_scene) - min(per_scene) <= 1  # 20 over 7 scenes: 2 or 3 each
    assert set(select(scenes, 1000, seed=0)) == {t for v in scenes.values() for t in v}  # all there are
    with pytest.raises(LeanError, match="at least 1"):
        select(scenes, 0)


def test_plan_holds_the_key_frame_then_sweeps_nearest_first(tables):
    first, later = tables.plan("sample_0_0"), tables.plan("sample_0_2")
    assert len(first.lidar) == 1  # the first sample of a scene has no earlier lidar frame
    # 2 sweeps since sample_0_1, then sample_0_1's key frame and its 2 sweeps, ... up to 9
    assert len(later.lidar) == 1 + min(SWEEPS, 2 + 1 + 2 + 1)
    lags = [f.lag for f in later.lidar]
    assert lags[0] == 0 and lags == sorted(lags)
    assert lags[1] == pytest.approx(SWEEP_PERIOD_US / 1e6) and lags[3] == pytest.approx(0.5)
    assert [c.path.split("/")[1] for c in later.cameras] == list(CAMERA_CHANNELS)


def test_sweep_transform_against_a_known_pose(tables):
    """The sweep sensor's origin, 50 ms earlier, lies where the ego drove from: 5 m/s x 0.05 s
    behind (plus 0.5 m/s sideways), seen from the key frame's lidar, which is turned 90 degrees."""
    sweep = tables.plan("sample_0_1").lidar[1]
    origin = sweep.sensor2lidar @ [0, 0, 0, 1]
    key_us = 1_532_402_927_000_000 + 500_000
    dt = SWEEP_PERIOD_US / 1e6
    yaw = math.radians(10.0 + 2.0 * key_us / 1e6)  # the ego's heading (ego_pose)
    # global displacement of the ego (the mount offset turns by 0.1 degree: under 2 mm)
    d_global = np.array([-5.0 * dt, -0.5 * dt])
    d_ego = np.array([[math.cos(yaw), math.sin(yaw)], [-math.sin(yaw), math.cos(yaw)]]) @ d_global
    d_lidar = np.array([d_ego[1], -d_ego[0]])  # ego -> lidar turned by +90 degrees
    assert origin[:2] == pytest.approx(d_lidar, abs=2e-3)
    assert abs(origin[2]) < 1e-6


def test_sweeps_land_back_on_the_scene(tree, tables, example_dir):
    """The tree stores each sweep since the previous key frame in its own sensor frame at its pose;
    moved into the key frame, each is the scene's points again (and the time lag is the fifth
    column). Frames further back belong to the previous sample's scene."""
    scene = read_tensor(example_dir / "points.tensor").astype(np.float32)
    plan = tables.plan("sample_0_2")
    points = sample_points(tree, plan, WIDE, WIDE, z_range=(-100, 100))
    assert len(points) == len(plan.lidar) * len(scene)
    for i, frame in enumerate(plan.lidar[:3]):
        part = points[i * len(scene):(i + 1) * len(scene)]
        assert np.abs(part[:, :3] - scene[:, :3]).max() < 1e-3, i
        assert np.all(part[:, 4] == np.float32(frame.lag))
    assert np.all(points[: len(scene), 3] == scene[:, 3])  # intensity kept


def test_range_filter_and_close_points(tree, tables, tmp_path):
    plan = tables.plan("sample_0_2")
    points = sample_points(tree, plan, (-10.0, 10.0, 0.5), (-5.0, 5.0, 0.5))
    assert len(points) > 0
    assert (points[:, 0] > -10).all() and (points[:, 0] < 10).all()
    assert (np.abs(points[:, 1]) < 5).all() and (points[:, 2] > -5).all() and (points[:, 2] < 3).all()


def test_camera_matrices_by_projection(tables, example_dir):
    """A scene point seen by camera i: its pixel computed through the poses by hand (global ->
    camera at the camera's own time) equals lidar2image of the plan times the point."""
    plan = tables.plan("sample_1_1")
    rig = rig_matrices(plan)
    c2l_demo = read_tensor(example_dir / "camera2lidar.tensor")[0].astype(np.float64)
    k_demo = read_tensor(example_dir / "camera_intrinsics.tensor")[0].astype(np.float64)
    key_us = 1_532_402_927_000_000 + 3_600_000_000 + 500_000
    lidar2ego = pose_matrix(LIDAR2EGO[0], yaw_quaternion(LIDAR2EGO[1]))
    point = np.array([12.0, -3.0, 0.5, 1.0])  # key lidar frame
    world = pose_matrix(*ego_pose(key_us)) @ lidar2ego @ point
    for i in range(len(CAMERA_CHANNELS)):
        cam_us = key_us + (i + 1) * CAMERA_DELAY_US
        cam = np.linalg.inv(pose_matrix(*ego_pose(cam_us)) @ lidar2ego @ c2l_demo[i]) @ world
        want = k_demo[i] @ cam
        got = rig["lidar2image"][0, i].astype(np.float64) @ point
        assert got[:3] / got[2] == pytest.approx(want[:3] / want[2], abs=0.05), i
        assert np.allclose(rig["camera_intrinsics"][0, i], k_demo[i], atol=1e-4)
    # the cameras fire after the lidar: camera2lidar carries the ego's motion, not the mount alone
    shift = np.abs(rig["camera2lidar"][0, :, :3, 3] - c2l_demo[:, :3, 3]).max()
    assert 0.01 < shift < 0.3


def test_depth_image_against_brute_force(tree, tables):
    """The depth image drawn from a plan's points and matrices equals a per-point loop."""
    from lean.data import image_aug

    plan = tables.plan("sample_0_1")
    points = sample_points(tree, plan, WIDE, WIDE)[::97]  # a few hundred points keep the loop short
    rig = rig_matrices(plan)
    h, w = 64, 176
    aug = np.stack([image_aug((1600, 900), (h, w))[2]] * 6)[None]
    got = depth_image(torch.from_numpy(points), torch.from_numpy(rig["lidar2image"]), torch.from_numpy(aug), (h, w))
    want = np.zeros((6, h, w), np.float32)
    for c in range(6):
        for p in points:  # later points win, as the runtime's sequential write
            cam = rig["lidar2image"][0, c] @ np.array([*p[:3], 1.0], np.float32)
            z = np.clip(cam[2], 1e-5, 1e5)
            u, v = aug[0, c, :2, :3] @ np.array([cam[0] / z, cam[1] / z, z], np.float32) + aug[0, c, :2, 3]
            if 0 <= u < w and 0 <= v < h:
                want[c, int(v), int(u)] = z
    assert (want > 0).sum() > 20
    assert np.allclose(got[0, :, 0].numpy(), want, atol=1e-3)


def test_plan_samples_end_to_end(tree):
    plans = plan_samples(tree, "v1.0-trainval", "train", samples=4, seed=1)
    assert len(plans) == 4 and {p.scene for p in plans} == {"scene-0001", "scene-0002"}
    assert [p.token for p in plans] == [p.token for p in plan_samples(tree, "v1.0-trainval", "train", 4, seed=1)]


def test_bad_dataroots_are_one_line(tree, tmp_path):
    with pytest.raises(LeanError, match="versions found there: v1.0-trainval; pass --version"):
        Tables(tree, "v1.0-mini")
    with pytest.raises(LeanError, match="is not a folder"):
        Tables(tmp_path / "nope")
    with pytest.raises(LeanError, match="unknown nuScenes version"):
        Tables(tree, "v2")
    broken = tmp_path / "broken"
    (broken / "v1.0-mini").mkdir(parents=True)
    for name in ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor"):
        (broken / "v1.0-mini" / f"{name}.json").write_text("[]")
    (broken / "v1.0-mini" / "sample.json").write_text(json.dumps([{"token": "a"}]))
    with pytest.raises(LeanError, match="a sample record has no 'scene_token' field"):
        Tables(broken, "v1.0-mini")
    (broken / "v1.0-mini" / "sample.json").write_text("[{")
    with pytest.raises(LeanError, match="not valid JSON"):
        Tables(broken, "v1.0-mini")


def test_missing_and_truncated_lidar_files(tree, tables, tmp_path):
    plan = tables.plan("sample_0_1")
    sweep = tree / plan.lidar[1].path
    data = sweep.read_bytes()
    try:
        sweep.write_bytes(data[:-3])
        with pytest.raises(LeanError, match="not a whole number of 5-float points"):
            sample_points(tree, plan, WIDE, WIDE)
        sweep.unlink()
        with pytest.raises(LeanError, match="does not exist|no such file"):
            sample_points(tree, plan, WIDE, WIDE)
    finally:
        sweep.write_bytes(data)
