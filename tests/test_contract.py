from lean.contract import BACKBONE_FILE, VTRANSFORM_FILE, backbone_spec, shape_problems

GOOD = {"img": [1, 6, 3, 256, 704], "depth": [1, 6, 1, 256, 704], "camera_feature": [6, 32, 88, 80],
        "camera_depth_weights": [6, 118, 32, 88]}


def test_backbone_shapes():
    assert shape_problems(BACKBONE_FILE, GOOD) == []
    assert shape_problems(BACKBONE_FILE, {**GOOD, "camera_feature": [6, 80, 32, 88]})  # NCHW, not NHWC
    assert shape_problems(BACKBONE_FILE, {**GOOD, "depth": [1, 6, 3, 256, 704]})
    assert "no tensor named img" in shape_problems(BACKBONE_FILE, {k: v for k, v in GOOD.items() if k != "img"})[0]
    renamed = {("dpth" if k == "depth" else k): v for k, v in GOOD.items()}
    assert "inputs are img, dpth" in shape_problems(BACKBONE_FILE, renamed)[0]
    assert "inputs are img, depth, extra" in shape_problems(BACKBONE_FILE, {**GOOD, "extra": [1]})[0]


def test_camera_only_backbone_has_no_depth_input():
    camera_only = {k: v for k, v in GOOD.items() if k != "depth"}
    assert shape_problems(BACKBONE_FILE, camera_only) == []
    assert backbone_spec(False).inputs == ("img",) and backbone_spec(True).inputs == ("img", "depth")
    assert shape_problems(BACKBONE_FILE, {**camera_only, "camera_feature": [6, 80, 32, 88]})


def test_vtransform_shapes():
    assert shape_problems(VTRANSFORM_FILE, {"feat_in": [1, 80, 360, 360], "feat_out": [1, 80, 180, 180]}) == []
    assert shape_problems(VTRANSFORM_FILE, {"feat_in": [1, 80, 360, 360], "feat_out": [1, 80, 360, 360]})
    assert shape_problems(VTRANSFORM_FILE, {"feat_in": [1, 80, 360], "feat_out": [1, 80, 180, 180]})
