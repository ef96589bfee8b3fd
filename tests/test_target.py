"""The targets' build commands: what each TensorRT needs, per file."""

from pathlib import Path

import pytest

from lean.errors import LeanError
from lean.target import get_target

from helpers import one_line

F = Path("out/camera.backbone.onnx")
PROFILE = ("--profilingVerbosity=detailed --dumpLayerInfo --dumpProfile --exportLayerInfo=out/camera.backbone.layers.json "
           "--exportProfile=out/camera.backbone.profile.json")


def test_typed_targets_build_what_the_file_says():
    assert get_target("10").build_command(F, 2, 2, "int8") == \
        f"trtexec --onnx={F} --saveEngine=out/camera.backbone.plan {PROFILE} --stronglyTyped"
    assert get_target("11").build_command(F, 2, 2, "int8").endswith(PROFILE)


def test_tensorrt8_flags_follow_the_file():
    t8 = get_target("8")
    assert t8.build_command(F, 2, 2, "int8").endswith(
        f"{PROFILE} --fp16 --int8 --inputIOFormats=fp16:chw,fp16:chw --outputIOFormats=fp16:chw,fp16:chw")
    fp16 = t8.build_command(F, 1, 1, "fp16")  # a file without Q/DQ: --int8 would build placeholder ranges
    assert "--int8" not in fp16 and fp16.endswith("--fp16 --inputIOFormats=fp16:chw --outputIOFormats=fp16:chw")
    pinned = t8.build_command(F, 2, 2, "fp16", ["/a/Conv", "/a/Relu"])
    assert ("--precisionConstraints=obey '--layerPrecisions=/a/Conv:fp32,/a/Relu:fp32' "
            "'--layerOutputTypes=/a/Conv:fp32,/a/Relu:fp32'") in pinned


def test_opsets_and_names_are_checked():
    with pytest.raises(LeanError) as e:
        get_target("9")
    assert "choose one of 10, 11, 8" in one_line(e)
    with pytest.raises(LeanError) as e:
        get_target("8").check_opset(19)
    assert "13 to 17" in one_line(e)
