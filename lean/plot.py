"""PNGs of the BEV map, for a person to look at (``--plot``): matplotlib, imported only when used."""

from __future__ import annotations

from pathlib import Path

import torch

from lean.io import atomic_path


PLOT_FILES = ("bev_pytorch.png", "bev_onnx.png", "bev_diff.png")


def plot_bev(folder: Path, ref: torch.Tensor, got: torch.Tensor, sample, cfg) -> list[str]:
    """PNGs of the BEV map (channel L2 norm) from PyTorch, from the ONNX chain, and their difference,
    drawn with the car's forward (+x) up and its left (+y) left, lidar points on top for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x0, x1, _), (y0, y1, _) = cfg.xbound, cfg.ybound
    pts = sample.points[:, :3].float()
    inside = (pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)
    near = pts[inside & (pts[:, 2] > -1.5)]  # above the ground: the boxes
    written = []
    maps = dict(zip(PLOT_FILES, (ref[0].norm(dim=0), got[0].norm(dim=0), (got[0] - ref[0]).norm(dim=0))))
    for name, m in maps.items():
        fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
        # [X, Y] with X forward, Y left -> rows top = +X, columns left = +Y.
        im = ax.imshow(m.flip(0, 1).numpy(), extent=(y1, y0, x0, x1), cmap="magma" if "diff" not in name else "viridis")
        ax.scatter(near[:, 1], near[:, 0], s=0.2, c="cyan", alpha=0.4, label="lidar points above ground")
        ax.set_xlim(y1, y0)
        ax.set_ylim(x0, x1)
        ax.set_xlabel("y (m, left)")
        ax.set_ylabel("x (m, forward)")
        ax.set_title(name[:-4].replace("_", " ") + " (|feature| per cell)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / name))
    return written
