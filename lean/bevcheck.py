"""End-to-end check of the exported chain, as the runtime runs it:

images -> camera.backbone.onnx (ONNX Runtime) -> BEV pooling (lean.geometry) ->
camera.vtransform.onnx (ONNX Runtime), against the same chain in PyTorch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lean.errors import LeanError


@torch.no_grad()
def onnx_chain(feature, weights, vtransform_path: Path, model, sample) -> torch.Tensor:
    """ONNX Runtime's backbone outputs -> our BEV pooling -> camera.vtransform.onnx."""
    from lean.bev import pool_to_bev
    from lean.export import ort_session

    bev_in = pool_to_bev(feature, weights, sample, model.vtransform)
    (out,) = ort_session(vtransform_path).run(["feat_out"], {"feat_in": bev_in.cpu().numpy()})
    return torch.from_numpy(out)


def check_bev(feature, weights, vtransform_path, model, sample, reference, precision: str, plot_dir=None) -> dict:
    """Final camera BEV map of the ONNX chain against PyTorch's (``reference``); raise if off."""
    from lean.export import compare

    t = time.perf_counter()
    ref = reference.detach().cpu()
    got = onnx_chain(feature, weights, Path(vtransform_path), model, sample)
    stats = {"shape": list(ref.shape), **compare(got, ref, precision)}
    stats["seconds"] = time.perf_counter() - t
    if plot_dir is not None:
        stats["plots"] = plot_bev(Path(plot_dir), ref, got, sample, model.cfg)
    if not stats["ok"]:
        raise LeanError(
            f"end-to-end BEV map of the ONNX chain differs from PyTorch: max abs error {stats['max_abs_err']:.3g} > "
            f"tolerance {stats['tolerance']:.3g} (cosine {stats['cosine']:.6f}); nothing was written"
        )
    return stats


def plot_bev(folder: Path, ref: torch.Tensor, got: torch.Tensor, sample, cfg) -> list[str]:
    """PNGs of the BEV map (channel L2 norm) from PyTorch, from the ONNX chain, and their difference,
    drawn with the car's forward (+x) up and its left (+y) left, lidar points on top for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lean.io import atomic_path

    (x0, x1, _), (y0, y1, _) = cfg.xbound, cfg.ybound
    pts = sample.points[:, :3].float()
    inside = (pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)
    near = pts[inside & (pts[:, 2] > -1.5)]  # above the ground: the boxes
    written = []
    maps = {"bev_pytorch.png": ref[0].norm(dim=0), "bev_onnx.png": got[0].norm(dim=0),
            "bev_diff.png": (got[0] - ref[0]).norm(dim=0)}
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
