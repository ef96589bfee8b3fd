"""The runtime's example-data folder: camera images, per-camera matrices and lidar points.

The layout is CUDA-BEVFusion's (``{i}-NAME.jpg`` plus five ``.tensor`` files), so a folder the
user already runs the runtime on is read as is, and the synthetic scene is written in it.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lean import cli
from lean.config import CameraConfig, parse_image_size
from lean.errors import LeanError
from lean.geometry import depth_image
from lean.io import output_folder, read_regular, write_bytes
from lean.nuscenes import CAMERA_CHANNELS, VERSIONS, Tables, rig_matrices, sample_points
from lean.tensorfile import read_tensor, write_tensor

CAMERA_NAMES = ("FRONT", "FRONT_RIGHT", "FRONT_LEFT", "BACK", "BACK_LEFT", "BACK_RIGHT")
MATRIX_FILES = ("camera2lidar", "camera_intrinsics", "lidar2image", "img_aug_matrix")
POINTS_FILE = "points.tensor"
EXAMPLE_FILES = (*(f"{m}.tensor" for m in MATRIX_FILES), POINTS_FILE)  # plus the {i}-NAME.jpg images
# Budgets for what a data folder may hold (a nuScenes frame: 1600x900 JPEGs of ~0.3 MB, about
# 35 000 points per sweep): far above real data, far below what would exhaust memory.
MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64_000_000
MAX_POINTS = 20_000_000
DEFAULT_IMAGE_SIZE = (256, 704)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# The runtime resizes 1600x900 by 0.48 for a 704-wide input; other widths scale that ratio.
BASE_RESIZE, BASE_WIDTH = 0.48, 704
JPEG_QUALITY = 95


def image_file_names(n: int) -> list[str]:
    """File names of ``n`` camera images: nuScenes names for the first six, ``CAMERA_i`` beyond."""
    return [f"{i}-{CAMERA_NAMES[i] if i < len(CAMERA_NAMES) else f'CAMERA_{i}'}.jpg" for i in range(n)]


def image_aug(input_size, image_size=DEFAULT_IMAGE_SIZE) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
    """Resized (w, h), crop (x, y) and the 4x4 img_aug_matrix for a ``input_size`` = (w, h) image.

    Test-time ImageAug3D of BEVFusion: one resize ratio, centred crop in x, bottom crop in y.
    """
    h, w = image_size
    iw, ih = input_size
    r = BASE_RESIZE * w / BASE_WIDTH
    rw, rh = round(iw * r), round(ih * r)
    cx, cy = (rw - w) // 2, rh - h
    if cx < 0 or cy < 0:
        raise LeanError(f"a {iw}x{ih} image resized by {r:.4f} is {rw}x{rh}, smaller than the "
                        f"{w}x{h} network input; use a smaller image size or larger images")
    aug = np.diag(np.array([r, r, 1, 1], np.float32))
    aug[:2, 3] = -cx, -cy
    return (rw, rh), (cx, cy), aug


def crop_image(img: Image.Image, image_size=DEFAULT_IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """The runtime's resize and crop of one camera image: [3,H,W] uint8 RGB and its 4x4 aug.

    PIL's bilinear resize stands in for the runtime's CUDA kernel. Both agree exactly on smooth
    content (constant regions, linear ramps away from borders); on sharp edges they may differ
    by a few grey levels, since PIL widens its filter when shrinking and the kernel does not.
    """
    (rw, rh), (cx, cy), aug = image_aug(img.size, image_size)
    h, w = image_size
    resized = img.convert("RGB").resize((rw, rh), Image.BILINEAR)
    pixels = np.asarray(resized)[cy:cy + h, cx:cx + w]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), aug


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> the network's normalized float32 input, on ``pixels``' device
    (the streaming calibration normalizes on the GPU)."""
    mean = torch.as_tensor(MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.as_tensor(STD, device=pixels.device).view(3, 1, 1)
    # A tensor divisor, not the number: CUDA turns division by a host scalar into multiplication
    # by its reciprocal, one rounding off the runtime's (and this CPU's) division.
    full_scale = torch.full((), 255.0, device=pixels.device)
    return (pixels.float() / full_scale - mean) / std


def preprocess_image(img: Image.Image, image_size=DEFAULT_IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """The runtime's preprocessing of one camera image: [3,H,W] normalized RGB and its 4x4 aug."""
    pixels, aug = crop_image(img, image_size)
    return normalize(pixels), aug


@dataclass
class Sample:
    """One frame of the example-data folder, preprocessed as the runtime does."""

    img: torch.Tensor  # [1,N,3,H,W] normalized
    points: torch.Tensor  # [P,5] x, y, z, intensity, ring/time
    camera2lidar: torch.Tensor  # [1,N,4,4]
    camera_intrinsics: torch.Tensor  # [1,N,4,4]
    lidar2image: torch.Tensor  # [1,N,4,4]
    img_aug_matrix: torch.Tensor  # [1,N,4,4], the one for image_size
    image_size: tuple[int, int]
    folder: Path


def _read_matrices(folder: Path) -> dict[str, np.ndarray]:
    matrices = {}
    for name in MATRIX_FILES:
        path = folder / f"{name}.tensor"
        m = read_tensor(path)
        if m.ndim != 4 or m.shape[0] != 1 or m.shape[2:] != (4, 4) or m.shape[1] == 0:
            raise LeanError(f"{path}: shape {list(m.shape)}, expected [1,N,4,4] (one 4x4 per camera); "
                            "rewrite it with one 4x4 matrix per camera")
        if not np.issubdtype(m.dtype, np.floating):
            raise LeanError(f"{path}: dtype {m.dtype}, expected float32; rewrite it as float32")
        if not np.isfinite(m).all():
            raise LeanError(f"{path}: holds NaN or infinite values; rewrite it with the rig's calibration")
        matrices[name] = m.astype(np.float32)
    counts = {name: m.shape[1] for name, m in matrices.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}.tensor {v}" for k, v in counts.items())
        raise LeanError(f"{folder}: the matrix files disagree on the camera count ({listing}); "
                        "write all four for the same cameras")
    return matrices


def _read_points(folder: Path) -> np.ndarray:
    path = folder / POINTS_FILE
    points = read_tensor(path)
    if points.ndim != 2 or points.shape[1] < 5:
        raise LeanError(f"{path}: shape {list(points.shape)}, expected [P,5] (x, y, z, intensity, "
                        "ring/time); rewrite it with five columns per point")
    if not np.issubdtype(points.dtype, np.floating):
        raise LeanError(f"{path}: dtype {points.dtype}, expected float16; rewrite it as float16")
    if len(points) > MAX_POINTS:
        raise LeanError(f"{path}: {len(points)} points, more than {MAX_POINTS}; pass one frame's points")
    points = points[:, :5].astype(np.float32)
    if not np.isfinite(points[:, :3]).all():
        raise LeanError(f"{path}: some point coordinates are NaN or infinite; rewrite the file with finite points")
    return points


def _find_image(folder: Path, index: int) -> Path:
    found = sorted(folder.glob(f"{index}-*.jpg"))
    if not found:
        raise LeanError(f"{folder}: no image {index}-*.jpg for camera {index}; add it "
                        f"(e.g. {image_file_names(index + 1)[index]}) or pass fewer cameras")
    if len(found) > 1:
        raise LeanError(f"{folder}: several images for camera {index} "
                        f"({', '.join(p.name for p in found)}); keep only one")
    return found[0]


def read_image(path: Path) -> Image.Image:
    return decode_image(read_regular(path, MAX_IMAGE_BYTES, "JPEG image"), path)


def decode_image(data: bytes, path: Path) -> Image.Image:
    """The RGB image of a JPEG or PNG file's bytes; errors name ``path``."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as img:  # no plugin with side effects (EPS)
            w, h = img.size  # from the header: refuse before decoding a pixel
            if w * h > MAX_IMAGE_PIXELS:
                raise LeanError(f"{path}: the image claims {w}x{h} pixels, more than {MAX_IMAGE_PIXELS}; "
                                "replace it with the camera's image (nuScenes: 1600x900)")
            return img.convert("RGB")
    except LeanError:
        raise
    except Image.DecompressionBombError:  # PIL's own check, in open(), for headers beyond its limit
        raise LeanError(f"{path}: the image claims more than {Image.MAX_IMAGE_PIXELS} pixels; replace it with the "
                        "camera's image (nuScenes: 1600x900)") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LeanError(f"{path}: cannot decode the image ({reason}); replace it with a valid JPEG") from None


def _crop_all(images: list[tuple[Path, Image.Image]], image_size) -> tuple[torch.Tensor, np.ndarray]:
    """Cropped uint8 images [1,N,3,H,W] and their augs [1,N,4,4]; a size error names the file."""
    pixels, augs = [], []
    for path, img in images:
        try:
            p, aug = crop_image(img, image_size)
        except LeanError as e:
            raise LeanError(f"{path}: {e}") from None
        pixels.append(p)
        augs.append(aug)
    return torch.stack(pixels)[None], np.stack(augs)[None]


def camera_images(paths: list[Path], matrices: dict[str, np.ndarray], image_size) -> tuple[torch.Tensor, dict]:
    """The first len(``paths``) cameras: their cropped uint8 images, and the rig (``matrices``'
    camera2lidar, camera_intrinsics and lidar2image cut to them, and their img_aug_matrix)."""
    pixels, augs = _crop_all([(p, read_image(p)) for p in paths], image_size)  # read_image's errors name the path
    n = len(paths)
    rig = {name: torch.from_numpy(np.ascontiguousarray(matrices[name][:, :n])) for name in MATRIX_FILES[:3]}
    rig["img_aug_matrix"] = torch.from_numpy(augs)
    return pixels, rig


def read_folder(folder, image_size, cameras: int | None, need_points: bool):
    folder = Path(folder)
    if not folder.is_dir():
        raise LeanError(f"{folder}: no such folder; pass CUDA-BEVFusion's example-data folder "
                        "or create one with python example-data/generate.py")
    matrices = _read_matrices(folder)
    points = _read_points(folder) if need_points else np.zeros((0, 5), np.float32)
    available = next(iter(matrices.values())).shape[1]
    n = available if cameras is None else cameras
    if not 1 <= n <= available:
        raise LeanError(f"{folder}: asked for {n} cameras but the matrices hold {available}; "
                        f"pass cameras between 1 and {available}")
    paths = [_find_image(folder, i) for i in range(n)]
    pixels, rig = camera_images(paths, matrices, image_size)
    return folder, pixels, torch.from_numpy(points), rig


def load_example(folder, image_size=DEFAULT_IMAGE_SIZE, cameras: int | None = None, need_points: bool = True) -> Sample:
    """Read and preprocess an example-data folder; ``cameras`` defaults to all the matrices hold.

    ``need_points=False``: the lidar points are not read (camera-only branches); the sample holds none."""
    folder, pixels, points, rig = read_folder(folder, image_size, cameras, need_points)
    return Sample(img=normalize(pixels), points=points, image_size=tuple(image_size), folder=folder, **rig)


def load_inputs(folder, cfg: CameraConfig) -> tuple[Sample, torch.Tensor, torch.Tensor | None]:
    """An example-data folder -> (sample, img, depth): the backbone's inputs for ``cfg``'s rig,
    the depth image made from the lidar points as the runtime makes it (None for a camera-only
    branch, which needs no points)."""
    sample = load_example(folder, image_size=cfg.image_size, cameras=cfg.cameras, need_points=cfg.uses_depth)
    if not cfg.uses_depth:
        return sample, sample.img, None
    depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, cfg.image_size)
    return sample, sample.img, depth


def sample_folders(data: Path) -> list[Path]:
    """``data`` is one example-data folder, or a folder of them (one sample each)."""
    data = Path(data)
    if not data.exists():
        raise LeanError(f"data folder {data}: no such folder: pass an example-data folder or a folder of them")
    if not data.is_dir():
        raise LeanError(f"data {data} is not a folder: pass an example-data folder or a folder of them")
    marker = f"{MATRIX_FILES[0]}.tensor"  # every sample has it; points.tensor only where depth is used
    if (data / marker).exists():
        return [data]
    found = sorted(p for p in data.iterdir() if (p / marker).exists())
    if not found:
        raise LeanError(f"{data} holds no samples: expected {marker} in it or in its subfolders")
    return found


def backbone_inputs(img: torch.Tensor, depth: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The backbone file's inputs by name: ``img``, and ``depth`` unless the branch is camera-only."""
    return {"img": img} if depth is None else {"img": img, "depth": depth}


def write_example(folder, images, camera2lidar, camera_intrinsics, lidar2image, img_aug_matrix, points) -> list[Path]:
    """Write an example-data folder (each file atomically); returns the paths written. An image
    is a PIL image, an HxWx3 uint8 array (both saved as JPEG) or the bytes of a JPEG file."""
    folder = Path(folder)
    n = len(images)
    if n == 0:
        raise LeanError(f"{folder}: no camera images given; pass one HxWx3 uint8 image per camera")
    for i, img in enumerate(images):
        if not isinstance(img, (Image.Image, bytes)):
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise LeanError(f"image {i}: {a.dtype} {list(a.shape)}, expected uint8 HxWx3; "
                                "convert it with np.clip(x, 0, 255).astype(np.uint8)")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, m in zip(MATRIX_FILES, (camera2lidar, camera_intrinsics, lidar2image, img_aug_matrix)):
        m = np.asarray(m, np.float32)
        if m.size != n * 16:
            raise LeanError(f"{name}: shape {list(m.shape)} does not hold one 4x4 per image ({n} images); "
                            "pass [1,N,4,4] matrices for the N images")
        written.append(folder / f"{name}.tensor")
        write_tensor(written[-1], m.reshape(1, n, 4, 4))

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 5:
        raise LeanError(f"points: shape {list(points.shape)}, expected [P,5]; pass x, y, z, intensity, ring/time")
    written.append(folder / POINTS_FILE)
    write_tensor(written[-1], points.astype(np.float16))

    for file_name, img in zip(image_file_names(n), images):
        written.append(folder / file_name)
        if isinstance(img, bytes):  # an encoded JPEG, kept byte for byte
            write_bytes(written[-1], img)
            continue
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
        write_bytes(written[-1], buf.getvalue())
    return written


@dataclass
class NuScenesExampleOptions:
    dataroot: Path
    token: str
    out: Path
    version: str = "v1.0-trainval"
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    xbound: tuple[float, float, float] = CameraConfig.xbound  # the points are cut to the grid
    ybound: tuple[float, float, float] = CameraConfig.ybound


def write_nuscenes_example(opts: NuScenesExampleOptions) -> list[Path]:
    """One nuScenes sample as the runtime's example-data folder: the six original JPEGs
    (byte for byte), the rig matrices, the img_aug_matrix for ``image_size`` and the key frame's
    points with its sweeps (float16, cut to the grid). Written as a whole or not at all."""
    tables = Tables(opts.dataroot, opts.version)
    if opts.token not in tables.sample:
        raise LeanError(f"{Path(opts.dataroot) / opts.version}: no sample {opts.token!r}; "
                        "pass a token from its sample.json")
    plan = tables.plan(opts.token)
    del tables
    images, augs = [], []
    for camera in plan.cameras:
        path = Path(opts.dataroot) / camera.path
        data = read_regular(path, MAX_IMAGE_BYTES, "JPEG image")
        try:
            augs.append(image_aug(decode_image(data, path).size, opts.image_size)[2])
        except LeanError as e:
            raise LeanError(f"{path}: {e}") from None
        images.append(data)
    points = sample_points(opts.dataroot, plan, opts.xbound, opts.ybound)
    with output_folder(Path(opts.out), (*EXAMPLE_FILES, *image_file_names(len(images)))) as staging:
        written = write_example(staging, images, img_aug_matrix=np.stack(augs)[None], points=points,
                                **rig_matrices(plan))
    return [Path(opts.out) / p.name for p in written]


def _parser():
    p = cli.new_parser("One dataset sample as the runtime's example-data folder:\n\n"
                       "    python -m lean.data nuscenes DATAROOT SAMPLE_TOKEN --out DIR", "python -m lean.data")
    p.add_argument("source", choices=("nuscenes",), help="the dataset's format")
    p.add_argument("dataroot", type=Path, help="nuScenes folder (holds samples/, sweeps/, v1.0-*/)")
    p.add_argument("token", help="sample token (from sample.json)")
    p.add_argument("--out", type=Path, required=True, help="example-data folder to write (replaced as a whole)")
    p.add_argument("--version", choices=VERSIONS, default="v1.0-trainval", help="table version (default v1.0-trainval)")
    p.add_argument("--image-size", default="256x704", help="network input HxW of img_aug_matrix (default 256x704)")
    return p


def _main(args) -> None:
    opts = NuScenesExampleOptions(args.dataroot, args.token, args.out, args.version, parse_image_size(args.image_size))
    files = write_nuscenes_example(opts)
    print(f"wrote {len(files)} files ({len(CAMERA_CHANNELS)} cameras) to {cli.one_line(args.out)}")


if __name__ == "__main__":
    sys.exit(cli.run(_main, _parser()))
