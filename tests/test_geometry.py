"""Geometry between the two ONNX files: frustum -> lidar points, lidar depth image, BEV pooling.

Small hand-made rigs and brute-force Python loops as references; the loops are the point here.
"""

from __future__ import annotations

import math

import pytest
import torch

from lean.config import CameraConfig
from lean.errors import LeanError
from lean.geometry import bev_pool, create_frustum, depth_image, frustum_geometry, voxel_grid

CAMERA_HEIGHT = 1.5
# Columns: camera right, down, forward axes in the lidar frame, for a camera looking along +x.
FORWARD = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
STANDARD_AUG = torch.tensor([[0.48, 0, 0, -32], [0, 0.48, 0, -176], [0, 0, 1, 0], [0, 0, 0, 1]])


def _yaw(deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _camera2lidar(yaw_deg: float, position=(0.0, 0.0, CAMERA_HEIGHT)) -> torch.Tensor:
    m = torch.eye(4)
    m[:3, :3] = _yaw(yaw_deg) @ FORWARD
    m[:3, 3] = torch.tensor(position)
    return m


def _intrinsics(f: float, cx: float, cy: float) -> torch.Tensor:
    k = torch.eye(4)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = f, f, cx, cy
    return k


def _rig(yaws, f, cx, cy, aug=None):
    """[1,N,4,4] camera2lidar, intrinsics, lidar2image, img_aug for cameras at the given yaws."""
    c2l = torch.stack([_camera2lidar(y) for y in yaws])[None]
    k = _intrinsics(f, cx, cy).expand_as(c2l).clone()
    l2i = k @ torch.inverse(c2l)
    aug = (torch.eye(4) if aug is None else aug).expand_as(c2l).clone()
    return c2l, k, l2i, aug


# -- frustum_geometry ---------------------------------------------------------------------------


def test_image_centre_at_10m_lands_straight_ahead_and_in_the_expected_voxel():
    # 65x129 image, 5x9 feature grid: the linspace puts a frustum column on u=64, a row on v=32.
    frustum = create_frustum((65, 129), (5, 9), (10.0, 12.0, 1.0))
    assert frustum[0, 2, 4].tolist() == [64.0, 32.0, 10.0]
    c2l, k, _, aug = _rig([0.0], f=160.0, cx=64.0, cy=32.0)
    geom = frustum_geometry(frustum, c2l, k, aug)
    assert geom.shape == (1, 1, 2, 5, 9, 3)
    torch.testing.assert_close(geom[0, 0, 0, 2, 4], torch.tensor([10.0, 0.0, CAMERA_HEIGHT]))
    # 16 px right of centre at f=160 and 10 m is 1 m to the camera's right, lidar -y.
    torch.testing.assert_close(geom[0, 0, 0, 2, 5], torch.tensor([10.0, -1.0, CAMERA_HEIGHT]))
    # One row (16 px) down is 1 m lower; 11 m deep scales both offsets.
    torch.testing.assert_close(geom[0, 0, 1, 3, 5], torch.tensor([11.0, -1.1, CAMERA_HEIGHT - 1.1]))

    # Default 360x360x1 grid: x index int((10 + 54) / 0.3) = 213, y index int(54 / 0.3) = 180.
    cfg = CameraConfig()
    dx, bx, nx = voxel_grid(cfg.xbound, cfg.ybound, cfg.zbound)
    point = geom[:, :, :1, 2:3, 4:5]  # [1,1,1,1,1,3]
    feature = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    bev = bev_pool(point, torch.ones(1, 1, 1, 1), feature, dx, bx, nx)
    assert bev.shape == (1, 3, 360, 360)
    nonzero = bev.nonzero().tolist()
    assert nonzero == [[0, c, 213, 180] for c in range(3)]
    assert bev[0, :, 213, 180].tolist() == [1.0, 2.0, 3.0]


def test_standard_resize_and_crop_is_undone():
    # nuScenes-like camera on the 1600x900 original; the runtime's 0.48 resize + (-32, -176) crop
    # moves the principal point (800, 450) to (352, 40) in the 704x256 network input.
    c2l, k, _, aug = _rig([0.0], f=1266.0, cx=800.0, cy=450.0, aug=STANDARD_AUG)
    frustum = torch.tensor([[[[352.0, 40.0, 10.0], [352.0 + 0.48 * 126.6, 40.0, 10.0]]]])  # [1,1,2,3]
    geom = frustum_geometry(frustum, c2l, k, aug)
    torch.testing.assert_close(geom[0, 0, 0, 0, 0], torch.tensor([10.0, 0.0, CAMERA_HEIGHT]))
    torch.testing.assert_close(geom[0, 0, 0, 0, 1], torch.tensor([10.0, -1.0, CAMERA_HEIGHT]))


def test_frustum_geometry_is_the_inverse_of_the_projection_for_every_camera():
    # Six cameras all around with the standard aug: projecting each lidar-frame frustum point
    # back through lidar2image and the aug must give its (u, v, depth) again.
    yaws = [0.0, -55.0, 55.0, 180.0, 110.0, -110.0]
    c2l, k, l2i, aug = _rig(yaws, f=1266.0, cx=800.0, cy=450.0, aug=STANDARD_AUG)
    frustum = create_frustum((256, 704), (32, 88), (1.0, 60.0, 4.5))
    geom = frustum_geometry(frustum, c2l, k, aug)
    assert geom.shape == (1, 6, 14, 32, 88, 3)
    pts = torch.cat((geom, torch.ones_like(geom[..., :1])), -1).view(1, 6, -1, 4)
    cam = pts @ l2i.transpose(-1, -2)
    uvd = torch.stack((cam[..., 0] / cam[..., 2], cam[..., 1] / cam[..., 2], cam[..., 2], cam[..., 3]), -1)
    back = (uvd @ aug.transpose(-1, -2))[..., :3]
    torch.testing.assert_close(back, frustum.reshape(1, 1, -1, 3).expand_as(back), rtol=0, atol=2e-3)


def test_frustum_geometry_rejects_mismatched_matrices():
    c2l, k, _, aug = _rig([0.0, 90.0], f=100.0, cx=10.0, cy=10.0)
    frustum = create_frustum((64, 64), (8, 8), (1.0, 5.0, 1.0))
    with pytest.raises(LeanError, match="camera matrices differ"):
        frustum_geometry(frustum, c2l, k[:, :1], aug)
    with pytest.raises(LeanError, match=r"\[B, N, 4, 4\]"):
        frustum_geometry(frustum, c2l[0], k[0], aug[0])


# -- depth_image --------------------------------------------------------------------------------


def _depth_image_loop(points, lidar2image, img_aug_matrix, image_size):
    """The runtime kernel one point and one camera at a time, in that order (last write wins)."""
    h, w = image_size
    b, n = lidar2image.shape[:2]
    out = torch.zeros(b, n, 1, h, w, dtype=torch.float64)
    for bi in range(b):
        for c in range(n):
            l2i = lidar2image[bi, c].double().tolist()
            aug = img_aug_matrix[bi, c].double().tolist()
            for p in points[:, :3].double().tolist():
                row = [*p, 1.0]
                cur = [sum(l2i[r][j] * row[j] for j in range(4)) for r in range(3)]
                dist = min(max(cur[2], 1e-5), 1e5)
                projected = [cur[0] / dist, cur[1] / dist, dist, 1.0]
                x = sum(aug[0][j] * projected[j] for j in range(4))
                y = sum(aug[1][j] * projected[j] for j in range(4))
                if 0 <= x < w and 0 <= y < h:
                    out[bi, c, 0, int(y), int(x)] = dist
    return out


def _depth_case():
    """Three cameras on a 16x44 image (one through a 0.5 resize + crop), random points all around
    plus collisions, points behind the cameras and points beside the images."""
    h, w = 16, 44
    c2l, k, l2i, aug = _rig([0.0, 120.0, 240.0], f=20.0, cx=22.0, cy=8.0)
    # Camera 2 sees an 88x40 original halved to 44x20, then 4 rows cropped off the top.
    k[0, 2] = _intrinsics(40.0, 44.0, 20.0)
    aug[0, 2] = torch.tensor([[0.5, 0, 0, 0], [0, 0.5, 0, -4], [0, 0, 1, 0], [0, 0, 0, 1]])
    l2i = k @ torch.inverse(c2l)

    g = torch.Generator().manual_seed(0)
    angle = torch.rand(200, generator=g) * 2 * math.pi
    radius = 2 + torch.rand(200, generator=g) * 30
    z = CAMERA_HEIGHT + (torch.rand(200, generator=g) - 0.5) * 12
    pts = torch.stack((radius * angle.cos(), radius * angle.sin(), z), 1)
    ahead = torch.tensor([8.0, 0.3, CAMERA_HEIGHT + 0.2])
    extra = torch.stack([
        ahead, ahead, ahead * 1.0001,  # same pixel: the later ones must win
        torch.tensor([0.0, 0.0, CAMERA_HEIGHT]) + 2.5 * (ahead - torch.tensor([0.0, 0.0, CAMERA_HEIGHT])),
        torch.tensor([-5.0, 0.0, CAMERA_HEIGHT]),  # straight behind camera 0
        torch.tensor([5.0, 40.0, CAMERA_HEIGHT]),  # far left of camera 0's image
        torch.tensor([8.0, 0.3, CAMERA_HEIGHT + 0.2]),  # ahead again, wins over the 2.5x farther point
    ])
    pts = torch.cat((pts[:100], extra, pts[100:]))
    points = torch.cat((pts, torch.rand(len(pts), 2, generator=g)), 1)  # intensity, ring: ignored
    return points, l2i, aug, (h, w)


def test_depth_image_matches_a_sequential_loop():
    points, l2i, aug, size = _depth_case()
    got = depth_image(points, l2i, aug, size)
    want = _depth_image_loop(points, l2i, aug, size)
    assert got.shape == (1, 3, 1, 16, 44) and got.dtype == torch.float32
    assert torch.equal(got != 0, want != 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # The case is not trivial: every camera sees points, and the collisions happened.
    assert all(int((got[0, c] != 0).sum()) >= 5 for c in range(3))
    ahead = points[100, :3]
    pixel = depth_image(ahead[None], l2i, aug, size)[0, 0].nonzero()[0].tolist()
    assert got[0, 0][tuple(pixel)].item() == pytest.approx(8.0)  # last of the four hits


def test_depth_image_writes_the_depth_before_the_aug():
    # An aug that also scales depth (row 2) must not change the value written: BEVFusion and the
    # runtime both write the projected z before the aug.
    c2l, k, l2i, _ = _rig([0.0], f=20.0, cx=22.0, cy=8.0)
    aug = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))[None, None]
    got = depth_image(torch.tensor([[10.0, 0.0, CAMERA_HEIGHT]]), l2i, aug, (16, 44))
    assert got[0, 0, 0, 8, 22].item() == pytest.approx(10.0)
    assert int((got != 0).sum()) == 1


def test_depth_image_batches_points_per_item_or_shared():
    points, l2i, aug, size = _depth_case()
    l2i2, aug2 = torch.cat((l2i, l2i.flip(1))), torch.cat((aug, aug.flip(1)))
    shared = depth_image(points, l2i2, aug2, size)
    assert shared.shape == (2, 3, 1, 16, 44)
    torch.testing.assert_close(shared[1], depth_image(points, l2i.flip(1), aug.flip(1), size)[0])
    per_item = depth_image(torch.stack((points, points.flip(0))), l2i2, aug2, size)
    torch.testing.assert_close(per_item[0], shared[0])
    torch.testing.assert_close(per_item[1], depth_image(points.flip(0), l2i.flip(1), aug.flip(1), size)[0])


def test_depth_image_rejects_bad_shapes():
    points, l2i, aug, size = _depth_case()
    with pytest.raises(LeanError, match="points"):
        depth_image(points[:, :2], l2i, aug, size)
    with pytest.raises(LeanError, match="differ in shape"):
        depth_image(points, l2i, aug[:, :2], size)


# -- bev_pool -----------------------------------------------------------------------------------


def _bev_pool_loop(geom, weights, features, dx, bx, nx):
    b, n, d, fh, fw, _ = geom.shape
    c = features.shape[-1]
    gx, gy, gz = nx.tolist()
    out = torch.zeros(b, c, gz, gx, gy, dtype=torch.float64)
    lower = (bx - dx / 2).tolist()
    size = dx.tolist()
    for bi in range(b):
        for ci in range(n):
            for di in range(d):
                for h in range(fh):
                    for w in range(fw):
                        p = geom[bi, ci, di, h, w].tolist()
                        # int() truncates toward zero, as BEVFusion's .long()
                        ix, iy, iz = (int((p[j] - lower[j]) / size[j]) for j in range(3))
                        if 0 <= ix < gx and 0 <= iy < gy and 0 <= iz < gz:
                            x = weights[bi * n + ci, di, h, w].double() * features[bi * n + ci, h, w].double()
                            out[bi, :, iz, ix, iy] += x
    return torch.cat(out.unbind(dim=2), 1)


def _pool_case(b=1, n=2, d=4, fh=4, fw=6, c=3, gz=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    xb, yb, zb = (-4.0, 4.0, 1.0), (-2.0, 6.0, 1.0), (-3.0, -3.0 + 2.0 * gz, 2.0)
    dx, bx, nx = voxel_grid(xb, yb, zb)
    assert nx.tolist() == [8, 8, gz]
    shape = (b, n, d, fh, fw)
    # Voxel coordinate = cell + fraction in [0.1, 0.9): no point sits near a voxel boundary, so
    # float rounding cannot move one. Cells from -2 to the grid size reach outside on both sides
    # (cell -1 truncates to index 0 and stays in, as in BEVFusion).
    cell = torch.stack([torch.randint(-2, 10, shape, generator=g) for _ in range(2)]
                       + [torch.randint(-2, gz + 1, shape, generator=g)], -1).float()
    frac = 0.1 + 0.8 * torch.rand(*shape, 3, generator=g)
    coord = cell + frac
    # Voxel coordinate x = -0.5 truncates to index 0: BEVFusion keeps these points in voxel
    # (0, 1..3, 0), where no other point of camera 0's first pixel row goes.
    coord[0, 0, 0, 0, :3] = torch.tensor([[-0.5, 1.5, 0.5], [-0.5, 2.5, 0.5], [-0.5, 3.5, 0.5]])
    geom = (bx - dx / 2) + coord * dx
    weights = torch.rand(b * n, d, fh, fw, generator=g).softmax(1)
    features = torch.randn(b * n, fh, fw, c, generator=g)
    return geom, weights, features, dx, bx, nx


@pytest.mark.parametrize("b,gz", [(1, 1), (2, 2)])
def test_bev_pool_matches_a_loop(b, gz):
    geom, weights, features, dx, bx, nx = _pool_case(b=b, gz=gz)
    got = bev_pool(geom, weights, features, dx, bx, nx)
    want = _bev_pool_loop(geom, weights, features, dx, bx, nx)
    assert got.shape == (b, 3 * gz, 8, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The case covers kept and dropped points, and voxels summing several points.
    idx = ((geom - (bx - dx / 2)) / dx).long()
    kept = ((idx >= 0) & (idx < nx)).all(-1)
    assert 0 < int(kept.sum()) < kept.numel()
    voxels = torch.cat((torch.arange(b).view(b, 1, 1, 1, 1, 1).expand(*idx.shape[:-1], 1), idx), -1)[kept]
    assert len(voxels.unique(dim=0)) < len(voxels)


def test_bev_pool_keeps_the_truncated_first_voxel_and_reads_half_precision():
    geom, weights, features, dx, bx, nx = _pool_case()
    only = torch.zeros_like(weights)
    only[0, 0, 0, :3] = weights[0, 0, 0, :3]  # the three points at voxel coordinate -0.5 in x
    got = bev_pool(geom, only.half(), features.half(), dx, bx, nx)
    want = torch.zeros(3, 8, 8)
    for i in range(3):
        want[:, 0, 1 + i] = only[0, 0, 0, i].half().float() * features[0, 0, i].half().float()
    torch.testing.assert_close(got[0], want)


def test_bev_pool_rejects_nchw_features():
    geom, weights, features, dx, bx, nx = _pool_case()
    with pytest.raises(LeanError, match="NHWC"):
        bev_pool(geom, weights, features.permute(0, 3, 1, 2), dx, bx, nx)
    with pytest.raises(LeanError, match="depth weights"):
        bev_pool(geom, weights[:, :2], features, dx, bx, nx)
