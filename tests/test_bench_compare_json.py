"""bench.throughput --compare: the JSON schema of its columns, on a tiny CPU run (the CUDA run adds eager bf16).

A graphed engine that fell back must be reported as fallen back, never as "fast": here a GraphedEngine on the
CPU (which falls back, "CUDA graphs need a CUDA device") stands in for a GPU capture that failed.
"""
import json

import pytest
import torch

from bench import throughput as T
from fastcollab.engine.graphed import GraphedEngine

ARGS = ["--compare", "--method", "mat", "--model", "smallcnn", "--batch-size", "8", "--steps", "1", "--warmup", "1",
        "--no-flops", "--device", "cpu"]


def _run(tmp_path, extra=()):
    path = tmp_path / "cmp.json"
    assert T.main(ARGS + list(extra) + ["--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_compare_json_columns_on_cpu(tmp_path):
    out = _run(tmp_path)
    for key in ("eager", "eager_bf16", "fast", "ratio", "graph_ratio", "fallback_reason", "captures", "replays",
                "same_losses", "max_loss_diff", "tf32", "memory"):
        assert key in out, key
    assert out["eager_bf16"] is None and "CPU" in out["eager_bf16_skipped"]      # CPU: the columns that apply
    assert out["fallback_reason"] is None and "fast_fell_back" not in out
    assert out["fast"]["images_per_s"] > 0 and out["eager"]["images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["fast"]["images_per_s"] / out["eager"]["images_per_s"])
    assert set(out["tf32"]) == {"matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision",
                                "cudnn_benchmark"}
    assert out["eager"]["precision"] in ("fp32", "tf32") and "peak_step_memory_mib" in out["fast"]
    assert out["same_losses"] is True


def test_a_fallen_back_graphed_engine_is_not_reported_as_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "make_engine", lambda name, cohort, precision, view_bn: GraphedEngine(cohort, precision,
                                                                                                  view_bn))
    with pytest.warns(RuntimeWarning, match="falls back"):
        out = _run(tmp_path)
    assert out["fast"] is None and out["ratio"] is None and out["graph_ratio"] is None
    assert out["fallback_reason"] == "CUDA graphs need a CUDA device"
    assert out["fast_fell_back"]["engine"].startswith("fast (FELL BACK") and out["ratio_fell_back_vs_eager"] > 0
    assert out["captures"] == 0 and out["replays"] == 0


@pytest.mark.parametrize("name,kind,peak", [("NVIDIA H100 80GB HBM3", "bf16", 989.0),
                                            ("NVIDIA H100 PCIe", "bf16", 756.0),
                                            ("NVIDIA H100 PCIe", "tf32", 378.0),
                                            ("NVIDIA H200", "bf16", 989.0),
                                            ("NVIDIA H200 NVL", "bf16", 835.0),
                                            ("NVIDIA A100-SXM4-80GB", "bf16", None)])
def test_peak_follows_the_device_name(name, kind, peak):
    assert T.peak_tflops(torch.device("cuda"), kind, name=name) == peak
