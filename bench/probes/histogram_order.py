"""Device probe (not shipped): the histogram's input order and the mse calibration cost."""
import copy
import gc
import sys
import time

import torch

sys.path.insert(0, ".")
import lean.quant.calib as calib  # noqa: E402
from lean.build import build_folded, resolve_config  # noqa: E402
from lean.checkpoint import read_checkpoint  # noqa: E402
from lean.data import load_inputs  # noqa: E402
from lean.quant.modelopt import calibrate, insert_quantizers  # noqa: E402

CK = "model/resnet50/bevfusion-det.pth"
ck = read_checkpoint(CK)
cfg = resolve_config(ck)
_, img, depth = load_inputs("example-data", cfg)
img, depth = img.cuda(), depth.cuda()
model = build_folded(cfg, ck.state_dict).cuda()


def log2_other_order(x):
    """log2|x| written in the other memory order (NHWC for NCHW input and back), returned flat in
    that order: neighbours in memory are then different channels, of different magnitudes."""
    if x.dim() != 4:
        return x.abs().float().log2_()
    y = torch.empty(x.shape, device=x.device, dtype=torch.float32, memory_format=torch.channels_last)
    torch.log2(x.abs(), out=y)
    return y


def collect_v1(self, x):
    lo, hi = torch.aminmax(x)
    m = torch.maximum(hi, -lo).float()
    if self.amax is None:
        self.amax = m.clone()
        self.hist = torch.zeros(calib.HIST_BINS, device=x.device) if self.histogram else None
        self.counted = torch.zeros((), dtype=torch.float64, device=x.device)
    else:
        torch.maximum(self.amax, m, out=self.amax)
    if self.histogram:
        self.counted.add_(x.numel())
        y = log2_other_order(x)
        if y.dim() == 4:
            y = y.permute(0, 2, 3, 1) if y.is_contiguous(memory_format=torch.channels_last) else y
        self.hist.add_(torch.histc(y, calib.HIST_BINS, *calib.LOG2_RANGE))


def steady(method, n=40, skip=2):
    q = insert_quantizers(copy.deepcopy(model), method)
    marks = {}

    def progress(k):
        if k in (skip, skip + n):
            torch.cuda.synchronize()
            marks[k] = time.perf_counter()
    gc.collect()
    calibrate(q, [(img, depth)] * (skip + n), method, progress=progress)
    amax = {name: m.amax.detach().cpu() for name, m in q.named_modules() if hasattr(m, "amax") and m.amax is not None and name.endswith("input_quantizer")}
    return (marks[skip + n] - marks[skip]) / n, amax


with torch.no_grad():
    for _ in range(3):
        model(img, depth)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(40):
        model(img, depth)
    torch.cuda.synchronize()
plain = (time.perf_counter() - t) / 40
orig = calib.RangeCollector._collect
for rep in range(2):
    calib.RangeCollector._collect = orig
    v0, a0 = steady("mse")
    calib.RangeCollector._collect = collect_v1
    v1, a1 = steady("mse")
    same = all(torch.equal(a0[k], a1[k]) for k in a0)
    print(f"rep {rep}: plain {plain*1e3:.2f} ms; mse now {v0*1e3:.2f} ms ({v0/plain-1:+.0%}); other order {v1*1e3:.2f} ms "
          f"({v1/plain-1:+.0%}); same amax {same} ({len(a0)} quantizers)", flush=True)
