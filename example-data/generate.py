"""Write the synthetic scene as an example-data folder: python example-data/generate.py [--out DIR]."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lean.errors import LeanError  # noqa: E402
from lean.scene import make_scene  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write (default: this script's folder)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        files = make_scene(args.out)
    except LeanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in files:
        print(f"  {path.name:<26} {path.stat().st_size:>9,d} bytes")
    print(f"wrote {len(files)} files to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
