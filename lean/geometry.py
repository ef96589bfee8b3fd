"""Camera geometry of the LSS view transform: frustum, voxel grid, and (below) the pieces the
runtime computes between the two ONNX files.
"""

from __future__ import annotations

import torch

from lean.errors import LeanError


def voxel_grid(xbound, ybound, zbound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (voxel size), bx (centre of the first voxel), nx (voxel count, int64) as BEVFusion stores them."""
    rows = (xbound, ybound, zbound)
    dx = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    bx = torch.tensor([r[0] + r[2] / 2.0 for r in rows], dtype=torch.float32)
    nx = torch.tensor([round((r[1] - r[0]) / r[2]) for r in rows], dtype=torch.int64)
    return dx, bx, nx


def create_frustum(image_size, feature_size, dbound) -> torch.Tensor:
    """[D, fH, fW, 3] of (u, v, depth): pixel centres of the feature map in input-image pixels."""
    ih, iw = image_size
    fh, fw = feature_size
    ds = torch.arange(*dbound, dtype=torch.float32).view(-1, 1, 1).expand(-1, fh, fw)
    d = ds.shape[0]
    xs = torch.linspace(0, iw - 1, fw, dtype=torch.float32).view(1, 1, fw).expand(d, fh, fw)
    ys = torch.linspace(0, ih - 1, fh, dtype=torch.float32).view(1, fh, 1).expand(d, fh, fw)
    return torch.stack((xs, ys, ds), -1)


# -- runtime pieces between the two ONNX files ----------------------------------------------


def _check_matrices(name: str, m: torch.Tensor) -> None:
    if m.dim() != 4 or m.shape[-2:] != (4, 4):
        raise LeanError(f"{name} must have shape [B, N, 4, 4], got {list(m.shape)}")


def depth_image(
    points: torch.Tensor, lidar2image: torch.Tensor, img_aug_matrix: torch.Tensor, image_size
) -> torch.Tensor:
    """Sparse lidar depth image [B, N, 1, H, W] as CUDA-BEVFusion's runtime draws it.

    ``points`` is [P, >=3] (used for every batch item) or [B, P, >=3]; only x, y, z are read.
    The value written is the camera-frame depth *before* the image aug, clamped to [1e-5, 1e5]:
    BEVFusion's BaseDepthTransform takes ``dist`` as a view of the projected z that the in-place
    clamp updates, then applies the aug to a new tensor, and the runtime kernel writes the same
    ``dist``. With the standard aug (no scaling of z) before and after agree anyway. A point
    behind the camera is clamped to 1e-5 and divided by it, which throws it far off the image,
    but both implementations would draw it if it still landed inside, so this does too.
    Where several points hit one pixel, the one with the highest index wins: the result of the
    official per-camera sequential write, and deterministic unlike the runtime's CUDA race.
    """
    _check_matrices("lidar2image", lidar2image)
    _check_matrices("img_aug_matrix", img_aug_matrix)
    if lidar2image.shape != img_aug_matrix.shape:
        raise LeanError(
            f"lidar2image {list(lidar2image.shape)} and img_aug_matrix {list(img_aug_matrix.shape)} differ in shape"
        )
    if points.dim() not in (2, 3) or points.shape[-1] < 3:
        raise LeanError(f"points must have shape [P, >=3] or [B, P, >=3], got {list(points.shape)}")
    b, n = lidar2image.shape[:2]
    h, w = image_size
    dtype = torch.float32
    xyz = points[..., :3].to(dtype)
    if xyz.dim() == 2:
        xyz = xyz.unsqueeze(0).expand(b, -1, -1)
    elif xyz.shape[0] != b:
        raise LeanError(f"points have batch {xyz.shape[0]} but the matrices have batch {b}")
    p = xyz.shape[1]

    l2i = lidar2image.to(dtype)
    aug = img_aug_matrix.to(dtype)
    # [B, N, 3, P]: rows 0..2 of lidar2image applied to (x, y, z, 1).
    cur = l2i[:, :, :3, :3] @ xyz.transpose(1, 2).unsqueeze(1) + l2i[:, :, :3, 3:]
    dist = cur[:, :, 2].clamp(1e-5, 1e5)
    proj = torch.stack((cur[:, :, 0] / dist, cur[:, :, 1] / dist, dist), 2)
    img_xy = aug[:, :, :2, :3] @ proj + aug[:, :, :2, 3:]  # [B, N, 2, P]
    x, y = img_xy[:, :, 0], img_xy[:, :, 1]
    # Range test on the float coordinates: truncation would let x in (-1, 0) through as 0.
    on_img = (x >= 0) & (x < w) & (y >= 0) & (y < h)

    cam, pt = on_img.reshape(b * n, p).nonzero(as_tuple=True)
    px = x.reshape(b * n, p)[cam, pt].long()
    py = y.reshape(b * n, p)[cam, pt].long()
    pixel = (cam * h + py) * w + px
    winner = torch.full((b * n * h * w,), -1, dtype=torch.long, device=xyz.device)
    winner.scatter_reduce_(0, pixel, pt, reduce="amax", include_self=True)
    hit = (winner >= 0).nonzero(as_tuple=True)[0]
    depth = torch.zeros(b * n * h * w, dtype=dtype, device=xyz.device)
    depth[hit] = dist.reshape(b * n, p)[hit // (h * w), winner[hit]]
    return depth.view(b, n, 1, h, w)


def frustum_geometry(
    frustum: torch.Tensor, camera2lidar: torch.Tensor, camera_intrinsics: torch.Tensor, img_aug_matrix: torch.Tensor
) -> torch.Tensor:
    """Lidar-frame position [B, N, D, fH, fW, 3] of every frustum point, as BEVFusion's get_geometry.

    The lidar aug is identity (test time), so it is left out.
    """
    named = {"camera2lidar": camera2lidar, "camera_intrinsics": camera_intrinsics, "img_aug_matrix": img_aug_matrix}
    for name, m in named.items():
        _check_matrices(name, m)
    if not (camera2lidar.shape == camera_intrinsics.shape == img_aug_matrix.shape):
        raise LeanError(
            f"camera matrices differ in shape: camera2lidar {list(camera2lidar.shape)}, "
            f"camera_intrinsics {list(camera_intrinsics.shape)}, img_aug_matrix {list(img_aug_matrix.shape)}"
        )
    if frustum.dim() != 4 or frustum.shape[-1] != 3:
        raise LeanError(f"frustum must have shape [D, fH, fW, 3], got {list(frustum.shape)}")
    b, n = camera2lidar.shape[:2]
    d, fh, fw, _ = frustum.shape
    dtype = torch.float32
    c2l, intrins, aug = (m.to(dtype) for m in (camera2lidar, camera_intrinsics, img_aug_matrix))

    # Row vectors: p @ M^T is M @ p for every point at once, without a [.., 3, 1] detour.
    pts = frustum.to(dtype).reshape(1, 1, -1, 3) - aug[:, :, None, :3, 3]
    pts = pts @ torch.inverse(aug[:, :, :3, :3]).transpose(-1, -2)
    pts = torch.cat((pts[..., :2] * pts[..., 2:3], pts[..., 2:3]), -1)
    combine = c2l[:, :, :3, :3] @ torch.inverse(intrins[:, :, :3, :3])
    pts = pts @ combine.transpose(-1, -2) + c2l[:, :, None, :3, 3]
    return pts.view(b, n, d, fh, fw, 3)


def bev_pool(
    geom: torch.Tensor,
    depth_weights: torch.Tensor,
    features: torch.Tensor,
    dx: torch.Tensor,
    bx: torch.Tensor,
    nx: torch.Tensor,
) -> torch.Tensor:
    """Sum depth_weight * feature of every frustum point per voxel -> [B, C*Z, X, Y] (float32).

    geom [B, N, D, fH, fW, 3] lidar-frame points, depth_weights [B*N, D, fH, fW], features
    [B*N, fH, fW, C] (NHWC, as ``camera.backbone.onnx`` returns them).
    """
    if geom.dim() != 6 or geom.shape[-1] != 3:
        raise LeanError(f"geometry must have shape [B, N, D, fH, fW, 3], got {list(geom.shape)}")
    b, n, d, fh, fw, _ = geom.shape
    if tuple(depth_weights.shape) != (b * n, d, fh, fw):
        raise LeanError(f"depth weights have shape {list(depth_weights.shape)}, expected {[b * n, d, fh, fw]}")
    if features.dim() != 4 or tuple(features.shape[:3]) != (b * n, fh, fw):
        raise LeanError(
            f"camera features have shape {list(features.shape)}, expected NHWC {[b * n, fh, fw, 'C']}"
        )
    c = features.shape[-1]
    nx_list = [int(v) for v in nx]
    gx, gy, gz = nx_list
    device = geom.device

    # .long() truncates toward zero like BEVFusion (and the runtime's int()), so a point up to
    # one voxel below the lower bound still lands in voxel 0: kept on purpose, not a bug here.
    idx = ((geom.float() - (bx - dx / 2.0)) / dx).long().view(-1, 3)
    nx_t = torch.tensor(nx_list, dtype=torch.long, device=device)
    point = ((idx >= 0) & (idx < nx_t)).all(1).nonzero(as_tuple=True)[0]
    idx = idx[point]
    batch = point // (n * d * fh * fw)
    voxel = ((batch * gz + idx[:, 2]) * gx + idx[:, 0]) * gy + idx[:, 1]
    # The frustum point (b, n, d, h, w) reads the feature of pixel (b*n, h, w): the D points of
    # a pixel share one feature row.
    pixel = (point // (d * fh * fw)) * (fh * fw) + point % (fh * fw)
    weight = depth_weights.reshape(-1)[point].float()
    del idx, batch

    # sum_points w_p * f_pixel(p) per voxel is a sparse [voxels, pixels] matrix of summed depth
    # weights times the dense [pixels, C] features: no [points, C] product is ever materialized,
    # and on CPU the sparse product runs 2-3x faster than index_add_ of per-point rows.
    pooling = torch.sparse_coo_tensor(
        torch.stack((voxel, pixel)), weight, (b * gz * gx * gy, b * n * fh * fw), check_invariants=False
    )
    out = torch.sparse.mm(pooling, features.reshape(-1, c).float())
    out = out.view(b, gz, gx, gy, c).permute(0, 4, 1, 2, 3)  # [B, C, Z, X, Y] as bev_pool returns it
    return torch.cat(out.unbind(dim=2), 1)
