"""SwinT backbone in mmdet's ``SwinTransformer`` layout (the MIT BEVFusion camera backbone).

Module names match ``encoders.camera.backbone.*`` of official checkpoints, which were trained with
mmdet's implementation; where mmdet differs from the Microsoft / timm Swin, this file follows
mmdet so the trained weights mean the same thing here:

- PatchMerging gathers each 2x2 neighbourhood in ``nn.Unfold`` order (see ``PatchMerging``).
- Every odd block shifts its windows, even when the feature map is no larger than one window
  (Microsoft's Swin turns the shift off there).
- Feature maps are zero-padded to whole windows *after* ``norm1`` and the padded tokens take part
  in attention unmasked; only the shifted-window regions are masked, with -100 rather than -inf.

Returns the outputs of stages 1, 2, 3 after ``norm1/2/3``, taken before that stage's patch
merging, as NCHW: [B,192,H/8,W/8], [B,384,H/16,W/16], [B,768,H/32,W/32].

Tensors between modules are channels-last ``[B, H, W, C]``: LayerNorm and Linear act on the last
dimension, so no layout change is needed until the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: int = 4
    patch_size: int = 4
    qkv_bias: bool = True
    out_indices: tuple[int, ...] = (1, 2, 3)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


SWINT = SwinConfig()


def _dims(x: torch.Tensor) -> list[int]:
    """``x.shape`` as Python ints.

    The TorchScript tracer hands sizes out as tensors, which turns every reshape, pad and window
    mask into shape arithmetic in the ONNX graph. Exported graphs have fixed sizes, so ints are
    exact and let those fold into constants; the batch stays -1 in reshapes all the same.
    """
    return [int(s) for s in x.shape]


def relative_position_index(window_size: int) -> torch.Tensor:
    """[N, N] int64 index into the (2ws-1)^2 bias table, N = ws*ws: row-major (dy, dx) offsets.

    Equal to mmdet's ``double_step_seq`` construction; stored as a buffer because the official
    checkpoints carry it.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*nW, ws*ws, C], windows in row-major order within each image."""
    _, h, w, c = _dims(x)
    x = x.view(-1, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """[B*nW, ws*ws, C] -> [B, H, W, C]; inverse of ``window_partition``."""
    c = _dims(windows)[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window_size: int, shift: int, like: torch.Tensor) -> torch.Tensor:
    """[nW, N, N] additive mask for attention in rolled windows: -100 between tokens that were
    not neighbours before the roll.

    Each axis of the rolled map has three regions, [0, n-ws), [n-ws, n-s) and [n-s, n) as mmdet
    slices them; tokens may attend to each other only within one (row region, column region)
    cell. Built from comparisons rather than mmdet's slice assignment, which traces into
    scatter ops; with int sizes the whole mask folds to a constant in the export.
    """

    def regions(n: int) -> torch.Tensor:
        i = torch.arange(n, device=like.device)
        return (i >= n - window_size).long() + (i >= n - shift).long()

    cells = regions(h)[:, None] * 3 + regions(w)[None, :]
    cells = window_partition(cells[None, :, :, None], window_size)[..., 0]
    different = cells[:, None, :] != cells[:, :, None]
    return different.to(like.dtype) * -100.0


class WindowMSA(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Written as matmul + softmax rather than ``scaled_dot_product_attention`` so that the ONNX
    graph at opset 13 holds only MatMul/Softmax and the bias/mask adds stay visible.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B*nW, N, C], mask [nW, N, N] or None -> [B*nW, N, C]."""
        _, n, c = _dims(x)
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = _dims(mask)[0]
            attn = attn.view(-1, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


class ShiftWindowMSA(nn.Module):
    """Window attention over a whole feature map: pad to whole windows, roll, attend, undo."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0, qkv_bias: bool = True):
        super().__init__()
        assert 0 <= shift_size < window_size
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(dim, num_heads, window_size, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        _, h, w, _ = _dims(x)
        ws, shift = self.window_size, self.shift_size
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r

        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, shift, x)
        x = window_reverse(self.w_msa(window_partition(x, ws), mask), ws, hp, wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :h, :w, :] if pad_b or pad_r else x


class FFN(nn.Module):
    """mmcv's FFN without its dropouts and without the residual: the block adds the residual,
    because mmdet's identity is the block input before ``norm2``, not the FFN input.

    The nesting keeps mmcv's keys: ``layers.0.0`` is the first Linear, ``layers.1`` the second.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: int, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftWindowMSA(dim, num_heads, window_size, window_size // 2 if shift else 0, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """4x4 patches -> embed_dim, then LayerNorm; [B, 3, H, W] -> [B, ceil(H/4), ceil(W/4), C]."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = _dims(x)[-2:]
        # mmdet's AdaptivePadding('corner'): zeros at the bottom/right up to whole patches.
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        return self.norm(self.projection(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods -> one token: LayerNorm(4C), Linear(4C -> 2C, no bias).

    The 4C vector is in ``nn.Unfold(kernel_size=2, stride=2)`` order, channel-major:
    index ``c * 4 + 2 * dy + dx``. Microsoft's / timm's Swin concatenates
    ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` instead (position-major, dy before dx), and mmdet's
    ``swin_converter`` permutes ``norm`` and ``reduction`` when it loads such weights; the
    official BEVFusion checkpoints hold the converted (Unfold-order) tensors, so this order is
    the one that makes them load as-is. A reshape reproduces Unfold without its im2col export.
    Odd H/W are zero-padded at the bottom/right first, as mmdet's AdaptivePadding('corner') does.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
        _, h, w, c = _dims(x)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = x.reshape(-1, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(-1, h2, w2, 4 * c)
        return self.reduction(self.norm(x))


class SwinBlockSequence(nn.Module):
    """One stage: blocks alternating plain / shifted windows, then an optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: int,
                 qkv_bias: bool, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input of the next stage, this stage's output before merging)."""
        for block in self.blocks:
            x = block(x)
        return (x if self.downsample is None else self.downsample(x)), x


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig = SWINT):
        super().__init__()
        self.cfg = cfg
        self.out_indices = cfg.out_indices
        dims = cfg.stage_dims
        last = len(cfg.depths) - 1
        self.patch_embed = PatchEmbed(3, cfg.embed_dim, cfg.patch_size)
        self.stages = nn.ModuleList(
            SwinBlockSequence(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio,
                              cfg.qkv_bias, downsample=i < last)
            for i in range(len(cfg.depths))
        )
        for i in cfg.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.apply(_init_weights)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.cfg.stage_dims[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, out = stage(x)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
        return outs

    def level_consumers(self) -> list[nn.Module | None]:
        """No backbone layer reads an output level, so the neck's concat quantizers get their own.

        Each level is ``norm{i}`` of the stage output; inside the backbone the stage output goes
        on un-normed (to the patch merging's LayerNorm), so no conv or linear sees the tensor
        the neck sees and there is no input quantizer whose scale it could share.
        """
        return [None] * len(self.out_indices)


def _init_weights(m: nn.Module) -> None:
    # mmdet's init; only matters for models built without a checkpoint (tests, demo weights).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowMSA):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


def swint() -> SwinTransformer:
    return SwinTransformer(SWINT)
