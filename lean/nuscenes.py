"""nuScenes on disk, read from its JSON tables: which samples to calibrate on, and for each the
camera files, the rig matrices and the lidar frames (key frame plus sweeps) in the key frame's
lidar coordinates.

The official devkit (nuscenes-devkit) pins numpy < 2 and pulls OpenCV, scikit-learn and Shapely
for what is six JSON tables and 4x4 algebra, so they are read here with the standard library.
The large tables (``sample_data``, ``ego_pose``: 2.6 M records each in v1.0-trainval) are reduced
to tuples of the fields used while they are parsed, and a plan of the chosen samples keeps only
paths and matrices: the tables are dropped before any worker process starts.

The geometry is BEVFusion's (mmdetection3d's ``obtain_sensor2top`` and the nuScenes dataset's
``get_data_info``): a sensor record is moved into the key frame's lidar coordinates through its
own ego pose, sensor -> ego -> global -> key ego -> key lidar. The points are its test pipeline's:
``LoadPointsFromMultiSweeps`` (9 sweeps, the nearest first; points within 1 m of the sweep's sensor
removed; the time lag in seconds as the fifth column, 0 for the key frame) and
``PointsRangeFilter``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from lean.errors import LeanError
from lean.io import read_regular

VERSIONS = ("v1.0-trainval", "v1.0-test", "v1.0-mini")
CAMERA_CHANNELS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LIDAR_CHANNEL = "LIDAR_TOP"
SWEEPS = 9  # BEVFusion's sweeps_num
POINT_DIMS = 5  # x, y, z, intensity, ring in the .pcd.bin files
CLOSE_RADIUS = 1.0  # LoadPointsFromMultiSweeps(remove_close=True): the ego car's own returns
POINT_Z_RANGE = (-5.0, 3.0)  # BEVFusion's point_cloud_range in z; x and y come from the BEV grid
MAX_TABLE_BYTES = 4 << 30  # v1.0-trainval's largest table (sample_data) is under 1 GB
MAX_LIDAR_BYTES = 64 << 20  # a nuScenes sweep is about 0.7 MB
DEFAULT_SAMPLES = 300  # CUDA-BEVFusion's PTQ used about 300 samples

# The official scene splits (nuscenes-devkit's utils/splits.py), as scene numbers: "train" of
# v1.0-trainval is every scene not in "val"; v1.0-test has one split, all its scenes.
VAL_SCENES = (
    3, 12, 13, 14, 15, 16, 17, 18, 35, 36, 38, 39, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103,
    104, 105, 106, 107, 108, 109, 110, 221, 268, 269, 270, 271, 272, 273, 274, 275, 276, 277, 278, 329,
    330, 331, 332, 344, 345, 346, 519, 520, 521, 522, 523, 524, 552, 553, 554, 555, 556, 557, 558, 559,
    560, 561, 562, 563, 564, 565, 625, 626, 627, 629, 630, 632, 633, 634, 635, 636, 637, 638, 770, 771,
    775, 777, 778, 780, 781, 782, 783, 784, 794, 795, 796, 797, 798, 799, 800, 802, 904, 905, 906, 907,
    908, 909, 910, 911, 912, 913, 914, 915, 916, 917, 919, 920, 921, 922, 923, 924, 925, 926, 927, 928,
    929, 930, 931, 962, 963, 966, 967, 968, 969, 971, 972, 1059, 1060, 1061, 1062, 1063, 1064, 1065,
    1066, 1067, 1068, 1069, 1070, 1071, 1072, 1073,
)
MINI_TRAIN_SCENES = (61, 553, 655, 757, 796, 1077, 1094, 1100)
MINI_VAL_SCENES = (103, 916)
SPLITS = {"v1.0-trainval": ("train", "val"), "v1.0-test": ("test",), "v1.0-mini": ("mini_train", "mini_val")}
DEFAULT_SPLIT = {"v1.0-trainval": "val", "v1.0-test": "test", "v1.0-mini": "mini_val"}

# Fields read from each table, in the order kept.
TABLES = {
    "scene": ("token", "name"),
    "sample": ("token", "scene_token", "timestamp"),
    "sample_data": ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp",
                    "filename", "prev", "is_key_frame"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation"),
    "sensor": ("token", "channel"),
}


def scene_name(number: int) -> str:
    return f"scene-{number:04d}"


def split_scenes(split: str) -> set[str] | None:
    """Scene names of a split; None for a split that is all scenes of its version."""
    named = {"val": VAL_SCENES, "mini_train": MINI_TRAIN_SCENES, "mini_val": MINI_VAL_SCENES}
    return {scene_name(n) for n in named[split]} if split in named else None


def quaternion_matrix(q) -> np.ndarray:
    """3x3 rotation of a (w, x, y, z) quaternion, as nuScenes stores rotations (normalized here)."""
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def pose_matrix(translation, rotation) -> np.ndarray:
    """4x4 of a nuScenes pose record: child coordinates -> parent coordinates (float64)."""
    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(rotation)
    m[:3, 3] = translation
    return m


def checked_pose(table: str, token: str, translation, rotation) -> np.ndarray:
    """``pose_matrix`` of a table record, or a one-line error naming it: a NaN, a zero-norm
    quaternion or a malformed field would otherwise move every point of the sample to NaN."""
    try:
        t, q = np.asarray(translation, np.float64), np.asarray(rotation, np.float64)
    except (TypeError, ValueError):
        t = q = np.array([np.nan])
    if t.shape != (3,) or not np.isfinite(t).all():
        raise LeanError(f"{table} {token}: translation {translation!r} is not 3 finite numbers; the metadata is damaged")
    if q.shape != (4,) or not np.isfinite(q).all() or np.linalg.norm(q) < 1e-6:
        raise LeanError(f"{table} {token}: rotation {rotation!r} is not a quaternion (w, x, y, z) of non-zero "
                        "norm; the metadata is damaged")
    return pose_matrix(t, q)


def dataroot_path(filename, token: str) -> str:
    """A ``filename`` of sample_data, checked to stay under the dataroot: relative, without ``..``.
    Checked by its words, not by resolving it: ``samples/`` or ``sweeps/`` symlinked to another disk
    (as people keep them) stay usable."""
    path = PurePosixPath(filename) if isinstance(filename, str) and filename else None
    if path is None or path.is_absolute() or ".." in path.parts or "\\" in filename:
        raise LeanError(f"sample_data {token}: filename {filename!r} leaves the dataroot (an absolute path or '..'); "
                        "nuScenes names files relative to it, e.g. samples/CAM_FRONT/....jpg")
    return filename


@dataclass(frozen=True)
class CameraFile:
    path: str  # relative to the dataroot
    camera2lidar: np.ndarray  # 4x4 float64, into the key frame's lidar coordinates
    intrinsics: np.ndarray  # 3x3


@dataclass(frozen=True)
class LidarFile:
    path: str
    sensor2lidar: np.ndarray  # 4x4 float64 (identity for the key frame)
    lag: float  # seconds before the key frame


@dataclass(frozen=True)
class SamplePlan:
    """Everything read from the tables for one key sample: paths and matrices, no table."""

    token: str
    scene: str
    cameras: tuple[CameraFile, ...]  # in CAMERA_CHANNELS order
    lidar: tuple[LidarFile, ...]  # the key frame, then its sweeps, nearest first


def _compact(fields: tuple[str, ...], table: str, path: Path):
    def hook(record: dict):
        if "token" not in record:  # a nested object (none in these tables): kept as is
            return record
        try:
            return tuple(record[f] for f in fields)
        except KeyError as e:
            raise LeanError(f"{path}: a {table} record has no {e.args[0]!r} field; "
                            "is this an unmodified nuScenes table?") from None
    return hook


def read_table(dataroot: Path, version: str, table: str) -> dict[str, tuple]:
    """``DATAROOT/version/table.json`` as {token: (fields of TABLES[table])}."""
    path = Path(dataroot) / version / f"{table}.json"
    if not path.exists():
        found = [v for v in VERSIONS if (Path(dataroot) / v / "sample.json").exists()]
        hint = f"versions found there: {', '.join(found)}; pass --version" if found else \
            "pass the folder that holds samples/, sweeps/ and the v1.0-* table folders"
        raise LeanError(f"{path}: no such nuScenes table ({hint})")
    data = read_regular(path, MAX_TABLE_BYTES, "nuScenes table")
    try:
        records = json.loads(data, object_hook=_compact(TABLES[table], table, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeanError(f"{path}: not valid JSON ({e}); re-extract the nuScenes metadata archive") from None
    del data
    if not isinstance(records, list) or not all(isinstance(r, tuple) for r in records):
        raise LeanError(f"{path}: expected a JSON list of {table} records")
    return {r[0]: r[1:] for r in records}


def check_dataroot(dataroot) -> Path:
    if not Path(dataroot).is_dir():
        raise LeanError(f"nuScenes dataroot {dataroot} is not a folder: pass the folder that holds "
                        "samples/, sweeps/ and the v1.0-* table folders")
    return Path(dataroot)


class Tables:
    """The six tables of one nuScenes version, reduced to the fields used."""

    def __init__(self, dataroot, version: str = "v1.0-trainval"):
        if version not in VERSIONS:
            raise LeanError(f"unknown nuScenes version {version!r}: choose one of {', '.join(VERSIONS)}")
        self.dataroot, self.version = check_dataroot(dataroot), version
        for table in TABLES:
            setattr(self, table, read_table(self.dataroot, version, table))
        channels = {token: channel for token, (channel,) in self.sensor.items()}
        self.channel_of = {token: channels.get(sensor) for token, (sensor, *_) in self.calibrated_sensor.items()}
        # The key frames of each sample by channel, as the devkit's sample["data"].
        self.key_frames: dict[str, dict[str, str]] = {}
        for token, (sample, _, cs, _, _, _, is_key) in self.sample_data.items():
            if is_key:
                self.key_frames.setdefault(sample, {})[self.channel_of.get(cs)] = token

    def _record(self, table: str, token: str, what: str) -> tuple:
        try:
            return getattr(self, table)[token]
        except KeyError:
            raise LeanError(f"{self.dataroot / self.version}: {what} refers to {table} {token!r}, "
                            "which the table does not hold; the metadata is incomplete") from None

    def samples_by_scene(self, split: str | None = None) -> dict[str, list[str]]:
        """Sample tokens of each scene of ``split`` (default: the version's), in time order."""
        split = split or DEFAULT_SPLIT[self.version]
        if split not in SPLITS[self.version]:
            raise LeanError(f"split {split!r} is not one of {self.version}'s: choose one of "
                            f"{', '.join(SPLITS[self.version])}")
        names = split_scenes(split)
        if split == "train":
            scenes = {t for t, (name,) in self.scene.items() if name not in split_scenes("val")}
        else:
            scenes = {t for t, (name,) in self.scene.items() if names is None or name in names}
        out: dict[str, list[tuple[int, str]]] = {}
        for token, (scene, timestamp) in self.sample.items():
            if scene in scenes:
                out.setdefault(self.scene[scene][0], []).append((timestamp, token))
        if not out:
            raise LeanError(f"{self.dataroot / self.version}: no sample of split {split!r}; "
                            f"the scenes there are not that split's")
        return {name: [t for _, t in sorted(v)] for name, v in sorted(out.items())}

    def _sensor_to_global(self, token: str) -> np.ndarray:
        """4x4 from sample_data ``token``'s sensor to global coordinates, through its own ego pose."""
        _, pose, cs, *_ = self._record("sample_data", token, "a sample")
        _, t, r, _ = self._record("calibrated_sensor", cs, f"sample_data {token!r}")
        et, er = self._record("ego_pose", pose, f"sample_data {token!r}")
        return checked_pose("ego_pose", pose, et, er) @ checked_pose("calibrated_sensor", cs, t, r)

    def plan(self, token: str, sweeps: int = SWEEPS) -> SamplePlan:
        """Paths and matrices of one key sample."""
        scene, _ = self._record("sample", token, "the sample")
        keys = self.key_frames.get(token, {})
        missing = [c for c in (*CAMERA_CHANNELS, LIDAR_CHANNEL) if c not in keys]
        if missing:  # a key frame whose sensor is unknown has no channel: name the broken reference
            for sd, (sample, _, cs, *_) in self.sample_data.items():
                if sample == token and cs not in self.calibrated_sensor:
                    self._record("calibrated_sensor", cs, f"sample_data {sd!r}")
            raise LeanError(f"sample {token}: no key frame of {', '.join(missing)} in sample_data; "
                            "the metadata is incomplete")
        key = keys[LIDAR_CHANNEL]
        global_to_key = np.linalg.inv(self._sensor_to_global(key))  # into the key frame's lidar coordinates
        cameras = []
        for channel in CAMERA_CHANNELS:
            sd = keys[channel]
            cs = self.sample_data[sd][2]
            intrinsic = np.asarray(self._record("calibrated_sensor", cs, f"sample_data {sd!r}")[3], np.float64)
            if intrinsic.shape != (3, 3) or not np.isfinite(intrinsic).all():
                raise LeanError(f"calibrated_sensor {cs}: camera_intrinsic {intrinsic.tolist()} is not a 3x3 matrix")
            cameras.append(CameraFile(dataroot_path(self.sample_data[sd][4], sd),
                                      global_to_key @ self._sensor_to_global(sd), intrinsic))
        key_time = self.sample_data[key][3]
        lidar = [LidarFile(dataroot_path(self.sample_data[key][4], key), np.eye(4), 0.0)]
        sd = key
        while len(lidar) <= sweeps and self.sample_data[sd][5]:  # mmdetection3d follows "prev" (key frames too)
            sd = self.sample_data[sd][5]
            _, _, _, timestamp, filename, *_ = self._record("sample_data", sd, "a sweep")
            lidar.append(LidarFile(dataroot_path(filename, sd), global_to_key @ self._sensor_to_global(sd),
                                   (key_time - timestamp) / 1e6))
        return SamplePlan(token, self.scene[scene][0], tuple(cameras), tuple(lidar))


def select(samples_by_scene: dict[str, list[str]], count: int, seed: int = 0) -> list[str]:
    """``count`` sample tokens spread over the scenes: a seeded order of scenes, a seeded order of
    each scene's samples, and one sample of every scene in turn. The same tables and seed give
    the same list."""
    if count < 1:
        raise LeanError(f"--samples must be at least 1, got {count}")
    rng = random.Random(seed)
    scenes = sorted(samples_by_scene)
    rng.shuffle(scenes)
    orders = [rng.sample(samples_by_scene[s], len(samples_by_scene[s])) for s in scenes]
    picked = []
    for i in range(max(map(len, orders), default=0)):
        picked += [order[i] for order in orders if i < len(order)]
        if len(picked) >= count:
            break
    return picked[:count]


def plan_samples(dataroot, version: str = "v1.0-trainval", split: str | None = None,
                 samples: int = DEFAULT_SAMPLES, seed: int = 0, sweeps: int = SWEEPS) -> list[SamplePlan]:
    """The calibration plan of a dataroot; the tables are freed on return."""
    tables = Tables(dataroot, version)
    tokens = select(tables.samples_by_scene(split), samples, seed)
    return [tables.plan(t, sweeps) for t in tokens]


def read_lidar(path: Path) -> np.ndarray:
    """A ``.pcd.bin`` file: [P, 5] float32 x, y, z, intensity, ring."""
    data = read_regular(path, MAX_LIDAR_BYTES, "nuScenes lidar file")
    if not data:
        raise LeanError(f"{path}: empty (0 bytes); the file is truncated: copy it again from the dataset")
    if len(data) % (4 * POINT_DIMS):
        raise LeanError(f"{path}: {len(data)} bytes is not a whole number of {POINT_DIMS}-float points; "
                        "the file is truncated or not a nuScenes .pcd.bin")
    points = np.frombuffer(data, np.float32).reshape(-1, POINT_DIMS)
    if not np.isfinite(points[:, :3]).all():
        raise LeanError(f"{path}: some point coordinates are NaN or infinite; the file is damaged")
    return points


def sample_points(dataroot, plan: SamplePlan, xbound, ybound, z_range=POINT_Z_RANGE) -> np.ndarray:
    """Key frame plus sweeps in the key frame's lidar coordinates, [P, 5] float32 with the time lag
    as the fifth column, cut to the BEV grid's x/y range and ``z_range`` (bounds excluded)."""
    parts = []
    for i, frame in enumerate(plan.lidar):
        points = read_lidar(Path(dataroot) / frame.path).copy()
        if i:
            close = (np.abs(points[:, 0]) < CLOSE_RADIUS) & (np.abs(points[:, 1]) < CLOSE_RADIUS)
            points = points[~close]
            # Row by row, not ``points @ R.T``: no BLAS thread pool in each loader worker.
            xyz = points[:, :3].astype(np.float64)
            m = frame.sensor2lidar
            for row in range(3):
                points[:, row] = xyz[:, 0] * m[row, 0] + xyz[:, 1] * m[row, 1] + xyz[:, 2] * m[row, 2] + m[row, 3]
        points[:, 4] = frame.lag
        parts.append(points)
    points = np.concatenate(parts)
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    keep = ((x > xbound[0]) & (x < xbound[1]) & (y > ybound[0]) & (y < ybound[1])
            & (z > z_range[0]) & (z < z_range[1]))
    return points[keep]


def rig_matrices(plan: SamplePlan) -> dict[str, np.ndarray]:
    """camera2lidar, camera_intrinsics, lidar2image as [1, N, 4, 4] float32, as BEVFusion's
    nuScenes dataset builds them (the image aug comes with the image size, ``lean.data``)."""
    c2l = np.stack([c.camera2lidar for c in plan.cameras])
    intrinsics = np.tile(np.eye(4), (len(plan.cameras), 1, 1))
    intrinsics[:, :3, :3] = [c.intrinsics for c in plan.cameras]
    lidar2image = intrinsics @ np.linalg.inv(c2l)
    return {"camera2lidar": c2l[None].astype(np.float32), "camera_intrinsics": intrinsics[None].astype(np.float32),
            "lidar2image": lidar2image[None].astype(np.float32)}
