"""Runtime benchmark table: `python benchmarks/bench_runtime.py [kapao benchmark options]`.

Defaults: KAPAO-S with the goldens' seeded weights (shared/golden/e2e/kapao_s_coco_seed0.pt, an
official-format checkpoint) unless --weights/--cfg, the real COCO images of shared/data/coco_mini
(first 20 timed, the rest calibrate INT8), imgsz 640/1024/1280, every backend and precision.
Same as `kapao benchmark --weights <that .pt> --images <coco_mini/images>`. shared/ is found beside
the checkout or at $KAPAO_SHARED.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kapao.cli.main import main

SHARED = Path(os.environ.get("KAPAO_SHARED", Path(__file__).resolve().parents[2] / "shared"))

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a in ("--weights", "--cfg") for a in argv):
        argv += ["--weights", str(SHARED / "golden" / "e2e" / "kapao_s_coco_seed0.pt")]
    if "--images" not in argv:
        argv += ["--images", str(SHARED / "data" / "coco_mini" / "images")]
    sys.exit(main(["benchmark", *argv]))
