"""Device probe of session 5 (run at commit bdbe346, whose bench.measure.calibration was still the old differencing method): why the old calibration figure was noise, and what the histogram costs."""
import gc
import json
import sys
import time

import torch

sys.path.insert(0, ".")
from bench.measure import calibration  # noqa: E402
from lean.build import build_folded, resolve_config  # noqa: E402
from lean.checkpoint import read_checkpoint  # noqa: E402
from lean.data import load_inputs  # noqa: E402
from lean.quant.modelopt import calibrate, insert_quantizers  # noqa: E402
import copy  # noqa: E402

CK = "model/resnet50/bevfusion-det.pth"
out = {}
# 1. the old marginal measurement, five times
old = []
for i in range(4):
    r = calibration(CK, "example-data", "cuda", "mse", 8)
    old.append((r["samples_per_s"], r["overhead"], r["first_batch_s"]))
    print("old", i, old[-1], flush=True)
out["old"] = old

ck = read_checkpoint(CK)
cfg = resolve_config(ck)
_, img, depth = load_inputs("example-data", cfg)
img, depth = img.cuda(), depth.cuda()
model = build_folded(cfg, ck.state_dict).cuda()


def steady_calib(method, n=60, skip=3):
    q = insert_quantizers(copy.deepcopy(model), method)
    marks = {}

    def progress(k):
        if k in (skip, n):
            torch.cuda.synchronize()
            marks[k] = time.perf_counter()
    gc.collect()
    calibrate(q, [(img, depth)] * n, method, progress=progress)
    return (marks[n] - marks[skip]) / (n - skip)


def steady_plain(n=60):
    with torch.no_grad():
        for _ in range(3):
            model(img, depth)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            model(img, depth)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


for rep in range(2):
    p = steady_plain()
    m = steady_calib("mse")
    x = steady_calib("max")
    print(f"steady rep {rep}: plain {p*1e3:.2f} ms, mse {m*1e3:.2f} ms ({m/p-1:+.0%}), max {x*1e3:.2f} ms ({x/p-1:+.0%})", flush=True)
    out[f"steady{rep}"] = (p, m, x)

# 2. histogram variants over every quantized activation of one forward
acts = []
hooks = [mod.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach().clone()))
         for mod in model.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
with torch.no_grad():
    model(img, depth)
for h in hooks:
    h.remove()
total = sum(a.numel() for a in acts)
print("activations", len(acts), total, "channels_last", sum(a.is_contiguous(memory_format=torch.channels_last) for a in acts), flush=True)


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


hist = torch.zeros(2048, device="cuda")
cnt = torch.zeros(8192, dtype=torch.long, device="cuda")
amax = torch.zeros((), device="cuda")


def v_aminmax(x):
    lo, hi = torch.aminmax(x)
    torch.maximum(amax, torch.maximum(hi, -lo), out=amax)


def v_current(x):
    v_aminmax(x)
    hist.add_(torch.histc(x.abs().float().log2_(), 2048, -32.0, 32.0))


def v_bits_bincount(x):
    v_aminmax(x)
    b = (x.view(torch.int32) & 0x7FFFFFFF) >> 18
    cnt.add_(torch.bincount(b.flatten(), minlength=8192))


def v_bits_histc(x):
    v_aminmax(x)
    b = ((x.view(torch.int32) & 0x7FFFFFFF) >> 18).float()
    hist.add_(torch.histc(b, 2048, 3040.0, 5088.0))


variants = {"aminmax": v_aminmax, "current": v_current, "bits_bincount": v_bits_bincount, "bits_histc": v_bits_histc}
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _hist(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BINS: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        b = (bits >> 18) - 3040
        b = tl.minimum(tl.maximum(b, 0), BINS - 1)
        h = tl.histogram(b, BINS)
        tl.atomic_add(out_ptr + tl.arange(0, BINS), h)

    ih = torch.zeros(2048, dtype=torch.int32, device="cuda")

    def v_triton(x, block=8192):
        v_aminmax(x)
        x = x.contiguous() if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) else x
        n = x.numel()
        _hist[(triton.cdiv(n, block),)](x, ih, n, BLOCK=block, BINS=2048)

    variants["triton"] = v_triton
    variants["triton4k"] = lambda x: v_triton(x, 4096)
    variants["triton16k"] = lambda x: v_triton(x, 16384)
except Exception as e:  # noqa: BLE001
    print("no triton", type(e).__name__, e)

for name, fn in variants.items():
    try:
        ms = timeit(fn)
        print(f"variant {name}: {ms:.2f} ms per forward's activations", flush=True)
        out[f"variant_{name}"] = ms
    except Exception as e:  # noqa: BLE001
        print("variant", name, "failed", type(e).__name__, str(e)[:300], flush=True)

# check triton histogram equals bincount histogram on one tensor
if "triton" in variants:
    a = acts[5]
    ih.zero_()
    v_triton(a)
    b = ((a.view(torch.int32) & 0x7FFFFFFF) >> 18).clamp(3040, 3040 + 2047) - 3040
    ref = torch.bincount(b.flatten(), minlength=2048)
    print("triton == bincount:", bool((ih.long() == ref).all()), flush=True)

# 3. profile one eager calibration forward
from torch.profiler import ProfilerActivity, profile  # noqa: E402

q = insert_quantizers(copy.deepcopy(model), "mse")
calibrate(q, [(img, depth)] * 2, "mse", cuda_graph=False)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    calibrate(q, [(img, depth)] * 3, "mse", cuda_graph=False)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe.json", "w"), indent=1)
