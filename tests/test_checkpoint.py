import pytest
import torch

from lean.checkpoint import read_checkpoint, save_checkpoint, save_official
from lean.layouts import infer_config, load_weights
from lean.config import CameraConfig
from lean.errors import LeanError
from lean.models import build_camera

from helpers import SMALL, one_line, sample_inputs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = build_camera(SMALL)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2)
    return m


def outputs(model):
    img, depth = sample_inputs(SMALL)
    with torch.no_grad():
        return model(img, depth)


def test_official_checkpoint_round_trips_bit_for_bit(tmp_path, model):
    path = tmp_path / "det.pth"
    # Whole-model keys of the other branches are present in official files and must be ignored.
    extra = {"encoders.lidar.backbone.conv_input.0.weight": torch.zeros(3), "fuser.0.weight": torch.zeros(2),
             "decoder.backbone.blocks.0.0.weight": torch.zeros(1)}
    sd = {f"encoders.camera.{k}": v for k, v in model.state_dict().items()} | extra
    torch.save({"state_dict": sd, "meta": {"epoch": 20}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.source == "mit" and ckpt.kind == "float"
    again = build_camera(infer_config(ckpt.state_dict, cameras=2))
    load_weights(again, ckpt.state_dict)
    for a, b in zip(outputs(model), outputs(again)):
        assert torch.equal(a, b)


def test_bare_and_own_formats_load(tmp_path, model):
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert read_checkpoint(bare).source == "state-dict"
    own = tmp_path / "own.pth"
    save_checkpoint(own, model.state_dict(), "float", SMALL, {"note": "x"})
    ckpt = read_checkpoint(own)
    assert ckpt.source == "lean-float" and ckpt.config == SMALL and ckpt.meta == {"note": "x"}
    official = tmp_path / "official.pth"
    save_official(official, model.state_dict())
    assert set(read_checkpoint(official).state_dict) == set(model.state_dict())


def test_config_is_inferred_from_stored_tensors(model):
    assert infer_config(model.state_dict(), cameras=2) == SMALL
    assert infer_config(build_camera(CameraConfig(image_size=(384, 1056))).state_dict()).image_size == (384, 1056)


def test_missing_file(tmp_path):
    with pytest.raises(LeanError) as e:
        read_checkpoint(tmp_path / "nope.pth")
    assert "does not exist" in one_line(e)


def test_not_a_checkpoint_says_what_the_file_looks_like(tmp_path, small_int8_export):
    """An .onnx, a text file, JSON, an empty file, random bytes: each named, no internal codes."""
    from lean.export import BACKBONE_FILE

    cases = {"junk.pth": (b"this is not a checkpoint at all\n" * 10, "is a text file"),
             "cfg.pth": (b'{"model": 1}', "is a JSON file"), "empty.pth": (b"", "is an empty file"),
             "bytes.pth": (bytes([7, 200, 3, 1]) * 8, "starts with bytes 07 c8 03 01"),
             "model.pth": ((small_int8_export[1] / BACKBONE_FILE).read_bytes(), "is an ONNX model")}
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LeanError) as e:
            read_checkpoint(path)
        assert words in one_line(e) and "not a PyTorch checkpoint: pass the .pth file" in one_line(e), one_line(e)


def test_a_lightning_model_prefix_is_stripped(tmp_path, model):
    torch.save({"state_dict": {"model.encoders.camera." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "lightning.ckpt")
    assert read_checkpoint(tmp_path / "lightning.ckpt").source == "mit"


def test_a_missing_frustum_is_named_as_the_file_spells_it(tmp_path, model):
    from lean.build import build_model

    sd = {"img_backbone." + k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    sd.update({"img_neck." + k[len("neck."):]: v for k, v in model.state_dict().items() if k.startswith("neck.")})
    sd.update({"view_transform." + k[len("vtransform."):]: v for k, v in model.state_dict().items()
               if k.startswith("vtransform.") and k != "vtransform.frustum"})
    torch.save({"state_dict": sd}, tmp_path / "mmdet3d.pth")
    ckpt = read_checkpoint(tmp_path / "mmdet3d.pth")
    with pytest.raises(LeanError) as e:
        build_model(ckpt, SMALL, "fp16")
    assert "1 missing (first: view_transform.frustum)" in one_line(e) and "pass --rebuild-frustum" in one_line(e)


def test_truncated_checkpoint(tmp_path, model):
    path = tmp_path / "cut.pth"
    save_official(path, model.state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    one_line(e)


def test_no_camera_keys(tmp_path):
    path = tmp_path / "lidar.pth"
    torch.save({"state_dict": {"encoders.lidar.x": torch.zeros(1)}}, path)
    with pytest.raises(LeanError) as e:
        read_checkpoint(path)
    text = one_line(e)
    assert "no camera branch in a known layout" in text and "key prefixes of its weights: encoders.lidar." in text
    for known in ("encoders.camera.backbone.*", "img_backbone.*", "image_backbone.*", "backbone.*"):
        assert known in text


def test_wrong_keys_name_the_offenders(model):
    sd = dict(model.state_dict())
    sd.pop("backbone.layer1.0.conv1.weight")
    sd["backbone.layer9.weight"] = torch.zeros(1)
    with pytest.raises(LeanError) as e:
        load_weights(build_camera(SMALL), sd)
    text = one_line(e)
    assert "backbone.layer1.0.conv1.weight" in text and "backbone.layer9.weight" in text


def test_frustum_of_another_image_size_says_so(model):
    big = build_camera(CameraConfig(cameras=2, image_size=(128, 352))).state_dict()
    sd = dict(model.state_dict())
    sd["vtransform.frustum"] = big["vtransform.frustum"]
    with pytest.raises(LeanError) as e:
        load_weights(build_camera(SMALL), sd)
    text = one_line(e)
    assert "vtransform.frustum" in text and "--image-size" in text and "--rebuild-frustum" in text


# -- checkpoints in the wild: each trainer's layout, built and saved by tests/trainers.py ----------
WILD = {  # name: (saver, builder kwargs, expected source_format, expected variant)
    "mit-camera-only": ("mit", dict(backbone="swint", vtransform="lss"), "mit", "swint+generalized_lss_fpn+lss"),
    "mmdet3d": ("mmdet3d", dict(backbone="swint"), "mmdet3d", "swint+generalized_lss_fpn+depth_lss"),
    "openpcdet": ("openpcdet", dict(backbone="swint"), "openpcdet", "swint+generalized_lss_fpn+depth_lss"),
    "awml": ("awml", dict(backbone="resnet50", vtransform="awml"), "awml", "resnet50+generalized_lss_fpn+awml"),
    "awml-no-bias": ("awml", dict(backbone="resnet50", vtransform="awml", depthnet_bias=False, dtransform_bias=False),
                     "awml", "resnet50+generalized_lss_fpn+awml"),
    "awml-mixed-bias": ("awml", dict(backbone="resnet50", vtransform="awml", depthnet_bias=False), "awml",
                        "resnet50+generalized_lss_fpn+awml"),
    "awml-camera-only": ("awml", dict(backbone="swint", vtransform="awml_lss"), "awml",
                         "swint+generalized_lss_fpn+awml_lss"),
    "mit-det": ("mit", dict(backbone="resnet50"), "mit", "resnet50+generalized_lss_fpn+depth_lss"),
}
WILD_GRID = (-51.2, 51.2, 0.8)


@pytest.fixture(scope="module")
def wild_inputs():
    img, depth = sample_inputs(SMALL)
    return img, depth


@pytest.mark.parametrize("case", list(WILD))
def test_trainer_checkpoints_are_detected_and_compute_what_the_trainer_computes(tmp_path, wild_inputs, case):
    from lean.build import build_model, resolve_config

    from trainers import SAVERS, make_trainer_camera

    saver, kw, source, variant = WILD[case]
    img, depth = wild_inputs
    theirs = make_trainer_camera(img, depth, xbound=WILD_GRID, **kw)
    SAVERS[saver](theirs, tmp_path / "ckpt.pth")
    ckpt = read_checkpoint(tmp_path / "ckpt.pth")
    cfg = resolve_config(ckpt, cameras=SMALL.cameras)
    assert (ckpt.source, ckpt.kind, cfg.variant) == (source, "float", variant)
    assert (cfg.image_size, cfg.xbound, cfg.bev_grid) == (SMALL.image_size, WILD_GRID, (128, 128, 1))
    assert (cfg.depthnet_bias, cfg.dtransform_bias) == (kw.get("depthnet_bias", True), kw.get("dtransform_bias", True))
    assert not any(k.split(".")[0] not in ("backbone", "neck", "vtransform") for k in ckpt.state_dict)
    ours = build_model(ckpt, cfg, "fp16")  # strict load: every key and shape of theirs has its place
    with torch.no_grad():
        feature, weights = ours(img, depth if cfg.uses_depth else None)
        their_weights, their_feature = theirs(img, depth)
    for a, b in ((feature.permute(0, 3, 1, 2), their_feature), (weights, their_weights)):
        assert torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0) > 0.999999


def test_non_default_depthnet_width_is_read_from_the_keys():
    cfg = SMALL.replace(depthnet_channels=128)
    assert infer_config(build_camera(cfg).state_dict(), cameras=2) == cfg


def test_data_parallel_prefix_and_older_mmdet3d_names(tmp_path, model):
    sd = {f"module.img_backbone.{k[9:]}" if k.startswith("backbone.") else
          f"module.img_neck.{k[5:]}" if k.startswith("neck.") else f"module.{k}": v
          for k, v in model.state_dict().items()}  # vtransform.* kept: older mmdet3d's name
    torch.save({"state_dict": sd}, tmp_path / "ddp.pth")
    ckpt = read_checkpoint(tmp_path / "ddp.pth")
    assert ckpt.source == "mmdet3d" and set(ckpt.state_dict) == set(model.state_dict())


def test_mmengine_extras_are_never_read_as_weights(tmp_path, model):
    """An mmengine file: the message hub's HistoryBuffers and numpy arrays, the optimizer state and
    the schedulers are passed over; only the state dict's tensors come back."""
    from trainers import mmengine_checkpoint, mmengine_installed

    sd = {("img_backbone." + k[9:]) if k.startswith("backbone.") else ("img_neck." + k[5:]) if k.startswith("neck.")
          else "view_transform." + k[11:]: v for k, v in model.state_dict().items()}
    with mmengine_installed():
        torch.save(mmengine_checkpoint(sd), tmp_path / "epoch_12.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "epoch_12.pth", weights_only=True)  # why the restricted reader is needed
    ckpt = read_checkpoint(tmp_path / "epoch_12.pth")
    assert ckpt.source == "mmdet3d" and set(ckpt.state_dict) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt.state_dict.items())


def test_layouts_that_cannot_be_built_say_why(tmp_path, model):
    sd = model.state_dict()
    resnet18 = {k: v for k, v in sd.items() if ".conv3." not in k and ".bn3." not in k}
    no_downsample = {k: v for k, v in sd.items() if not k.startswith("vtransform.downsample.")}
    for bad, words in ((resnet18, "ResNet of basic blocks"), (no_downsample, "downsample=1")):
        torch.save({"state_dict": {"encoders.camera." + k: v for k, v in bad.items()}}, tmp_path / "x.pth")
        with pytest.raises(LeanError) as e:
            infer_config(read_checkpoint(tmp_path / "x.pth").state_dict)
        assert words in one_line(e)
    many = {f"part{i}.x": torch.zeros(1) for i in range(12)}
    torch.save({"module." + k: v for k, v in many.items()}, tmp_path / "x.pth")
    with pytest.raises(LeanError) as e:
        read_checkpoint(tmp_path / "x.pth")
    assert "weights: part0., part1." in one_line(e) and "(+4 more)" in one_line(e)


# -- property-based fuzzing: damaged checkpoint bytes end in a LeanError, never a traceback or a hang --
import contextlib  # noqa: E402
import io  # noqa: E402
import signal  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Hung(BaseException):
    """Not an Exception: no handler of the code under test may turn it into a LeanError."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def stop(signum, frame):
        raise Hung(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _seed_files() -> dict[str, bytes]:
    """Small valid files of each kind the reader takes: zip, legacy stream, mmengine, own format."""
    from trainers import mmengine_checkpoint, mmengine_installed

    sd = {"encoders.camera.backbone.conv1.weight": torch.randn(4, 3, 1, 1), "encoders.camera.vtransform.dx": torch.ones(3),
          "encoders.camera.vtransform.frustum": torch.rand(3, 2, 2, 3)}
    out = {}
    for name, save in (("zip", lambda f: torch.save({"state_dict": sd}, f)),
                       ("legacy", lambda f: torch.save({"state_dict": sd}, f, _use_new_zipfile_serialization=False)),
                       ("own", lambda f: torch.save({"format": "lean.camera", "format_version": 1, "kind": "float",
                                                     "config": SMALL.to_dict(), "state_dict": sd, "meta": {}}, f))):
        buf = io.BytesIO()
        save(buf)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    with mmengine_installed():
        torch.save(mmengine_checkpoint({k.replace("encoders.camera.backbone.", "img_backbone.").replace(
            "encoders.camera.vtransform.", "view_transform."): v for k, v in sd.items()}), buf)
    out["mmengine"] = buf.getvalue()
    return out


SEEDS = _seed_files()


@st.composite
def damaged(draw):
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete"] if data else ["insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=damaged())
def test_fuzzed_checkpoint_bytes_never_traceback_or_hang(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.pth"
    path.write_bytes(data)
    with time_limit(30):
        try:
            ckpt = read_checkpoint(path)
            infer_config(ckpt.state_dict)
        except LeanError as e:
            assert str(e) and "\n" not in str(e)


def test_saved_archives_carry_no_temporary_name_and_a_full_disk_is_one_line(tmp_path, model, monkeypatch):
    import zipfile

    save_official(tmp_path / "a.pth", model.state_dict())
    assert {n.split("/")[0] for n in zipfile.ZipFile(tmp_path / "a.pth").namelist()} == {"archive"}

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(LeanError) as e:
        save_official(tmp_path / "a.pth", model.state_dict())
    assert "cannot write" in one_line(e) and "free space" in one_line(e)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]
