"""bench/gpu_check.sh, the prepared GPU check: its shell parses, and its CPU dry run (DRY_RUN=1) runs every
step's logic (timeouts, step records, the steps' JSON, summary.json) on this machine, CPU-sized."""
import json
import os
import shutil
import subprocess

import pytest

from bench.gpu_check import busy_fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def test_gpu_check_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_busy_fraction_is_the_union_of_intervals():
    assert busy_fraction([(0, 2), (1, 3), (5, 6)], 10) == pytest.approx(0.4)
    assert busy_fraction([], 10) == 0.0


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "STEPS_ONLY": "env,throughput,profile"}   # the steps with logic of their own
    r = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    skipped = "skipped (not in STEPS_ONLY)"
    assert status == {"env": "ok", "build": skipped, "backends": skipped, "cuda_tests": skipped, "throughput": "ok",
                      "profile": "ok", "throughput_wrn34": skipped}
    assert summary["ok"] is True
    thr = summary["throughput"]
    assert {"eager", "eager_bf16", "fast", "fallback_reason", "tf32"} <= set(thr)
    assert summary["profile"]["kernels_per_step"] > 0 and 0 < summary["profile"]["busy_percent"] <= 100
    assert summary["env"]["torch"] and (out / "throughput.log").exists()
