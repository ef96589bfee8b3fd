"""Device probe of session 6 (not shipped; run at commit 13a421f): the calibration statistics with and without reusing a
shared quantizer's counts and the Triton kernel (``lean.quant.histogram``), in steady state, and
the kernel's histogram against ``torch.histc`` on every conv input of a forward."""
import copy
import gc
import json
import sys
import time

import torch

sys.path.insert(0, ".")
import lean.quant.calib as calib  # noqa: E402
import lean.quant.histogram as histogram  # noqa: E402
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
out = {"torch": torch.__version__}
try:
    import triton
    out["triton"] = triton.__version__
except ImportError:
    out["triton"] = None
print(out, flush=True)

KERNEL = histogram._kernel
COLLECT = calib.RangeCollector.collect


def no_dedupe(self, x):
    self._last = None  # every call reads its tensor
    return COLLECT(self, x)


def setup(triton_on: bool, dedupe: bool):
    histogram._kernel = KERNEL if triton_on else (lambda: None)
    calib.RangeCollector.collect = COLLECT if dedupe else no_dedupe


def steady(method, n=40, skip=2):
    q = insert_quantizers(copy.deepcopy(model), method)
    marks = {}

    def progress(k):
        if k in (skip, skip + n):
            torch.cuda.synchronize()
            marks[k] = time.perf_counter()
    gc.collect()
    calibrate(q, [(img, depth)] * (skip + n), method, progress=progress)
    amax = {name: m.amax.detach().cpu() for name, m in q.named_modules()
            if getattr(m, "amax", None) is not None and not name.endswith("weight_quantizer")}
    return (marks[skip + n] - marks[skip]) / n, amax


def plain(n=40):
    with torch.no_grad():
        for _ in range(3):
            model(img, depth)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            model(img, depth)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


variants = {"before (torch ops, every call)": (False, False), "torch ops, counts reused": (False, True),
            "triton, every call": (True, False), "triton, counts reused": (True, True)}
results = {}
for rep in range(2):
    p = plain()
    results.setdefault("plain", []).append(p * 1e3)
    print(f"rep {rep}: plain {p * 1e3:.2f} ms", flush=True)
    amaxes = {}
    for name, (tr, dd) in variants.items():
        setup(tr, dd)
        for method in ("mse", "max"):
            t, amax = steady(method)
            amaxes[(name, method)] = amax
            results.setdefault(f"{name} {method}", []).append(t * 1e3)
            print(f"  {name:32s} {method}: {t * 1e3:.2f} ms ({t / p - 1:+.0%})", flush=True)
    setup(True, True)
    base = {m: amaxes[("before (torch ops, every call)", m)] for m in ("mse", "max")}
    for (name, method), amax in amaxes.items():
        same = sum(torch.equal(amax[k], base[method][k]) for k in amax)
        close = sum(torch.allclose(amax[k], base[method][k], rtol=0.02) for k in amax)
        print(f"  amax {name} {method}: {same}/{len(amax)} identical to before, {close} within 2%", flush=True)
        results[f"amax identical {name} {method}"] = [same, len(amax)]

# the kernel's histogram against histc, tensor by tensor
acts = []
hooks = [mod.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach().clone()))
         for mod in model.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
with torch.no_grad():
    model(img, depth)
for h in hooks:
    h.remove()
mismatch, values = 0, 0
scratch = histogram.new_scratch("cuda")
for a in acts:
    amax_t = torch.zeros((), device="cuda")
    hist_t = histogram.log2_histogram(a, amax_t, scratch)
    ref = torch.histc(a.abs().float().log2_(), histogram.HIST_BINS, *histogram.LOG2_RANGE).double()
    mismatch += int((hist_t - ref).abs().sum().item())
    values += a.numel()
    assert amax_t.item() == a.abs().max().item()
print(f"kernel vs histc: {mismatch} values binned differently of {values}", flush=True)
results["kernel_vs_histc_mismatch"] = [mismatch, values]


def timeit(fn, reps=10):
    for a in acts:
        fn(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        for a in acts:
            fn(a)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


am = torch.zeros((), device="cuda")
for name, sc in (("torch ops", None), ("triton", scratch)):
    ms = timeit(lambda a: histogram.log2_histogram(a, am, sc))
    setup(sc is not None, True)
    mx = timeit(lambda a: histogram.max_abs_(a, am))
    print(f"statistics of one forward's conv inputs ({values / 1e6:.0f} M values), {name}: histogram+max {ms:.2f} ms, "
          f"max {mx:.2f} ms", flush=True)
    results[f"isolated {name}"] = [ms, mx]
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fused.json", "w"), indent=1)
