import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lean.models.swin import PatchMerging, ShiftWindowMSA, swint

DATA = Path(__file__).resolve().parents[1] / "data"
PREFIX = "encoders.camera.backbone."


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return swint().eval()


def official_backbone_keys():
    rows = {}
    for line in (DATA / "keys-swint.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith(PREFIX):
            rows[key] = (tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype)
    return rows


def test_keys_shapes_and_dtypes_equal_the_official_list(model):
    ref = official_backbone_keys()
    got = {PREFIX + k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        assert got[key] == value, key


@pytest.mark.parametrize(
    "hw, shapes",
    [
        ((256, 704), [(1, 192, 32, 88), (1, 384, 16, 44), (1, 768, 8, 22)]),
        # 16x44 patches: no stage is a whole number of windows.
        ((64, 176), [(1, 192, 8, 22), (1, 384, 4, 11), (1, 768, 2, 6)]),
        # Not a multiple of the patch size, odd grids at every merge.
        ((38, 58), [(1, 192, 5, 8), (1, 384, 3, 4), (1, 768, 2, 2)]),
    ],
)
def test_output_shapes_and_finite(model, hw, shapes):
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(t.shape) for t in outs] == shapes
    assert all(torch.isfinite(t).all() for t in outs)


def test_image_padding_equals_manual_zero_padding(model):
    # PatchEmbed pads the image with zeros at the bottom/right to whole patches, so a 37x55
    # image is the 40x56 zero-padded one.
    x = torch.randn(1, 3, 37, 55)
    with torch.no_grad():
        a = model(x)
        b = model(F.pad(x, (0, 1, 0, 3)))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_level_consumers_are_none(model):
    assert model.level_consumers() == [None, None, None]
    assert model.out_channels == (192, 384, 768)


def test_relative_position_index_matches_mmdet_construction(model):
    index = model.stages[0].blocks[0].attn.w_msa.relative_position_index
    w = 7
    # mmdet builds it as s[a] + s[N-1-b] with s = dy * (2w-1) + dx over the window.
    s = (torch.arange(w)[:, None] * (2 * w - 1) + torch.arange(w)[None, :]).flatten()
    assert index.dtype == torch.int64
    assert torch.equal(index, s[:, None] + s.flip(0)[None, :])


def naive_window_attention(msa: ShiftWindowMSA, x: torch.Tensor) -> torch.Tensor:
    """Reference for ShiftWindowMSA without windows or rolls: full attention over the padded map,
    keys restricted to the query's (shifted) window and to tokens that were neighbours before the
    cyclic shift, with the bias looked up from the plain (dy, dx) offset.
    """
    w_msa, ws, s = msa.w_msa, msa.window_size, msa.shift_size
    b, h, w, c = x.shape
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    xp = x.new_zeros(b, hp, wp, c)
    xp[:, :h, :w] = x  # padded tokens are zeros after norm1 and take part unmasked, as in mmdet
    ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij"))

    def same(v):
        return v[:, None] == v[None, :]

    allowed = same(((ys - s) % hp) // ws) & same(((xs - s) % wp) // ws)
    allowed &= same(ys < s) & same(xs < s)  # a roll by -s wraps exactly the first s rows/cols
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    index = ((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1).clamp(0, (2 * ws - 1) ** 2 - 1)
    bias = w_msa.relative_position_bias_table[index].permute(2, 0, 1)  # [heads, P, P]

    heads = w_msa.num_heads
    q, k, v = w_msa.qkv(xp.reshape(b, hp * wp, c)).reshape(b, hp * wp, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q * w_msa.scale) @ k.transpose(-2, -1) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, hp, wp, c)
    return w_msa.proj(out)[:, :h, :w]


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("hw", [(7, 7), (10, 12), (14, 14), (15, 20)])
def test_shifted_window_attention_matches_naive_reference(shift, hw):
    torch.manual_seed(1)
    msa = ShiftWindowMSA(dim=8, num_heads=2, window_size=7, shift_size=shift).double()
    with torch.no_grad():
        for p in msa.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(2, *hw, 8, dtype=torch.float64)
        got = msa(x)
        ref = naive_window_attention(msa, x)
    # mmdet masks with -100, the reference with -inf: e^-100 is far below this tolerance.
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_single_unshifted_window_is_plain_attention():
    torch.manual_seed(2)
    msa = ShiftWindowMSA(dim=8, num_heads=2, window_size=7, shift_size=0)
    w_msa = msa.w_msa
    with torch.no_grad():
        x = torch.randn(1, 7, 7, 8)
        q, k, v = w_msa.qkv(x.reshape(1, 49, 8)).reshape(1, 49, 3, 2, 4).permute(2, 0, 3, 1, 4)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=w_msa.relative_position_bias())
        ref = w_msa.proj(ref.transpose(1, 2).reshape(1, 7, 7, 8))
        torch.testing.assert_close(msa(x), ref, rtol=1e-5, atol=1e-6)


def test_patch_merging_uses_unfold_channel_order():
    torch.manual_seed(3)
    c = 4
    merge = PatchMerging(c)
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
        x = torch.randn(2, 5, 7, c)  # odd: padded at the bottom/right
        padded = F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1))
        cols = torch.nn.Unfold(kernel_size=2, stride=2)(padded).transpose(1, 2).reshape(2, 3, 4, 4 * c)
        ref = merge.reduction(merge.norm(cols))
        torch.testing.assert_close(merge(x), ref, rtol=0, atol=0)


def test_patch_merging_equals_timm_order_with_permuted_weights():
    # Weights in the Microsoft/timm order [x(0,0), x(1,0), x(0,1), x(1,1)] (position-major), moved
    # to the Unfold order (channel-major, (0,0), (0,1), (1,0), (1,1)) as mmdet's converter does.
    torch.manual_seed(4)
    c = 4
    norm_w, norm_b = torch.randn(4 * c), torch.randn(4 * c)
    red_w = torch.randn(2 * c, 4 * c)
    to_unfold = [0, 2, 1, 3]  # unfold position -> timm position

    def reorder(t):  # [..., 4C] timm -> unfold
        t = t.reshape(*t.shape[:-1], 4, c)[..., to_unfold, :]
        return t.transpose(-1, -2).reshape(*t.shape[:-2], 4 * c)

    merge = PatchMerging(c)
    with torch.no_grad():
        merge.norm.weight.copy_(reorder(norm_w))
        merge.norm.bias.copy_(reorder(norm_b))
        merge.reduction.weight.copy_(reorder(red_w))
        x = torch.randn(2, 6, 8, c)
        cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        ref = F.layer_norm(cat, (4 * c,), norm_w, norm_b) @ red_w.T
        torch.testing.assert_close(merge(x), ref, rtol=1e-5, atol=1e-5)


def test_onnx_opset13_matches_pytorch(model, tmp_path):
    """The classic (TensorRT 8) form: opset 13, LayerNorm spelled out."""
    import onnx
    import onnxruntime as ort

    from lean.simplify import simplify
    from lean.trace import to_proto, trace

    x = torch.randn(1, 3, 64, 176)
    path = tmp_path / "swint.onnx"
    exported = trace(model, {"img": x}, ["l1", "l2", "l3"], 13)
    simplify(exported)
    onnx.save(to_proto(exported, 13), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"img": x.numpy()})
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max()
