import torch

from lean.models.neck import GeneralizedLSSFPN


def test_neck_fuses_three_levels_at_the_finest():
    neck = GeneralizedLSSFPN((16, 32, 64), 8).eval()
    levels = [torch.randn(2, 16, 8, 12), torch.randn(2, 32, 4, 6), torch.randn(2, 64, 2, 3)]
    with torch.no_grad():
        out = neck(levels)
    assert tuple(out.shape) == (2, 8, 8, 12)
    assert [k for k in neck.state_dict() if k.endswith("conv.weight")] == [
        "lateral_convs.0.conv.weight", "lateral_convs.1.conv.weight", "fpn_convs.0.conv.weight",
        "fpn_convs.1.conv.weight"]
