"""The CUDA-graphed engine on a GPU (marked ``cuda``: skipped without one; bench/gpu_check.sh runs them).

Each test can fail on a graph bug, not only on a crash:
- graphed **fp32** against eager **fp32** (TF32 off, deterministic cuDNN, the same cached cuDNN algorithms,
  NCHW) over several steps: losses, parameters, BatchNorm buffers and momentum buffers, at a tolerance
  bf16 rounding could not meet;
- a replayed step's random starts follow ``torch.manual_seed`` (same seed: bitwise the same update; another
  seed: another update), and a steady-state replay makes no host sync (``set_sync_debug_mode("error")``);
- a new epoch and a resumed optimizer (new momentum buffers) are captured anew, and the replays then update
  the new buffers; MAT-MP (l1 and MSD attacks) and CAT capture; ResNet-18 at batch 128 captures;
- ``python -m fastcollab.train`` runs two epochs end to end with the graphed engine, which does not fall back.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.throughput import build_cohort
from fastcollab.engine import EagerEngine, Precision
from fastcollab.methods import StepContext

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dev():
    return torch.device("cuda")


def _batches(n, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (b,), generator=g).cuda())
            for _ in range(n)]


def _graphed(cohort, **kw):
    from fastcollab.engine.graphed import GraphedEngine
    return GraphedEngine(cohort, kw.pop("precision", Precision(_dev())), **kw)


def _state(cohort) -> dict:
    """Parameters, BN buffers and SGD momentum buffers, by name."""
    out = {}
    for n, m in cohort.models.items():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                out[f"{n}.{k}"] = v.detach().float().clone()
        opt = cohort.optimizers.get(n)
        if opt is not None:
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    out[f"{n}.momentum[{i}]"] = buf.detach().float().clone()
    return out


@torch.no_grad()
def _restore(cohort, state: dict) -> None:
    """Write ``state`` back in place (same addresses: the graph stays valid)."""
    for n, m in cohort.models.items():
        for k, v in m.state_dict().items():
            if f"{n}.{k}" in state:
                v.copy_(state[f"{n}.{k}"])
        opt = cohort.optimizers.get(n)
        if opt is not None:
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.copy_(state[f"{n}.momentum[{i}]"])


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off, deterministic cuDNN, benchmark on for both engines (same shapes, same cached algorithms)."""
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
    b.cudnn.deterministic = b.cudnn.benchmark = True
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved


def _steps(engine, batches, seed=7, ctx=None):
    losses = []
    for i, (x, y) in enumerate(batches):
        engine.cohort.set_epoch_time(0.0)
        torch.manual_seed(seed + i)
        losses.append(float(engine.step(x, y, ctx or StepContext()).total))
    return losses


@pytest.mark.parametrize("method", ["mat", "cat"])
def test_graphed_fp32_matches_eager_fp32_tightly(method):
    batches = _batches(6, 32)
    ce, cg = build_cohort(method, "smallcnn", _dev()), build_cohort(method, "smallcnn", _dev())
    with _exact_fp32():
        eager = EagerEngine(ce, Precision(_dev()))
        graphed = _graphed(cg, warmup_steps=2, channels_last=False)
        le, lg = _steps(eager, batches), _steps(graphed, batches)
    assert graphed.fallback_reason is None, graphed.fallback_reason
    assert graphed.captures == 1 and graphed.replays == len(batches) - 2
    for a, b in zip(le, lg):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (le, lg)
    se, sg = _state(ce), _state(cg)
    assert se.keys() == sg.keys() and any(".momentum[" in k for k in se) and any("running_var" in k for k in se)
    for k in se:     # per tensor, relative to its norm (bf16 rounding would be ~1e-2)
        assert (sg[k] - se[k]).norm() <= 1e-4 * se[k].norm() + 1e-6, (k, (sg[k] - se[k]).norm(), se[k].norm())


def test_replayed_random_starts_follow_manual_seed_and_do_not_sync():
    cohort = build_cohort("mat", "smallcnn", _dev())
    g = _graphed(cohort, warmup_steps=1)
    batches = _batches(3, 16)
    _steps(g, batches[:2])                               # warm-up, capture (+ replay)
    assert g.captures == 1 and g.fallback_reason is None
    s0 = _state(cohort)
    after = {}
    for seed in (5, 5, 6):
        _restore(cohort, s0)
        torch.manual_seed(seed)
        torch.cuda.set_sync_debug_mode("error")          # a steady-state replay: no host sync at all
        try:
            g.step(*batches[2], StepContext())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        after.setdefault(seed, []).append(_state(cohort))
    assert g.captures == 1 and g.replays == 4
    first, again, other = after[5][0], after[5][1], after[6][0]
    assert all(torch.equal(first[k], again[k]) for k in first)          # same seed: the same random starts
    assert any(not torch.equal(first[k], other[k]) for k in first)      # another seed: other random starts


def test_recapture_on_new_epoch_and_after_resume():
    cohort = build_cohort("mat", "smallcnn", _dev())
    g = _graphed(cohort, warmup_steps=1)
    batches = _batches(6, 16)
    _steps(g, batches[:3], ctx=StepContext(epoch=0, epochs=2))
    assert g.captures == 1
    _steps(g, batches[3:4], ctx=StepContext(epoch=1, epochs=2))
    assert g.captures == 2 and g.fallback_reason is None
    # --resume: the optimizer's state is loaded, which replaces every momentum buffer
    opt = cohort.optimizers["p0"]
    opt.load_state_dict(opt.state_dict())
    new_bufs = [opt.state[p]["momentum_buffer"] for grp in opt.param_groups for p in grp["params"]]
    before = [b.clone() for b in new_bufs]
    _steps(g, batches[4:6], ctx=StepContext(epoch=1, epochs=2))
    assert g.captures == 3 and g.fallback_reason is None
    assert any(not torch.equal(a, b) for a, b in zip(before, new_bufs))   # the replay updated the new buffers


@pytest.mark.parametrize("method,overrides", [
    ("mat-mp", {"strategy": "avg", "specialist_norms": ["linf", "l2", "l1"], "specialist_steps": [3, 3, 3]}),
    ("mat-mp", {"strategy": "msd", "specialist_norms": ["linf", "l2", "l1"], "specialist_steps": [3, 3, 3],
                "msd_steps": 3}),
    ("cat", {}),
])
def test_multi_norm_and_cat_cohorts_capture(method, overrides):
    cohort = build_cohort(method, "smallcnn", _dev(), overrides=overrides)
    g = _graphed(cohort, warmup_steps=1, precision=Precision(_dev(), amp=True))
    losses = _steps(g, _batches(4, 16))
    assert g.fallback_reason is None, g.fallback_reason
    assert g.captures == 1 and g.replays == 3
    assert all(torch.isfinite(torch.tensor(losses)))


def test_resnet18_batch128_captures_and_replays():
    cohort = build_cohort("mat", "resnet18", _dev())
    g = _graphed(cohort, precision=Precision(_dev(), amp=True))
    s0 = _state(cohort)
    losses = _steps(g, _batches(6, 128))
    assert g.fallback_reason is None, g.fallback_reason
    assert g.captures == 1 and g.replays == 6 - 3
    assert all(torch.isfinite(torch.tensor(losses)))
    s1 = _state(cohort)
    assert all(k in s1 for k in s0) and any(not torch.equal(s0[k], s1[k]) for k in s0)


def test_cudnn_benchmark_setting_is_the_callers():
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        g = _graphed(build_cohort("mat", "smallcnn", _dev()), warmup_steps=1)
        _steps(g, _batches(3, 16))
        assert g.captures == 1 and torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = prev


def test_train_end_to_end_two_epochs(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastcollab.train", "--method", "mat", "--model", "smallcnn", "--dataset",
           "synthetic:512", "--epochs", "2", "--batch-size", "64", "--device", "cuda", "--engine", "fast",
           "--amp", "--final-eval-size", "64", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "falls back to eager" not in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "engine fast" in r.stdout
    final = json.loads((out / "final.json").read_text())
    assert final["test_images"] == 64
    assert "epoch 2/2" in r.stdout
