import torch

from lean.models.vtransform import DepthLSSTransform

from helpers import SMALL


def test_depth_weights_are_a_distribution_and_features_nhwc():
    vt = DepthLSSTransform(SMALL).eval()
    fh, fw = SMALL.feature_size
    depth = torch.zeros(2, 1, *SMALL.image_size)
    with torch.no_grad():
        feat, weights = vt(torch.randn(2, 256, fh, fw), depth)
        bev = vt.downsample(torch.randn(1, SMALL.bev_channels, 360, 360))
    assert tuple(feat.shape) == (2, fh, fw, SMALL.bev_channels)
    assert tuple(weights.shape) == (2, SMALL.depth_bins, fh, fw)
    assert torch.allclose(weights.sum(1), torch.ones(2, fh, fw), atol=1e-5)
    assert tuple(bev.shape) == (1, SMALL.bev_channels, 180, 180)
