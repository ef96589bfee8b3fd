"""GeneralizedLSSFPN: top-down fusion of backbone levels by concat, 1x1 lateral, 3x3 fpn conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Sequential):
    """conv (no bias) + BN + ReLU, keys ``conv``/``bn`` as mmcv's ConvModule names them."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


class GeneralizedLSSFPN(nn.Module):
    def __init__(self, in_channels=(512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        self.in_channels = tuple(in_channels)
        levels = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(levels):
            # Level i concatenates backbone level i with the upsampled result of level i+1
            # (for the top level that is the raw last backbone output).
            above = in_channels[i + 1] if i == levels - 1 else out_channels
            self.lateral_convs.append(ConvModule(in_channels[i] + above, out_channels, 1))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3))
        # One quantizer per concat, applied to every input of it (same scale for all inputs, as
        # TensorRT needs to keep the concat in INT8). Identity in the float model.
        for i in range(levels):
            setattr(self, f"quant_concat{i}", nn.Identity())

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        laterals = list(inputs)
        for i in range(len(laterals) - 2, -1, -1):
            up = F.interpolate(laterals[i + 1], size=laterals[i].shape[2:], mode="bilinear", align_corners=False)
            quant = getattr(self, f"quant_concat{i}")
            x = torch.cat([quant(laterals[i]), quant(up)], dim=1)
            laterals[i] = self.fpn_convs[i](self.lateral_convs[i](x))
        return laterals[0]  # only the finest level feeds the view transform
