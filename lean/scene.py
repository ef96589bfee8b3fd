"""The demo: a deterministic synthetic street scene in the runtime's example-data layout, and the
demo float checkpoint, untrained weights whose BN statistics come from that scene.

The scene stands in for nuScenes data the project may not ship: six 1600x900 camera images and a
32-beam lidar sweep, ray cast from one set of boxes on one textured ground, so the images and
the points show the same scene and the projection through ``lidar2image`` can be checked.

Frames: lidar x forward, y left, z up, origin 1.84 m above the ground; camera x right, y down,
z forward.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from lean.bev import pool_to_bev
from lean.checkpoint import DEMO_NOTE, save_official
from lean.config import DEFAULT_DATA, DEMO_FLOAT_CKPT, CameraConfig
from lean.data import MATRIX_FILES, POINTS_FILE, image_aug, image_file_names, load_example, write_example
from lean.io import write_bytes, write_text
from lean.nuscenes import CAMERA_CHANNELS, LIDAR_CHANNEL, pose_matrix
from lean.tensorfile import read_tensor
from lean.geometry import depth_image
from lean.models import build_camera

GROUND_Z = -1.84
IMAGE_SIZE = (1600, 900)  # w, h of the camera images
CAMERA_Z = 1.5 + GROUND_Z  # cameras about 1.5 m above the ground
LIDAR_ELEVATIONS = np.linspace(-30.0, 10.0, 32)  # degrees, one per ring
LIDAR_AZIMUTH_STEP = 0.25  # degrees
LIDAR_RANGE = 70.0
SEED = 0
# Lighting: sun direction (lidar frame) and the share of light that reaches faces turned away.
SUN = (np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])).astype(np.float32)
AMBIENT = 0.45
# Distance haze keeps the far ground from aliasing into noise that bloats the JPEGs.
HAZE, HAZE_DISTANCE = np.array([175, 178, 182], np.float32), 200.0
SKY_HORIZON, SKY_ZENITH = np.array([205, 218, 236], np.float32), np.array([95, 140, 210], np.float32)
ROWS_PER_CHUNK = 150  # camera rows ray cast at once: keeps the working set to tens of MB

# name, yaw (deg), x, y, z offset, focal length: a nuScenes-like rig around the lidar.
STANDARD_RIG = (
    ("FRONT", 0.0, 0.75, 0.00, 0.00, 1266.0),
    ("FRONT_RIGHT", -55.0, 0.55, -0.50, -0.01, 1260.0),
    ("FRONT_LEFT", 55.0, 0.55, 0.50, -0.01, 1257.0),
    ("BACK", 180.0, -1.00, 0.00, 0.02, 800.0),
    ("BACK_LEFT", 110.0, -0.30, 0.55, 0.00, 1256.0),
    ("BACK_RIGHT", -110.0, -0.30, -0.55, 0.00, 1262.0),
)


@dataclass(frozen=True)
class Box:
    """An upright box standing on the ground."""

    name: str
    x: float
    y: float
    size: tuple[float, float, float]  # length (along yaw), width, height in metres
    yaw: float  # radians, counter-clockwise from the lidar x axis
    color: tuple[int, int, int]
    intensity: float  # lidar reflectivity, 0..255

    @property
    def center(self) -> np.ndarray:
        return np.array([self.x, self.y, GROUND_Z + self.size[2] / 2])


def box_list() -> list[Box]:
    """The scene's boxes: cars and pedestrians of distinct hues all around the ego car."""
    car, van, person = (4.5, 1.9, 1.6), (6.0, 2.3, 2.6), (0.6, 0.6, 1.75)
    return [
        Box("car_front", 11.0, 0.3, car, 0.05, (210, 40, 35), 90),
        Box("car_front_left", 8.5, 5.0, car, -0.15, (45, 80, 210), 70),
        Box("van_front_right", 20.0, -5.0, van, 0.10, (225, 205, 40), 120),
        Box("pedestrian_front_right", 6.5, -3.2, person, 0.0, (205, 55, 160), 40),
        Box("car_right", 0.5, -5.5, car, 0.02, (50, 175, 70), 80),
        Box("car_back_left", -7.5, 4.0, car, 0.20, (235, 130, 30), 100),
        Box("car_back", -13.0, -0.4, car, -0.05, (40, 185, 200), 60),
        Box("pedestrian_back_right", -5.0, -4.5, person, 0.0, (130, 60, 200), 50),
    ]


class Rig(NamedTuple):
    """The four matrix files, each float32 [1,N,4,4]; field order is write_example's."""

    camera2lidar: np.ndarray
    camera_intrinsics: np.ndarray
    lidar2image: np.ndarray
    img_aug_matrix: np.ndarray


def make_rig(n_cameras: int = 6) -> Rig:
    """The nuScenes-like six-camera rig, or ``n_cameras`` cameras evenly spread around the car."""
    if n_cameras == len(STANDARD_RIG):
        cameras = [row[1:] for row in STANDARD_RIG]
    else:
        # Wide enough that neighbours overlap by ~10%, never wider than 150 degrees.
        half_fov = min(180.0 / n_cameras * 1.1, 75.0)
        f = min(1266.0, IMAGE_SIZE[0] / 2 / math.tan(math.radians(half_fov)))
        cameras = [(360.0 * i / n_cameras, 0.8 * math.cos(2 * math.pi * i / n_cameras),
                    0.8 * math.sin(2 * math.pi * i / n_cameras), 0.0, f) for i in range(n_cameras)]

    c2l, k4 = [], []
    for yaw, x, y, dz, f in cameras:
        c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
        pose = np.eye(4)
        # Columns: camera right, down and forward axes in the lidar frame.
        pose[:3, :3] = np.array([[s, 0, c], [-c, 0, s], [0, -1, 0]])
        pose[:3, 3] = x, y, CAMERA_Z + dz
        k = np.eye(4)
        k[0, 0], k[1, 1], k[0, 2], k[1, 2] = f, f, IMAGE_SIZE[0] / 2, IMAGE_SIZE[1] / 2
        c2l.append(pose)
        k4.append(k)
    c2l, k4 = np.stack(c2l), np.stack(k4)
    l2i = k4 @ np.linalg.inv(c2l)
    aug = np.broadcast_to(image_aug(IMAGE_SIZE)[2], c2l.shape)
    return Rig(*(np.asarray(m, np.float32)[None] for m in (c2l, k4, l2i, aug)))


def _cast(origin: np.ndarray, dirs: np.ndarray, boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of each unit-length ray: distance (inf if none), surface id (-1 none,
    0 ground, k+1 box k) and the unit normal there."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dirs[:, 2] < 0, (GROUND_Z - origin[2]) / dirs[:, 2], np.inf).astype(np.float32)
    surface = np.where(np.isfinite(t), 0, -1).astype(np.int16)
    normal = np.zeros_like(dirs)
    normal[:, 2] = 1
    for k, box in enumerate(boxes):
        # Only rays through the bounding sphere get the slab test: most rays miss most boxes.
        oc = (box.center - origin).astype(np.float32)
        gap2 = float(oc @ oc) - (np.linalg.norm(box.size) / 2) ** 2
        idx = np.flatnonzero(dirs @ oc >= math.sqrt(gap2)) if gap2 > 0 else np.arange(len(dirs))
        c, s = math.cos(box.yaw), math.sin(box.yaw)
        to_box = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], np.float32)
        o = to_box @ -oc
        d = to_box @ dirs[idx].T  # [3, m]: per-axis rows keep the reductions elementwise
        d[np.abs(d) < 1e-9] = 1e-9  # axis-parallel rays: the slab test stays well defined
        half = np.asarray(box.size, np.float32)[:, None] / 2
        t1, t2 = (-half - o[:, None]) / d, (half - o[:, None]) / d
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)
        enter = np.maximum(np.maximum(near[0], near[1]), near[2])
        leave = np.minimum(np.minimum(far[0], far[1]), far[2])
        hit = (enter <= leave) & (enter > 0) & (enter < t[idx])
        # The face entered is the axis whose slab is entered last.
        local = np.where(near[:, hit] == enter[hit], -np.sign(d[:, hit]), 0).astype(np.float32)
        idx = idx[hit]
        t[idx] = enter[hit]
        surface[idx] = k + 1
        normal[idx] = local.T @ to_box
    return t, surface, normal


def _ground(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground grey level (0..255) and lidar intensity: asphalt road with lane marks, paved sidewalks."""
    road = np.abs(y) < 7.0
    checker = (np.floor(x / 2) + np.floor(y / 2)) % 2 == 0
    tiles = (np.floor(x) + np.floor(y)) % 2 == 0
    dashed = (np.abs(np.abs(y) - 1.75) < 0.075) & (x % 6.0 < 3.0)
    solid = np.abs(np.abs(y) - 5.25) < 0.075
    marks = road & (dashed | solid)
    grey = np.where(marks, 228.0, np.where(road, np.where(checker, 88.0, 102.0), np.where(tiles, 140.0, 156.0)))
    intensity = np.where(marks, 170.0, np.where(road, np.where(checker, 10.0, 16.0), 30.0))
    return grey.astype(np.float32), intensity.astype(np.float32)


def render_camera(rig: Rig, index: int, boxes=None) -> tuple[np.ndarray, np.ndarray]:
    """Camera ``index`` of ``rig``: RGB uint8 [900,1600,3] and surface ids int16 [900,1600]
    (-1 sky, 0 ground, k+1 box k)."""
    boxes = box_list() if boxes is None else boxes
    w, h = IMAGE_SIZE
    pose, k = rig.camera2lidar[0, index].astype(np.float64), rig.camera_intrinsics[0, index]
    origin = pose[:3, 3].astype(np.float32)
    # Albedo by surface id + 1: sky (unused), ground (scaled by its grey level), boxes.
    palette = np.array([(1, 1, 1), (1, 1, 0.98), *(b.color for b in boxes)], np.float32)
    # Pixel (u, v) covers [u, u+1): the runtime's int() of a projection lands in it.
    us = ((np.arange(w) + 0.5 - k[0, 2]) / k[0, 0]).astype(np.float32)[None, :]
    rotation = pose[:3, :3].astype(np.float32)
    rgb = np.empty((h, w, 3), np.uint8)
    labels = np.empty((h, w), np.int16)
    for v0 in range(0, h, ROWS_PER_CHUNK):
        vs = ((np.arange(v0, min(v0 + ROWS_PER_CHUNK, h)) + 0.5 - k[1, 2]) / k[1, 1]).astype(np.float32)[:, None]
        scale = 1 / np.sqrt(us * us + vs * vs + 1)
        dirs = np.stack([(r[0] * us + r[1] * vs + r[2]) * scale for r in rotation], -1).reshape(-1, 3)
        t, surface, normal = _cast(origin, dirs, boxes)

        sky = SKY_HORIZON + (SKY_ZENITH - SKY_HORIZON) * np.sqrt(np.clip(dirs[:, 2:], 0, 1))
        with np.errstate(invalid="ignore"):  # rays into the sky have t = inf
            grey, _ = _ground(origin[0] + dirs[:, 0] * t, origin[1] + dirs[:, 1] * t)
            light = AMBIENT + (1 - AMBIENT) * np.clip(normal @ SUN, 0, None)
            light *= np.where(surface == 0, grey, 1)
            color = palette[surface + 1] * light[:, None]
            color += (HAZE - color) * (1 - np.exp(-t / HAZE_DISTANCE))[:, None]
        color = np.where(surface[:, None] >= 0, color, sky)

        rows = slice(v0, v0 + len(vs))
        rgb[rows] = np.clip(np.rint(color), 0, 255).astype(np.uint8).reshape(len(vs), w, 3)
        labels[rows] = surface.reshape(len(vs), w)
    return rgb, labels


def lidar_scan(boxes=None, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """One sweep of a 32-beam spinning lidar at the origin: float32 [P,5] points (x, y, z,
    intensity, ring) in firing order, and their surface ids int16 [P] (0 ground, k+1 box k)."""
    boxes = box_list() if boxes is None else boxes
    azimuth = np.radians(np.arange(0.0, 360.0, LIDAR_AZIMUTH_STEP))
    elevation = np.radians(LIDAR_ELEVATIONS)
    az, el = (a.ravel() for a in np.meshgrid(azimuth, elevation, indexing="ij"))
    ring = np.tile(np.arange(len(elevation)), len(azimuth))
    dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).astype(np.float32)
    t, surface, _ = _cast(np.zeros(3, np.float32), dirs, boxes)
    keep = (surface >= 0) & (t <= LIDAR_RANGE)
    t, surface, dirs, ring = t[keep], surface[keep], dirs[keep], ring[keep]

    rng = np.random.default_rng(seed)
    xyz = dirs * (t + rng.normal(0, 0.01, len(t)).astype(np.float32))[:, None]
    box_intensity = np.array([b.intensity for b in boxes], np.float32)
    ground_intensity = _ground(xyz[:, 0], xyz[:, 1])[1]
    intensity = np.where(surface > 0, box_intensity[np.maximum(surface, 1) - 1], ground_intensity)
    intensity = np.clip(np.rint(intensity + rng.normal(0, 2, len(t))), 0, 255)
    points = np.column_stack([xyz, intensity, ring]).astype(np.float32)
    return points, surface


def make_scene(folder, n_cameras: int = 6) -> list[Path]:
    """Render the scene and write it as an example-data folder; returns the files written."""
    rig = make_rig(n_cameras)
    boxes = box_list()
    images = [render_camera(rig, i, boxes)[0] for i in range(n_cameras)]
    points, _ = lidar_scan(boxes)
    return write_example(folder, images, *rig, points)


# -- the scene as a nuScenes tree ------------------------------------------------------------------
# For tests and benchmarks of the nuScenes reader: the tables, files and poses of a small
# dataset, every sample showing the example scene. The ego drives and turns, the cameras fire
# a few milliseconds after the lidar, and each sweep's points are stored in its own sensor frame
# at its own pose, so that moving them into the key frame puts them back on the scene.

LIDAR2EGO = ((0.94, 0.0, 1.84), 90.0)  # translation, yaw (deg): nuScenes' LIDAR_TOP is mounted turned
KEY_PERIOD_US, SWEEP_PERIOD_US = 500_000, 50_000  # 2 Hz key frames, 20 Hz lidar
CAMERA_DELAY_US = 7_000  # camera i fires (i + 1) x this after the lidar key frame


def yaw_quaternion(deg: float) -> list[float]:
    h = math.radians(deg) / 2
    return [math.cos(h), 0.0, 0.0, math.sin(h)]


def matrix_quaternion(r: np.ndarray) -> list[float]:
    """(w, x, y, z) of a 3x3 rotation (Shepperd's method, largest pivot first)."""
    t = np.trace(r)
    cases = [t, r[0, 0], r[1, 1], r[2, 2]]
    k = int(np.argmax(cases))
    if k == 0:
        w = math.sqrt(1 + t) / 2
        q = [w, (r[2, 1] - r[1, 2]) / (4 * w), (r[0, 2] - r[2, 0]) / (4 * w), (r[1, 0] - r[0, 1]) / (4 * w)]
    else:
        i, j, m = k - 1, k % 3, (k + 1) % 3
        v = [0.0, 0.0, 0.0]
        v[i] = math.sqrt(1 + r[i, i] - r[j, j] - r[m, m]) / 2
        v[j] = (r[j, i] + r[i, j]) / (4 * v[i])
        v[m] = (r[m, i] + r[i, m]) / (4 * v[i])
        q = [(r[m, j] - r[j, m]) / (4 * v[i]), *v]
    return list(np.asarray(q) * (1 if q[0] >= 0 else -1))


def ego_pose(t_us: int) -> tuple[list[float], list[float]]:
    """The ego's pose at ``t_us``: driving at 5 m/s while turning at 2 deg/s."""
    t = t_us / 1e6
    return [100.0 + 5.0 * t, 50.0 + 0.5 * t, 0.1], yaw_quaternion(10.0 + 2.0 * t)


def _token(*parts) -> str:
    return "_".join(map(str, parts))


def make_nuscenes_tree(root, example=DEFAULT_DATA, scenes: int = 2, samples_per_scene: int = 3,
                       sweeps_between: int = 9, version: str = "v1.0-mini", start_scene: int = 1) -> Path:
    """Write a nuScenes-format tree of ``scenes`` scenes (named scene-0001, ...; pass
    ``start_scene`` 103 with v1.0-mini for mini_val's names) whose samples all show the
    example-data folder ``example`` (six cameras). Images are hard links to its JPEGs; lidar files
    are written. Returns ``root``."""
    root, example = Path(root), Path(example)
    c2l = read_tensor(example / f"{MATRIX_FILES[0]}.tensor")[0].astype(np.float64)
    intrinsics = read_tensor(example / f"{MATRIX_FILES[1]}.tensor")[0].astype(np.float64)
    if len(c2l) != len(CAMERA_CHANNELS):
        raise ValueError(f"{example} has {len(c2l)} cameras; the tree needs {len(CAMERA_CHANNELS)}")
    points = read_tensor(example / POINTS_FILE).astype(np.float32)
    images = [example / name for name in image_file_names(len(c2l))]
    lidar2ego = pose_matrix(LIDAR2EGO[0], yaw_quaternion(LIDAR2EGO[1]))

    tables = {name: [] for name in ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor", "log")}
    sensors = {}
    for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
        sensors[channel] = _token("sensor", channel)
        tables["sensor"].append({"token": sensors[channel], "channel": channel,
                                 "modality": "lidar" if channel == LIDAR_CHANNEL else "camera"})
    calibrated = {LIDAR_CHANNEL: _token("calib", LIDAR_CHANNEL)}
    tables["calibrated_sensor"].append({"token": calibrated[LIDAR_CHANNEL], "sensor_token": sensors[LIDAR_CHANNEL],
                                        "translation": list(LIDAR2EGO[0]), "rotation": yaw_quaternion(LIDAR2EGO[1]),
                                        "camera_intrinsic": []})
    for i, channel in enumerate(CAMERA_CHANNELS):
        cam2ego = lidar2ego @ c2l[i]
        calibrated[channel] = _token("calib", channel)
        tables["calibrated_sensor"].append({"token": calibrated[channel], "sensor_token": sensors[channel],
                                            "translation": cam2ego[:3, 3].tolist(),
                                            "rotation": matrix_quaternion(cam2ego[:3, :3]),
                                            "camera_intrinsic": intrinsics[i, :3, :3].tolist()})

    def lidar_to_global(t_us):
        return pose_matrix(*ego_pose(t_us)) @ lidar2ego

    def add_data(sample, channel, t_us, key, prev, folder, suffix):
        token = _token("sd", channel, t_us)
        et, er = ego_pose(t_us)
        pose = _token("pose", channel, t_us)
        tables["ego_pose"].append({"token": pose, "timestamp": t_us, "translation": et, "rotation": er})
        name = f"{folder}/{channel}/n015-synthetic__{channel}__{t_us}{suffix}"
        tables["sample_data"].append({
            "token": token, "sample_token": sample, "ego_pose_token": pose,
            "calibrated_sensor_token": calibrated[channel], "timestamp": t_us, "fileformat": suffix.split(".")[1],
            "is_key_frame": key, "height": 900 if suffix == ".jpg" else 0, "width": 1600 if suffix == ".jpg" else 0,
            "filename": name, "prev": prev, "next": ""})
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        return token, root / name

    for s in range(scenes):
        scene = _token("scene", s)
        first = 1_532_402_927_000_000 + s * 3_600_000_000
        sample_tokens = [_token("sample", s, k) for k in range(samples_per_scene)]
        tables["scene"].append({"token": scene, "name": f"scene-{start_scene + s:04d}", "log_token": "",
                                "nbr_samples": samples_per_scene, "first_sample_token": sample_tokens[0],
                                "last_sample_token": sample_tokens[-1], "description": "synthetic"})
        prev_lidar = ""
        for k, sample in enumerate(sample_tokens):
            key_us = first + k * KEY_PERIOD_US
            tables["sample"].append({"token": sample, "timestamp": key_us, "scene_token": scene,
                                     "prev": sample_tokens[k - 1] if k else "",
                                     "next": sample_tokens[k + 1] if k + 1 < samples_per_scene else ""})
            key_to_global = lidar_to_global(key_us)
            if k:  # sweeps since the previous key frame, oldest first
                for j in range(sweeps_between, 0, -1):
                    t_us = key_us - j * SWEEP_PERIOD_US
                    prev_lidar, path = add_data(sample_tokens[k - 1], LIDAR_CHANNEL, t_us, False, prev_lidar,
                                                "sweeps", ".pcd.bin")
                    # The scene's points, as this sweep's sensor saw them from its pose.
                    to_sweep = np.linalg.inv(lidar_to_global(t_us)) @ key_to_global
                    moved = points.copy()
                    moved[:, :3] = points[:, :3] @ to_sweep[:3, :3].T.astype(np.float32) + to_sweep[:3, 3].astype(np.float32)
                    write_bytes(path, moved.astype(np.float32).tobytes())
            prev_lidar, path = add_data(sample, LIDAR_CHANNEL, key_us, True, prev_lidar, "samples", ".pcd.bin")
            write_bytes(path, points.tobytes())
            for i, channel in enumerate(CAMERA_CHANNELS):
                _, path = add_data(sample, channel, key_us + (i + 1) * CAMERA_DELAY_US, True, "", "samples", ".jpg")
                if path.exists():
                    path.unlink()
                os.link(images[i], path)
    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in tables.items():
        write_text(folder / f"{name}.json", json.dumps(records))
    return root


# -- the demo float checkpoint -----------------------------------------------------------------
# Random init alone gives activations that shrink or explode layer by layer, which would make
# INT8 calibration and the error figures meaningless. So every BN takes its running statistics
# from the example scene (one pass in train mode with a cumulative average), and activations end
# up at the scale a trained network shows. The weights still detect nothing.
DEMO_SEED = 20261124
# Scale of the last BN of each residual branch. Trained ResNets end up with small residual
# branches; with gamma 1 a random ResNet50 is chaotic (BENCHMARKS.md), so rounding noise, not
# the export, would dominate every error figure.
RESIDUAL_GAMMA = 0.1


@dataclass
class DemoOptions:
    out: Path = DEMO_FLOAT_CKPT
    data: Path = DEFAULT_DATA
    backbone: str = "resnet50"


@torch.no_grad()
def make_demo_model(cfg: CameraConfig, sample, seed: int = DEMO_SEED) -> nn.Module:
    torch.manual_seed(seed)
    model = build_camera(cfg)
    for block in model.backbone.modules():
        if hasattr(block, "bn3"):
            nn.init.constant_(block.bn3.weight, RESIDUAL_GAMMA)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, running stats = that batch's
    depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, cfg.image_size) if cfg.uses_depth else None
    model.train()
    feature, weights = model(sample.img, depth)
    model.bev_downsample(pool_to_bev(feature, weights, sample, model))
    return model.eval()


def make_demo_checkpoint(opts: DemoOptions) -> None:
    """The demo float checkpoint, in the official training layout."""
    cfg = CameraConfig(backbone=opts.backbone)
    model = make_demo_model(cfg, load_example(opts.data, image_size=cfg.image_size, cameras=cfg.cameras))
    save_official(opts.out, model.state_dict(), meta={"note": DEMO_NOTE, "seed": DEMO_SEED, "config": cfg.to_dict()})
