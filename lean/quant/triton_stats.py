"""The Triton kernel of ``lean.quant.histogram``; ``abs_log2_statistics`` is None where Triton is
not installed (CPU builds of PyTorch)."""

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None


abs_log2_statistics = None
if triton is not None:
    @triton.jit
    def abs_log2_statistics(x_ptr, n, scratch_ptr, amax_ptr, low, high, HISTOGRAM: tl.constexpr, COPIES: tl.constexpr,
                            BINS: tl.constexpr, PER_OCTAVE: tl.constexpr, TILE: tl.constexpr):
        """Each program reads ``TILE`` values of x: max |x| (NaN as +inf) into ``amax_ptr`` with one
        atomic and, with HISTOGRAM, one atomic count per value whose log2 |x| lies in [low, high]
        (as ``torch.histc``: ``PER_OCTAVE`` bins per octave, the top edge in the last bin), into the
        program's copy (of ``COPIES``, int32 [COPIES, BINS]) of the histogram, so that programs on
        different SMs rarely add to the same address."""
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
        inside = offsets < n
        a = tl.abs(tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
        tl.atomic_max(amax_ptr, tl.max(tl.where(a == a, a, float("inf")), axis=0), sem="relaxed")
        if HISTOGRAM:
            log2 = libdevice.log2(a)  # CUDA's log2f, as torch.log2: the same bins as histc
            binned = inside & (log2 >= low) & (log2 <= high)
            index = tl.minimum(((log2 - low) * PER_OCTAVE).to(tl.int32), BINS - 1)
            tl.atomic_add(scratch_ptr + (pid % COPIES) * BINS + index, 1, mask=binned, sem="relaxed")
