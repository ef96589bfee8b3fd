"""Time ``lean.geometry.bev_pool`` at full size: 6 cameras, 256x704, D=118, C=80, 360x360 grid.

Geometry comes from the synthetic scene's nuScenes-like rig with the runtime's resize and crop,
so the share of frustum points inside the grid, and how they crowd into voxels, is realistic.
Depth weights and features are random: the cost does not depend on their values.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from lean.config import CameraConfig
from lean.geometry import bev_pool, create_frustum, frustum_geometry, voxel_grid
from lean.scene import make_rig

WARMUP = 1
RUNS = 5


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def run(runs: int = RUNS) -> dict:
    cfg = CameraConfig()
    rig = make_rig(cfg.cameras)
    c2l, intrinsics, _, aug = (torch.tensor(m) for m in rig)  # copies: the rig arrays are read-only
    frustum = create_frustum(cfg.image_size, cfg.feature_size, cfg.dbound)
    dx, bx, nx = voxel_grid(cfg.xbound, cfg.ybound, cfg.zbound)
    geom = frustum_geometry(frustum, c2l, intrinsics, aug)
    g = torch.Generator().manual_seed(0)
    fh, fw = cfg.feature_size
    weights = torch.randn(cfg.cameras, cfg.depth_bins, fh, fw, generator=g).softmax(1)
    features = torch.randn(cfg.cameras, fh, fw, cfg.bev_channels, generator=g)
    idx = ((geom - (bx - dx / 2)) / dx).long()
    kept = int(((idx >= 0) & (idx < nx)).all(-1).sum())
    del idx

    baseline = peak_rss_mb()
    for _ in range(WARMUP):
        bev_pool(geom, weights, features, dx, bx, nx)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        bev = bev_pool(geom, weights, features, dx, bx, nx)
        times.append(time.perf_counter() - start)
    assert bev.shape == (1, cfg.bev_channels, *cfg.bev_grid[:2])
    peak = peak_rss_mb()
    return {
        "name": "bev_pool",
        "seconds": statistics.median(times),
        "points": geom.numel() // 3,
        "kept_points": kept,
        "peak_rss_mb": round(peak, 1),
        "inputs_rss_mb": round(baseline, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    r = run()
    print(
        f"{r['name']}: {r['seconds']:.3f} s median of {RUNS}, {r['points']:,} frustum points "
        f"({r['kept_points']:,} in the grid), peak RSS {r['peak_rss_mb']:.0f} MB "
        f"({r['inputs_rss_mb']:.0f} MB before pooling), {r['threads']} threads"
    )


if __name__ == "__main__":
    main()
