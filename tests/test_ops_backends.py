"""Every backend of the fused ops (fastcollab.ops) against the reference, plus opcheck, validation,
torch.compile and the nn.Module twins."""
import warnings

import pytest
import torch

from fastcollab import nn as fnn
from fastcollab import ops
from fastcollab import reference as R
from fastcollab.engine.fast import ops_backend
from fastcollab.errors import FastcollabError

# Triton under the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) is tested by
# tests/test_triton_*.py; here Triton is exercised only on a GPU (keeps this file fast on CPU).
BACKENDS = [b for b in ops.available_backends() if b != "triton" or torch.cuda.is_available()]
FUSED = [b for b in BACKENDS if b != "reference"]
SHAPES = [(1, 10), (7, 100), (128, 1000), (512, 10), (7, 1000), (512, 100)]


@pytest.fixture(autouse=True)
def _reset():
    torch.manual_seed(0)
    yield
    ops.set_backend(None)


def use(backend):
    ops.set_backend(backend)
    assert ops.resolve("kl_div", "cpu") == backend or backend == "triton"


def _imgs(shape, dtype=torch.float32):
    x = torch.rand(shape, dtype=dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = 1.0
    xa = (x + 0.02 * torch.randn(shape, dtype=dtype)).clamp(0, 1)
    g = torch.randn(shape, dtype=dtype)
    g.view(-1)[::5] = 0.0
    g.view(-1)[1::13] = -0.0
    return xa, g, x


def test_available_and_report():
    assert ops.available_backends()[0] == "reference"
    line = ops.backend_report("cpu")
    assert "\n" not in line and "pgd_step_=" in line and "triangle_huber=" in line
    with pytest.raises(FastcollabError, match="unknown backend"):
        ops.set_backend("cuda")


# --------------------------------------------------------------------------------------------- pgd
LINF_CASES = [(shape, per_peer) for shape in [(2, 128, 3, 32, 32), (1, 1, 1, 1), (7, 3, 5, 5), (3, 5, 1, 7, 3)]
              for per_peer in (False, True) if not per_peer or len(shape) == 5]  # per-peer eps needs a peer dim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,per_peer", LINF_CASES)
def test_linf_bit_exact(backend, shape, per_peer):
    use(backend)
    xa, g, x = _imgs(shape)
    if per_peer:
        P = shape[0]
        eps = torch.linspace(0.0, 0.1, P)
        step = torch.linspace(0.001, 0.03, P)
    else:
        eps, step = 8 / 255, 2 / 255
    want = R.pgd_step_(xa.clone(), g, x, eps, step, "linf")
    got = xa.clone()
    assert ops.pgd_step_(got, g, x, eps, step, "linf") is got
    assert torch.equal(got, want)
    if len(shape) == 5:  # clean images shared by the peers
        want2 = R.pgd_step_(xa.clone(), g, x[0], eps, step, "linf")
        got2 = ops.pgd_step_(xa.clone(), g, x[0], eps, step, "linf")
        assert torch.equal(got2, want2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linf_noncontiguous_and_float64(backend):
    use(backend)
    xa, g, x = _imgs((4, 3, 6, 6), torch.float64)
    want = R.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf")
    got = ops.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf")
    assert torch.equal(got, want)
    base = xa.clone().transpose(2, 3)  # non-contiguous view, updated in place
    gt, xt = g.transpose(2, 3), x.transpose(2, 3)
    want = R.pgd_step_(base.clone(), gt, xt, 0.03, 0.01, "linf")
    ops.pgd_step_(base, gt, xt, 0.03, 0.01, "linf")
    assert torch.equal(base, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("shape", [(2, 64, 3, 32, 32), (1, 1, 2, 2), (7, 3, 5, 5)])
def test_l2_l1_match_reference(backend, norm, shape):
    use(backend)
    xa, g, x = _imgs(shape)
    lead = shape[:-3]
    if len(shape) == 5:
        eps, step = torch.tensor([1.0, 0.25]), torch.tensor([0.1, 0.02])
    else:
        eps, step = 0.5, 0.05
    k = torch.randint(5, 21, lead) if norm == "l1" else None
    want = R.pgd_step_(xa.clone(), g, x, eps, step, norm, l1_k=k)
    got = ops.pgd_step_(xa.clone(), g, x, eps, step, norm, l1_k=k)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    d = (got - x).flatten(-3)
    nrm = d.norm(dim=-1) if norm == "l2" else d.abs().sum(-1)
    e = eps[:, None] if isinstance(eps, torch.Tensor) else eps
    assert (nrm <= e * (1 + 1e-5) + 1e-6).all()
    assert (got >= 0).all() and (got <= 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_l1_random_k_and_int_k(backend):
    use(backend)
    xa, g, x = _imgs((3, 8, 3, 8, 8))
    out = ops.pgd_step_(xa.clone(), g, x, 2.0, 0.05, "l1")
    assert ((out - x).flatten(2).abs().sum(-1) <= 2.0 + 1e-5).all()
    want = R.pgd_step_(xa.clone(), g, x, 2.0, 0.05, "l1", l1_k=7)
    torch.testing.assert_close(ops.pgd_step_(xa.clone(), g, x, 2.0, 0.05, "l1", l1_k=7), want, atol=2e-6, rtol=0)
    kb = torch.randint(5, 21, (8,))  # one k per example, shared by the peers
    want = R.pgd_step_(xa.clone(), g, x, 2.0, 0.05, "l1", l1_k=kb)
    torch.testing.assert_close(ops.pgd_step_(xa.clone(), g, x, 2.0, 0.05, "l1", l1_k=kb), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (2, 5, 1, 3, 3), (1, 1, 1, 1)])
def test_project_l1_matches_reference(backend, shape):
    use(backend)
    d = torch.randn(shape) * torch.rand(shape[:-3] + (1, 1, 1)) * 0.1
    eps = torch.tensor([0.5, 3.0]) if len(shape) == 5 else 2.0
    want = R.project_l1_(d.clone(), eps)
    got = d.clone()
    assert ops.project_l1_(got, eps) is got
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    inside = d.flatten(-3).abs().sum(-1) <= (eps[:, None] if isinstance(eps, torch.Tensor) else eps) * 0.999
    assert torch.equal(got.flatten(-3)[inside], d.flatten(-3)[inside])
    again = ops.project_l1_(got.clone(), eps)
    torch.testing.assert_close(again, got, atol=1e-6, rtol=0)


def test_reduced_precision_images_fall_back():
    xa, g, x = _imgs((4, 3, 8, 8), torch.bfloat16)
    want = R.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in BACKENDS:
            ops.set_backend(b)
            assert torch.equal(ops.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf"), want)


# --------------------------------------------------------------------------------------------- losses
def _logits(B, C, n=4, requires_grad=True):
    return [(torch.randn(B, C) * 3).requires_grad_(requires_grad) for _ in range(n)]


LOSSES = {
    "kl_div": (["batchmean", "mean", "sum", "none"], lambda m, l, y, r: m.kl_div(l[0], l[1], 2.0, r, detach_teacher=False)),
    "kl_div_detached": (["batchmean", "none"], lambda m, l, y, r: m.kl_div(l[0], l[1], 1.0, r)),
    "boosted_ce": (["mean", "sum", "none"], lambda m, l, y, r: m.boosted_ce(l[0], y, r)),
    "trades_kl": (["batchmean", "mean", "sum", "none"], lambda m, l, y, r: m.trades_kl(l[0], l[1], r)),
    "mart_loss": ([None], lambda m, l, y, r: m.mart_loss(l[0], l[1], y, 6.0)),
    "logit_mse": (["mean", "sum", "none"], lambda m, l, y, r: m.logit_mse(l[0], l[1], r)),
    "triangle_huber": (["mean", "sum", "none"], lambda m, l, y, r: m.triangle_huber(l[0], l[1], l[2], l[3], y, 0.05, True, r)),
    "triangle_huber_logits": (["mean"], lambda m, l, y, r: m.triangle_huber(l[0], l[1], l[2], l[3], y, 1.0, False, r)),
}
LOSS_CASES = [(n, r) for n, (reds, _) in LOSSES.items() for r in reds]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("name,reduction", LOSS_CASES)
def test_loss_forward_and_grad(backend, B, C, name, reduction):
    fn = LOSSES[name][1]
    lg = _logits(B, C)
    y = torch.randint(0, C, (B,))
    # the truth: the reference evaluated in float64 at the same (fp32) inputs; the fp32 reference itself is
    # within these tolerances of it (checked too), and a wrong formula is off by O(1).
    want = fn(R, lg, y, reduction)
    w = torch.randn_like(want)  # a random upstream gradient (also checks the per-row scaling)
    want_g = torch.autograd.grad((want * w).sum(), lg, allow_unused=True)
    lg64 = [t.detach().double().requires_grad_() for t in lg]
    want64 = fn(R, lg64, y, reduction)
    want64_g = torch.autograd.grad((want64 * w.double()).sum(), lg64, allow_unused=True)
    use(backend)
    got = fn(ops, lg, y, reduction)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-6)
    torch.testing.assert_close(got.double(), want64, rtol=2e-5, atol=2e-6)
    got_g = torch.autograd.grad((got * w).sum(), lg, allow_unused=True)
    for a, b, b32 in zip(got_g, want64_g, want_g):
        assert (a is None) == (b is None) == (b32 is None)
        if a is not None:
            scale = b.abs().max().item() + 1e-30
            torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=1e-4)
            torch.testing.assert_close(b32.double() / scale, b / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_loss_dtypes(backend, dtype):
    use(backend)
    s = torch.randn(6, 10, dtype=dtype, requires_grad=True)
    t = torch.randn(6, 10, dtype=dtype)
    y = torch.randint(0, 10, (6,))
    for loss in (ops.kl_div(s, t), ops.boosted_ce(s, y), ops.mart_loss(t, s, y), ops.triangle_huber(s, s * 0.9, t, t, y)):
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        (g,) = torch.autograd.grad(loss, s)
        assert g.dtype == dtype and torch.isfinite(g).all()
    want = R.kl_div(s.double(), t.double())
    torch.testing.assert_close(ops.kl_div(s, t).double(), want, rtol=1e-5 if dtype == torch.float64 else 1e-4, atol=1e-6)


def test_loss_extreme_logits():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1000.0, 1000.0, 0.0], [50.0, -50.0, 0.0]])
    y = torch.tensor([0, 2])
    for b in BACKENDS:
        ops.set_backend(b)
        for loss in (ops.kl_div(s, t), ops.boosted_ce(s, y), ops.trades_kl(t, s), ops.mart_loss(t, s, y)):
            (g,) = torch.autograd.grad(loss, s)
            assert torch.isfinite(loss) and torch.isfinite(g).all(), b


# --------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases(backend):
    xa, g, x = _imgs((2, 3, 3, 4, 4))
    l = _logits(5, 10, requires_grad=True)
    y = torch.randint(0, 10, (5,))
    return [
        (torch.ops.fastcollab.pgd_step, (xa.clone(), g, x, 0.03, 0.01, None, None, "linf", None, backend)),
        (torch.ops.fastcollab.pgd_step, (xa.clone(), g, x, 0.0, 0.0, torch.tensor([0.5, 1.0]), torch.tensor([0.1, 0.2]), "l2", None, backend)),
        (torch.ops.fastcollab.pgd_step, (xa.clone(), g, x, 1.0, 0.05, None, None, "l1", torch.randint(5, 21, (2, 3)), backend)),
        (torch.ops.fastcollab.project_l1, (g.clone(), 1.0, None, backend)),
        (torch.ops.fastcollab.project_l1, (g.clone(), 0.0, torch.tensor([1.0, 100.0]), backend)),
        (torch.ops.fastcollab.kl_div_fwd, (l[0], l[1], 2.0, "batchmean", True, backend)),
        (torch.ops.fastcollab.kl_div_fwd, (l[0], l[1].detach(), 1.0, "none", False, backend)),
        (torch.ops.fastcollab.trades_kl_fwd, (l[0], l[1], "sum", backend)),
        (torch.ops.fastcollab.logit_mse_fwd, (l[0], l[1], "none", backend)),
        (torch.ops.fastcollab.boosted_ce_fwd, (l[0], y, "mean", backend)),
        (torch.ops.fastcollab.mart_loss_fwd, (l[0], l[1], y, 6.0, backend)),
        (torch.ops.fastcollab.triangle_huber_fwd, (l[0], l[1], l[2].detach(), l[3].detach(), y, 0.5, True, "mean", backend)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_public_ops(backend):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastcollab._C not built")
def test_opcheck_native_ops():
    xa, g, x = _imgs((2, 3, 3, 4, 4))
    a, b, c, d = _logits(5, 10, requires_grad=False)
    y = torch.randint(0, 10, (5,))
    F = torch.ops.fastcollab
    cases = [
        (F.native_pgd_step_, (xa.clone(), g, x, 0.03, 0.01, None, None, "linf", None)),
        (F.native_pgd_step_, (xa.clone(), g, x, 1.0, 0.05, None, torch.tensor([0.1, 0.2]), "l1", torch.randint(5, 21, (2, 3)))),
        (F.native_project_l1_, (g.clone(), 1.0, None)),
        (F.native_kl_div_fwd, (a, b, 1.0, "mean", True)),
        (F.native_boosted_ce_fwd, (a, y, "none")),
        (F.native_trades_kl_fwd, (a, b, "batchmean")),
        (F.native_logit_mse_fwd, (a, b, "sum")),
        (F.native_mart_loss_fwd, (a, b, y, 6.0)),
        (F.native_triangle_huber_fwd, (a, b, c, d, y, 1.0, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------------- validation
def test_validation_messages():
    xa, g, x = _imgs((2, 3, 4, 4))
    bad = [
        (lambda: ops.pgd_step_(xa, g, x, -0.1, 0.01), "eps must be >= 0"),
        (lambda: ops.pgd_step_(xa, g, x, 0.1, 0.0), "step must be > 0"),
        (lambda: ops.pgd_step_(xa, g, x, 0.1, 0.01, "linf2"), "unknown norm"),
        (lambda: ops.pgd_step_(xa, g[:1], x, 0.1, 0.01), "grad has shape"),
        (lambda: ops.pgd_step_(xa, g.double(), x, 0.1, 0.01), "dtype"),
        (lambda: ops.pgd_step_(xa, g, x, torch.tensor([0.1, 0.2]), 0.01), "per-peer eps"),
        (lambda: ops.pgd_step_(xa, g, x, 0.1, 0.01, "l1", l1_k=torch.ones(3, dtype=torch.long)), "l1_k must have shape"),
        (lambda: ops.pgd_step_(xa.flatten(1), g, x, 0.1, 0.01), "images must be"),
        (lambda: ops.pgd_step_(xa.clone().requires_grad_(), g, x, 0.1, 0.01), "detach"),
        (lambda: ops.project_l1_(xa.clone(), -1.0), "eps must be >= 0"),
        (lambda: ops.kl_div(torch.randn(3, 4), torch.randn(3, 5)), "shape"),
        (lambda: ops.kl_div(torch.randn(3, 4), torch.randn(3, 4), reduction="avg"), "unknown reduction"),
        (lambda: ops.kl_div(torch.randn(3, 4), torch.randn(3, 4), T=0.0), "temperature"),
        (lambda: ops.boosted_ce(torch.randn(3, 4), torch.rand(3)), "integer class indices"),
        (lambda: ops.boosted_ce(torch.randn(3, 4), torch.zeros(4, dtype=torch.long)), "shape"),
        (lambda: ops.logit_mse(torch.randn(3, 4), torch.randn(3, 4).double()), "dtype"),
        (lambda: ops.triangle_huber(*torch.randn(4, 3, 5), torch.zeros(3, dtype=torch.long), delta=-1.0), "delta"),
    ]
    for fn, msg in bad:
        with pytest.raises(FastcollabError, match=msg):
            fn()


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTCOLLAB_BACKEND", "reference")
    assert ops.resolve("kl_div", "cpu") == "reference"
    monkeypatch.setenv("FASTCOLLAB_BACKEND", "nonsense")
    with pytest.raises(FastcollabError, match="FASTCOLLAB_BACKEND"):
        ops.kl_div(torch.randn(2, 3), torch.randn(2, 3))


# --------------------------------------------------------------------------------------------- compile, nn
@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    use(backend)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(xa, g, x, s, t, y):
        ops.pgd_step_(xa, g, x, 0.03, 0.01, "linf")
        return ops.kl_div(s, t, 4.0) + ops.mart_loss(t, s, y) + ops.logit_mse(s, t)

    xa, g, x = _imgs((4, 3, 8, 8))
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    xa2 = xa.clone()
    loss = step(xa2, g, x, s, t, y)
    want = R.kl_div(s, t, 4.0) + R.mart_loss(t, s, y) + R.logit_mse(s, t)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(xa2, R.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf"))
    (gs,) = torch.autograd.grad(loss, s)
    (ws,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(gs, ws, rtol=1e-4, atol=1e-6)


def test_nn_modules():
    s, t, u, v = _logits(6, 10)
    y = torch.randint(0, 10, (6,))
    pairs = [
        (fnn.KLDivLoss(reduction="sum", T=2.0)(s, t), R.kl_div(s, t, 2.0, "sum")),
        (fnn.BoostedCrossEntropyLoss(reduction="none")(s, y), R.boosted_ce(s, y, "none")),
        (fnn.TradesKLLoss()(s, t), R.trades_kl(s, t)),
        (fnn.MARTLoss(beta=3.0)(s, t, y), R.mart_loss(s, t, y, 3.0)),
        (fnn.LogitMSELoss()(s, t), torch.nn.MSELoss()(s, t)),
        (fnn.TriangleHuberLoss(delta=0.5)(s, t, u, v, y), R.triangle_huber(s, t, u, v, y, 0.5)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "T=2.0" in repr(fnn.KLDivLoss(T=2.0))


# --------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_cuda_pgd_step_matches_reference(norm):
    xa, g, x = (t.cuda() for t in _imgs((2, 64, 3, 32, 32)))
    eps, step = torch.tensor([0.03, 1.0], device="cuda"), torch.tensor([0.01, 0.05], device="cuda")
    k = torch.randint(5, 21, (2, 64), device="cuda") if norm == "l1" else None
    want = R.pgd_step_(xa.clone(), g, x, eps, step, norm, l1_k=k)
    assert _cuda_backends() == ["reference", "cpp", "triton"]
    for b in _cuda_backends():
        with ops_backend(b):
            assert ops.resolve("pgd_step_", "cuda", torch.float32) == b      # the backend that runs is b
            got = ops.pgd_step_(xa.clone(), g, x, eps, step, norm, l1_k=k)
        if norm == "linf":
            assert torch.equal(got, want), b
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=b)


def _cuda_backends():
    """Every backend must run on a GPU: the cpp one with its CUDA kernels (a GPU check builds them with
    FASTCOLLAB_REQUIRE_EXT=1), else this says why they are missing."""
    from fastcollab import _ext

    assert _ext.has_cuda_kernels(), _ext.cuda_kernels_missing_reason()
    return [b for b in ops.available_backends() if ops._supports(b, "pgd_step_", torch.device("cuda"), torch.float32)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_losses_and_graph_capture():
    s = torch.randn(128, 10, device="cuda", requires_grad=True)
    t = torch.randn(128, 10, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    assert ops.resolve("kl_div", "cuda") == "triton" and ops.resolve("mart_loss", "cuda") == "triton"
    torch.testing.assert_close(ops.kl_div(s, t, 2.0), R.kl_div(s, t, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.mart_loss(t, s, y), R.mart_loss(t, s, y), rtol=1e-5, atol=1e-6)
    xa, g, x = (u.cuda() for u in _imgs((2, 8, 3, 8, 8)))
    assert ops.resolve("pgd_step_", "cuda", torch.float32) == "triton"   # the default on a GPU
    ops.pgd_step_(xa, g, x, 0.03, 0.01, "linf")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.pgd_step_(xa, g, x, 0.03, 0.01, "linf")
    graph.replay()
    torch.cuda.synchronize()
