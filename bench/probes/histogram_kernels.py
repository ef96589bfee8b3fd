"""Device probe of session 6 (not shipped; run at commit 2a02841): other Triton kernels for the mse histogram, timed on
every conv input of one forward of the demo ResNet50 against the PyTorch ops (histc)."""
import json
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

sys.path.insert(0, ".")
from lean.build import build_folded, resolve_config  # noqa: E402
from lean.checkpoint import read_checkpoint  # noqa: E402
from lean.data import load_inputs  # noqa: E402
from lean.quant import histogram  # noqa: E402


@triton.jit
def atomic_bins(x_ptr, n, scratch_ptr, amax_ptr, low, high, COPIES: tl.constexpr, BINS: tl.constexpr,
                PER_OCTAVE: tl.constexpr, TILE: tl.constexpr):
    """One global atomic per binned value, into one of COPIES private histograms."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < n
    a = tl.abs(tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
    tl.atomic_max(amax_ptr, tl.max(tl.where(a == a, a, float("inf")), axis=0), sem="relaxed")
    log2 = libdevice.log2(a)
    binned = inside & (log2 >= low) & (log2 <= high)
    index = tl.minimum(((log2 - low) * PER_OCTAVE).to(tl.int32), BINS - 1)
    tl.atomic_add(scratch_ptr + (pid % COPIES) * BINS + index, 1, mask=binned, sem="relaxed")


@triton.jit
def window_bins(x_ptr, n, scratch_ptr, amax_ptr, low, high, COPIES: tl.constexpr, BINS: tl.constexpr,
                PER_OCTAVE: tl.constexpr, TILE: tl.constexpr, WINDOW: tl.constexpr):
    """tl.histogram over the tile's top WINDOW bins, one atomic per bin with counts; values below
    the window one atomic each."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < n
    a = tl.abs(tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
    tl.atomic_max(amax_ptr, tl.max(tl.where(a == a, a, float("inf")), axis=0), sem="relaxed")
    log2 = libdevice.log2(a)
    binned = inside & (log2 >= low) & (log2 <= high)
    index = tl.minimum(((log2 - low) * PER_OCTAVE).to(tl.int32), BINS - 1)
    base = tl.maximum(tl.max(tl.where(binned, index, 0), axis=0) - (WINDOW - 1), 0)
    in_window = binned & (index >= base)
    counts = tl.histogram(tl.where(in_window, index - base, 0), WINDOW, mask=in_window)
    row = scratch_ptr + (pid % COPIES) * BINS
    bins = base + tl.arange(0, WINDOW)
    tl.atomic_add(row + bins, counts, mask=(counts > 0) & (bins < BINS), sem="relaxed")
    tl.atomic_add(row + index, 1, mask=binned & ~in_window, sem="relaxed")


@triton.jit
def log2_and_max(x_ptr, y_ptr, n, amax_ptr, TILE: tl.constexpr):
    """log2 |x| written out (for histc) and max |x|, one pass."""
    offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < n
    a = tl.abs(tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
    tl.atomic_max(amax_ptr, tl.max(tl.where(a == a, a, float("inf")), axis=0), sem="relaxed")
    tl.store(y_ptr + offsets, libdevice.log2(a), mask=inside)


@triton.jit
def sorted_runs(x_ptr, n, hist_ptr, amax_ptr, low, high, BINS: tl.constexpr, PER_OCTAVE: tl.constexpr,
                TILE: tl.constexpr):
    """Sort a tile's bin indices, then one atomic per run of equal bins (count = run length)."""
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < n
    a = tl.abs(tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
    tl.atomic_max(amax_ptr, tl.max(tl.where(a == a, a, float("inf")), axis=0), sem="relaxed")
    log2 = libdevice.log2(a)
    binned = inside & (log2 >= low) & (log2 <= high)
    index = tl.minimum(((log2 - low) * PER_OCTAVE).to(tl.int32), BINS - 1)
    index = tl.where(binned, index, BINS)  # unbinned sort last, never counted
    s = tl.sort(index)
    # neighbours through a reshape: compare each sorted value with the next one
    pos = tl.arange(0, TILE)
    nxt = tl.gather(s, tl.minimum(pos + 1, TILE - 1), 0)
    prv = tl.gather(s, tl.maximum(pos - 1, 0), 0)
    end = (pos == TILE - 1) | (s != nxt)
    start = (pos == 0) | (s != prv)
    valid = s < BINS
    tl.atomic_add(hist_ptr + s, (pos + 1).to(tl.float32), mask=end & valid, sem="relaxed")
    tl.atomic_add(hist_ptr + s, (-pos).to(tl.float32), mask=start & valid & (pos > 0), sem="relaxed")


ck = read_checkpoint("model/resnet50/bevfusion-det.pth")
cfg = resolve_config(ck)
_, img, depth = load_inputs("example-data", cfg)
model = build_folded(cfg, ck.state_dict).cuda()
acts = []
hooks = [mod.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach().clone()))
         for mod in model.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
with torch.no_grad():
    model(img.cuda(), depth.cuda())
for h in hooks:
    h.remove()
total = sum(a.numel() for a in acts)
B, LO, HI = histogram.HIST_BINS, *histogram.LOG2_RANGE
amax = torch.zeros((), device="cuda")
hist = torch.zeros(B, dtype=torch.float64, device="cuda")
hist32 = torch.zeros(B, device="cuda")
scratch = {c: torch.zeros(c, B, dtype=torch.int32, device="cuda") for c in (1, 16, 128)}
buf = torch.empty(max(a.numel() for a in acts), device="cuda")


def v_torch(x):
    hist.add_(histogram.log2_histogram(x, amax, None))


def v_window(window, tile):
    def f(x):
        flat = x.reshape(-1)
        n = flat.numel()
        window_bins[(triton.cdiv(n, tile),)](flat, n, scratch[16], amax, LO, HI, COPIES=16, BINS=B, PER_OCTAVE=32,
                                             TILE=tile, WINDOW=window)
        hist.add_(scratch[16].sum(0))
        scratch[16].zero_()
    return f


def v_atomic(copies, tile=1024):
    def f(x):
        flat = x.reshape(-1)
        n = flat.numel()
        atomic_bins[(triton.cdiv(n, tile),)](flat, n, scratch[copies], amax, LO, HI, COPIES=copies, BINS=B,
                                             PER_OCTAVE=32, TILE=tile)
        hist.add_(scratch[copies].sum(0))
        scratch[copies].zero_()
    return f


def v_log2_histc(x, tile=2048):
    flat = x.reshape(-1)
    n = flat.numel()
    y = buf[:n]
    log2_and_max[(triton.cdiv(n, tile),)](flat, y, n, amax, TILE=tile)
    hist.add_(torch.histc(y, B, LO, HI))


def v_sorted(tile):
    def f(x):
        flat = x.reshape(-1)
        n = flat.numel()
        sorted_runs[(triton.cdiv(n, tile),)](flat, n, hist32, amax, LO, HI, BINS=B, PER_OCTAVE=32, TILE=tile)
    return f


def timeit(fn, reps=5):
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


def check(fn, out):
    a = acts[len(acts) // 2]
    out.zero_()
    fn(a)
    ref = torch.histc(a.abs().float().log2_(), B, LO, HI).double()
    return int((out.double() - ref).abs().sum().item())


res = {"values": total}
variants = {"torch ops": (v_torch, hist), "atomic copies=1": (v_atomic(1), hist), "atomic copies=16": (v_atomic(16), hist),
            "atomic copies=128": (v_atomic(128), hist), "log2+max kernel, histc": (v_log2_histc, hist),
            "window 128 tile 2048": (v_window(128, 2048), hist), "window 256 tile 2048": (v_window(256, 2048), hist),
            "window 256 tile 4096": (v_window(256, 4096), hist), "window 64 tile 1024": (v_window(64, 1024), hist),
            "sorted runs tile 1024": (v_sorted(1024), hist32)}
for name, (fn, out) in variants.items():
    try:
        ms = timeit(fn)
        bad = check(fn, out)
        res[name] = [ms, bad]
        print(f"{name:28s} {ms:7.2f} ms for {total / 1e6:.0f} M values; mismatches vs histc {bad}", flush=True)
    except Exception as e:  # noqa: BLE001
        res[name] = str(e)[:300]
        print(name, "failed:", type(e).__name__, str(e)[:300], flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
