"""The benchmark's results and table: every ``--only`` combination, on a machine with or without
an earlier results file (a part never measured there has no row, and nothing raises)."""

import itertools
import json

import pytest

from bench import suite
from bench.suite import PARTS, table

from helpers import ROOT

# Which results keys each part writes (run_bench): "latency" re-runs the exports it times.
KEYS = {
    "export": ("export_int8", "export_fp16", "export_int8_trt8", "floor", "export_vs_floor"),
    "calibration": ("calibration", "calibration_max"),
    "nuscenes": ("ptq_throughput", "ptq_memory"),
    "latency": ("latency", "export_int8", "export_fp16", "export_int8_trt8", "floor", "export_vs_floor"),
    "ranges": ("ranges",),
}
# A row of the table for each part.
ROW = {"export": "INT8 export wall", "calibration": "calibration (mse", "nuscenes": "PTQ end to end",
       "latency": "ORT CPU latency", "ranges": "FP32 range measurement"}


@pytest.fixture(scope="module")
def measured():
    """Every part's real figures, from the results files committed in bench/results."""
    res = {}
    for name in ("cuda-nvidia-h100-80gb-hbm3", "cuda-nvidia-h200"):
        res.update(json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text()))
    assert all(k in res for keys in KEYS.values() for k in keys)
    return res


def results(measured, parts, device="cuda"):
    res = {k: measured[k] for p in parts for k in KEYS[p]}
    return dict(res, machine="cuda-test", device=device)


COMBINATIONS = [c for n in range(1, len(PARTS) + 1) for c in itertools.combinations(PARTS, n)]


@pytest.mark.parametrize("earlier", [False, True], ids=["no-results-file", "with-results-file"])
def test_every_only_combination_renders(measured, earlier):
    assert set(KEYS) == set(PARTS) and len(COMBINATIONS) == 31
    for parts in COMBINATIONS:
        res = results(measured, [p for p in PARTS if p not in parts]) if earlier else {}
        res.update(results(measured, parts))  # run_bench: the parts measured now over the file's
        text = table(res)
        shown = {p for p in PARTS if ROW[p] in text}
        want = set(PARTS) if earlier else set(parts) | ({"export"} if "latency" in parts else set())
        assert shown == want, (parts, earlier)


def test_render_without_a_section_or_export_figures(measured, tmp_path, monkeypatch):
    """``--render`` of a results file that holds no export figures, for a machine BENCHMARKS.md has
    no section for yet."""
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results(measured, ["calibration", "nuscenes"])))
    suite.render(path)
    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- cuda-test -->" in doc and "PTQ end to end" in doc and "INT8 export wall" not in doc
