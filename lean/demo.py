"""The demo float checkpoint: deterministic, UNTRAINED weights in the official layout.

Random init alone gives activations that shrink or explode layer by layer, which would make
INT8 calibration and the error figures meaningless. So every BN takes its running statistics
from the example scene (one pass in train mode with a cumulative average), and activations end
up at the scale a trained network shows. The weights still detect nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lean.checkpoint import DEMO_NOTE, save_official
from lean.config import CameraConfig

SEED = 20261124
# Scale of the last BN of each residual branch. Trained ResNets end up with small residual
# branches; with gamma 1 a random ResNet50 is chaotic (INT8 vs float cosine 0.73 at layer4 here),
# so rounding noise, not the export, would dominate every error figure.
RESIDUAL_GAMMA = 0.1


@torch.no_grad()
def make_demo_model(cfg: CameraConfig, sample, seed: int = SEED) -> nn.Module:
    from lean.bev import pool_to_bev
    from lean.geometry import depth_image
    from lean.models import build_camera

    torch.manual_seed(seed)
    model = build_camera(cfg)
    for block in model.backbone.modules():
        if hasattr(block, "bn3"):
            nn.init.constant_(block.bn3.weight, RESIDUAL_GAMMA)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, running stats = that batch's
    depth = depth_image(sample.points, sample.lidar2image, sample.img_aug_matrix, cfg.image_size)
    model.train()
    feature, weights = model(sample.img, depth)
    bev = pool_to_bev(feature, weights, sample, model)
    model.bev_downsample(bev)
    return model.eval()


def make_demo_checkpoint(path: str | Path, data: str | Path = "example-data", cfg: CameraConfig | None = None) -> None:
    from lean.data import load_example

    cfg = cfg or CameraConfig()
    sample = load_example(data, image_size=cfg.image_size, cameras=cfg.cameras)
    model = make_demo_model(cfg, sample)
    save_official(path, model.state_dict(), meta={"note": DEMO_NOTE, "seed": SEED, "config": cfg.to_dict()})


if __name__ == "__main__":
    import argparse
    import sys

    from lean.cli import add_common, log, run

    p = argparse.ArgumentParser(description="Write the demo float checkpoint (untrained weights).")
    p.add_argument("--out", type=Path, default=Path("model/resnet50/bevfusion-det.pth"))
    p.add_argument("--data", type=Path, default=Path("example-data"))
    p.add_argument("--backbone", choices=("resnet50", "swint"), default="resnet50", help="preset (default resnet50)")
    add_common(p)

    def main(args):
        from lean.config import preset

        log(f"making demo float {args.backbone} checkpoint {args.out} (UNTRAINED demo weights)")
        make_demo_checkpoint(args.out, args.data, preset(args.backbone))
        log(f"wrote {args.out}")

    sys.exit(run(main, parser=p))
