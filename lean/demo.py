"""Write the demo float checkpoint: deterministic, UNTRAINED weights in the official layout.

    python -m lean.demo --out model/resnet50/bevfusion-det.pth --data example-data
"""

from __future__ import annotations

import sys
from pathlib import Path

from lean import cli
from lean.config import DEMO_FLOAT_CKPT
from lean.log import logger
from lean.scene import DemoOptions, make_demo_checkpoint


def parser():
    p = cli.new_parser(__doc__, "python -m lean.demo")
    p.add_argument("--out", type=Path, default=DEMO_FLOAT_CKPT, help=f"checkpoint to write (default {DEMO_FLOAT_CKPT})")
    cli.add_data(p, "example-data folder whose scene sets the BN statistics")
    cli.add_backbone(p, default="resnet50")
    return p


def main(args) -> None:
    logger.info("making demo float %s checkpoint %s (UNTRAINED demo weights)", args.backbone, args.out)
    make_demo_checkpoint(DemoOptions(out=args.out, data=args.data, backbone=args.backbone))
    logger.info("wrote %s", args.out)


def entry() -> None:
    """The installed command (pyproject.toml)."""
    cli.console(main, parser())


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
