"""The tensor contract of the two files CUDA-BEVFusion's runtime binds by name."""

from __future__ import annotations

from dataclasses import dataclass

BACKBONE_FILE = "camera.backbone.onnx"
VTRANSFORM_FILE = "camera.vtransform.onnx"


@dataclass(frozen=True)
class GraphSpec:
    """One file of the contract: its input and output names and ranks."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ranks: dict  # name -> rank


BACKBONE = GraphSpec(BACKBONE_FILE, ("img", "depth"), ("camera_feature", "camera_depth_weights"),
                     {"img": 5, "depth": 5, "camera_feature": 4, "camera_depth_weights": 4})
# Camera-only branches (MIT's LSSTransform) take no depth image; everything else is the same.
BACKBONE_CAMERA_ONLY = GraphSpec(BACKBONE_FILE, ("img",), BACKBONE.outputs,
                                 {k: v for k, v in BACKBONE.ranks.items() if k != "depth"})
VTRANSFORM = GraphSpec(VTRANSFORM_FILE, ("feat_in",), ("feat_out",), {"feat_in": 4, "feat_out": 4})
SPECS = {spec.file: spec for spec in (BACKBONE, VTRANSFORM)}


def backbone_spec(uses_depth: bool) -> GraphSpec:
    return BACKBONE if uses_depth else BACKBONE_CAMERA_ONLY


def shape_problems(file: str, shapes: dict[str, list]) -> list[str]:
    """What breaks the contract's shapes of ``file`` (names -> static shapes of its inputs and
    outputs), [] if nothing.

    A backbone file whose only input is ``img`` is held to the camera-only contract; any other
    input set must be exactly ``img`` and ``depth``."""
    spec = SPECS[file]
    if spec is BACKBONE:
        names = [n for n in shapes if n not in spec.outputs]
        if names == ["img"]:
            spec = BACKBONE_CAMERA_ONLY
        elif sorted(names) != ["depth", "img"] and "img" in names:
            return [f"inputs are {', '.join(names)}: the runtime binds img and depth (or img alone, camera-only)"]
    missing = [n for n in (*spec.inputs, *spec.outputs) if n not in shapes]
    if missing:
        return [f"no tensor named {', '.join(missing)}"]
    wrong = [f"{n} has rank {len(shapes[n])}, not {r}" for n, r in spec.ranks.items() if len(shapes[n]) != r]
    if wrong:
        return wrong
    if spec is VTRANSFORM:
        (b, c, x, y), out = shapes["feat_in"], shapes["feat_out"]
        return [] if out == [b, c, x // 2, y // 2] else [f"feat_out is {out}, expected {[b, c, x // 2, y // 2]}"]
    (b, n, three, h, w), depth = shapes["img"], shapes.get("depth")
    feature, weights = shapes["camera_feature"], shapes["camera_depth_weights"]
    problems = [] if three == 3 else [f"img has {three} channels, not 3"]
    if depth is not None and depth != [b, n, 1, h, w]:
        problems.append(f"depth is {depth}, expected {[b, n, 1, h, w]}")
    if feature[:3] != [b * n, h // 8, w // 8]:
        problems.append(f"camera_feature is {feature}, expected [B*N, H/8, W/8, C] = {[b * n, h // 8, w // 8, 'C']}")
    if [weights[0], *weights[2:]] != [b * n, h // 8, w // 8]:
        problems.append(f"camera_depth_weights is {weights}, expected [B*N, D, H/8, W/8]")
    return problems
