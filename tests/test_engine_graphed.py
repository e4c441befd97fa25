"""The graphed engine's host-side decisions, on the CPU (its CUDA behaviour: test_engine_graphed_cuda.py).

What runs here without a GPU: the capture policy (warm-up, new shapes, re-capture, one retry, fallback), the
whole chained error of a failed capture, the tensor-lr SGD step against torch.optim.SGD, cudnn.benchmark
scoping, and the engine's step plumbing with the CUDA calls replaced by stand-ins (a capture that fails
with a chained error must retry once and then fall back, saying why in stats() and in a warning).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from bench.throughput import build_cohort
from fastcollab.attacks import AttackSpec, random_init
from fastcollab.engine import EagerEngine, Precision
from fastcollab.engine import graphed as G
from fastcollab.methods import StepContext

CPU = torch.device("cpu")
LONG = "x" * 400   # longer than the 160 characters the old engine kept


def _failing_capture():
    """What torch.cuda.graph does when the body fails: capture_end raises while the real error is handled."""
    try:
        try:
            raise RuntimeError(f"operation not permitted when stream is capturing: root {LONG}")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        return e


def test_error_chain_keeps_root_cause_first_and_whole():
    text = G.error_chain(_failing_capture())
    assert text.startswith("RuntimeError: operation not permitted when stream is capturing")
    assert LONG in text and "previous error during capture" in text
    assert text.index("root") < text.index("previous error")
    try:
        raise ValueError("outer") from KeyError("inner")
    except ValueError as e:
        assert G.error_chain(e) == "KeyError: 'inner' | then, while handling it: ValueError: outer"


def test_capture_policy_warmup_new_shape_recapture_retry_fallback():
    p = G.CapturePolicy(warmup_steps=2)
    a, b = ("shape", 32), ("shape", 8)
    for _ in range(2):
        assert p.next_action("k1", a) == "warmup"
        p.warmed(a)
    assert p.next_action("k1", a) == "capture"
    p.captured("k1")
    assert p.next_action("k1", a) == "replay"
    p.replayed()
    assert p.next_action("k2", a) == "capture"             # a new epoch / new hyper-parameters: re-capture
    assert p.next_action("k3", b) == "warmup"              # a new shape is warmed up before it is captured
    p.warmed(b)
    assert p.next_action("k3", b) == "capture"
    assert not p.failed("transient", b)                    # first failure: one retry, after a warm-up step
    assert p.fallback_reason is None and p.next_action("k3", b) == "warmup"
    p.warmed(b)
    assert p.next_action("k3", b) == "capture"
    p.captured("k3")                                       # success resets the failure count
    assert p.failures == 0
    assert not p.failed("first", a)
    p.warmed(a)
    assert p.failed("second " + LONG, a)                   # two in a row: eager for good
    assert p.next_action("k1", a) == "eager"
    assert "2 times" in p.fallback_reason and LONG in p.fallback_reason
    assert p.errors == ["transient", "first", "second " + LONG]


@pytest.mark.parametrize("cfg", [dict(momentum=0.9, weight_decay=5e-4), dict(momentum=0.9, nesterov=True),
                                 dict(momentum=0.5, dampening=0.3, weight_decay=1e-2), dict(momentum=0.0)])
def test_tensor_lr_sgd_step_matches_torch_sgd(cfg):
    torch.manual_seed(0)
    ref = torch.nn.Linear(5, 3).double()        # float64: a wrong formula cannot hide in fp32 rounding
    mine = torch.nn.Linear(5, 3).double()
    mine.load_state_dict(ref.state_dict())
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1, **cfg)
    o_mine = torch.optim.SGD(mine.parameters(), lr=0.1, **cfg)
    lr = [torch.tensor(0.0, dtype=torch.float64)]
    for i in range(4):
        x = torch.randn(7, 5, dtype=torch.float64)
        for m in (ref, mine):
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
        for o in (o_ref, o_mine):
            o.param_groups[0]["lr"] = 0.1 / (i + 1)
        o_ref.step()
        lr[0].fill_(o_mine.param_groups[0]["lr"])
        G.sgd_step({"p": o_mine}, {"p": lr})
        for a, b in zip(ref.parameters(), mine.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        if cfg["momentum"]:
            for p_ref, p_mine in zip(ref.parameters(), mine.parameters()):
                torch.testing.assert_close(o_mine.state[p_mine]["momentum_buffer"],
                                           o_ref.state[p_ref]["momentum_buffer"], rtol=1e-12, atol=1e-14)


def test_sgd_hyper_key_changes_with_baked_in_hyperparameters():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    k = G.sgd_hyper_key({"p": opt})
    opt.param_groups[0]["lr"] = 0.01
    assert G.sgd_hyper_key({"p": opt}) == k              # lr is a device tensor: no re-capture
    opt.param_groups[0]["weight_decay"] = 0.0
    assert G.sgd_hyper_key({"p": opt}) != k


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_benchmark_is_scoped(before):
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before
    try:
        with G.cudnn_benchmark():
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is before
    finally:
        torch.backends.cudnn.benchmark = prev


def test_graphed_engine_on_cpu_falls_back_and_says_why():
    prev = torch.backends.cudnn.benchmark
    with pytest.warns(RuntimeWarning, match="falls back to eager: CUDA graphs need a CUDA device"):
        g = G.GraphedEngine(build_cohort("mat", "smallcnn", CPU), Precision(CPU))
    assert torch.backends.cudnn.benchmark == prev
    s = g.stats()
    assert s["fallback_reason"] == "CUDA graphs need a CUDA device" and s["graphed"] is False
    assert set(s) >= {"engine", "fallback_reason", "captures", "replays", "capture_errors"}
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert torch.isfinite(g.step(x, y, StepContext()).total)


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls of the engine's step plumbing, replaced by stand-ins (the eager math runs on the CPU)."""
    monkeypatch.setattr(G.GraphedEngine, "_why_not", lambda self: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(G.GraphedEngine, "_warmup_step",
                        lambda self, x, y, ctx: G.detached(EagerEngine.step(self, x, y, ctx)))


def test_failed_capture_retries_once_then_falls_back_with_the_whole_chain(fake_cuda, monkeypatch):
    calls = []

    def capture(self, x, y, ctx):
        calls.append(tuple(x.shape))
        raise _failing_capture()

    monkeypatch.setattr(G.GraphedEngine, "_capture", capture)
    g = G.GraphedEngine(build_cohort("mat", "smallcnn", CPU), Precision(CPU), warmup_steps=1, channels_last=False)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        results = [g.step(x, y, StepContext()) for _ in range(4)]
    # step 1 warms up; step 2's capture fails, it runs as a warm-up; step 3's retry fails: eager from then on
    assert len(calls) == 2
    assert g.fallback_reason is not None
    assert "operation not permitted when stream is capturing" in g.fallback_reason and LONG in g.fallback_reason
    assert any("falls back to eager" in str(m.message) and LONG in str(m.message) for m in w)
    s = g.stats()
    assert s["graphed"] is False and s["captures"] == 0 and len(s["capture_errors"]) == 2
    assert g.name.startswith("eager")
    for r in results:                                       # every step still trained
        assert torch.isfinite(r.total)
    assert results[0].total.grad_fn is None and results[1].total.grad_fn is None   # warm-ups hold no graph


def test_epoch_and_hyperparameters_key_the_graph(fake_cuda):
    g = G.GraphedEngine(build_cohort("mat", "smallcnn", CPU), Precision(CPU), warmup_steps=1, channels_last=False)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    k0 = g._key(x, y, StepContext(epoch=0, epochs=2))
    assert g._key(x, y, StepContext(epoch=1, epochs=2)) != k0
    assert g._key(x[:2], y[:2], StepContext(epoch=0, epochs=2)) != k0
    opt = g.cohort.optimizers["p0"]
    opt.param_groups[0]["lr"] = 0.5
    assert g._key(x, y, StepContext(epoch=0, epochs=2)) == k0
    opt.param_groups[0]["momentum"] = 0.5
    assert g._key(x, y, StepContext(epoch=0, epochs=2)) != k0


def test_l1_random_start_follows_torch_seed_and_stays_in_the_ball():
    x = torch.rand(6, 3, 8, 8)
    spec = AttackSpec(norm="l1", eps=2.0, step=0.1, init="uniform")
    torch.manual_seed(3)
    a = random_init(x, spec)
    torch.manual_seed(3)
    b = random_init(x, spec)
    torch.manual_seed(4)
    c = random_init(x, spec)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device == x.device and a.dtype == x.dtype
    assert ((a - x).abs().flatten(1).sum(1) <= 2.0 + 1e-5).all()
    assert ((a - x).abs().flatten(1).sum(1) > 0).all()
