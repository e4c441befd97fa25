"""Triton kernels (kernels/, installed as fastcollab.kernels) against independent plain-torch formulas and
against fastcollab.reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors, small fp32
shapes). With a GPU and TRITON_INTERPRET unset, the same tests run the compiled kernels on CUDA tensors,
and the @pytest.mark.cuda tests (bf16/fp16, large shapes, CUDA-graph capture, no host syncs) run too.
"""
import os
import sys

import torch

# Interpreter unless a GPU is there (then compiled kernels); must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# Test the checkout's kernels/ (top-level package, relative imports only); fall back to the installed one.
try:
    import kernels as K  # noqa: E402

    if not hasattr(K, "pgd_step_"):
        raise ImportError
except ImportError:  # pragma: no cover
    import fastcollab.kernels as K  # noqa: E402

try:
    from fastcollab import reference as R  # noqa: E402
except Exception:  # pragma: no cover - reference not written yet / broken
    R = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_broken():
    """triton decorates its own tl.sum/tl.max... when it is first imported: if that happened before
    TRITON_INTERPRET=1 was set (another test module imported triton first), the interpreter cannot run
    any kernel. Say so plainly instead of failing every test with 'Cannot call @triton.jit'd ...'."""
    if not INTERPRET:
        return False
    try:
        import triton.language.standard as _std
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - layout of another triton version
        return False
    return not isinstance(_std.sum, InterpretedFunction)


_BROKEN = _interpreter_broken()


@pytest.fixture(autouse=True)
def _require_working_interpreter():
    if _BROKEN:
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so the Triton interpreter cannot run. "
            "Set TRITON_INTERPRET=1 in the environment (or in tests/conftest.py) when there is no GPU.",
            pytrace=False,
        )
if INTERPRET:
    DEV = "cpu"
elif torch.cuda.is_available():
    DEV = "cuda"
else:  # compiled Triton without a GPU cannot run
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)

needs_ref = pytest.mark.skipif(R is None, reason="fastcollab.reference not importable")
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(),
    reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET unset or 0)",
)

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
# Against the fp32 reference (itself a float32 computation, with cancellation in 1.0001 - q and
# p_y - 1 that the kernels avoid) a little looser; the tight check is always against the float64 truth.
REF_TOL = dict(rtol=1e-4, atol=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# image data for PGD steps
# ------------------------------------------------------------------------------------------------
def make_images(shape, seed, spread=0.03):
    """x in (0,1), x_adv near x with some coordinates exactly on the box edges, grad without ties and
    with exact zeros (sign(0) = 0) and with 'outward' gradients at the edges (stuck coordinates)."""
    g = _gen(seed)
    x = torch.rand(shape, generator=g)
    x_adv = (x + spread * (2 * torch.rand(shape, generator=g) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    flat_a = x_adv.view(-1)
    flat_g = grad.view(-1)
    n = flat_a.numel()
    idx = torch.randperm(n, generator=g)
    lo, hi, z = idx[: n // 20], idx[n // 20: n // 10], idx[n // 10: n // 10 + n // 20]
    flat_a[lo] = 0.0
    flat_a[hi] = 1.0
    flat_g[z] = 0.0
    # in every row the two strongest gradients point out of the box at an edge: they must be masked
    D = shape[-1] * shape[-2] * shape[-3]
    rows_a, rows_g = x_adv.view(-1, D), grad.view(-1, D)
    for r in range(rows_a.shape[0]):
        i0, i1 = torch.randperm(D, generator=g)[:2].tolist()
        rows_a[r, i0], rows_g[r, i0] = 0.0, -50.0 - r
        rows_a[r, i1], rows_g[r, i1] = 1.0, 60.0 + r
    return x.to(DEV), x_adv.to(DEV), grad.to(DEV)


def _bcast(v, ref, dtype=torch.float32):
    """float -> float; 0-d tensor -> itself; [P] -> [P,1,1,1,1] (per peer)."""
    if not isinstance(v, torch.Tensor):
        return v
    v = v.to(device=ref.device, dtype=dtype)
    return v if v.dim() == 0 else v.reshape((-1,) + (1,) * (ref.dim() - 1))


def linf_formula(x_adv, grad, x, eps, step):
    e, s = _bcast(eps, x_adv), _bcast(step, x_adv)
    t = x_adv + s * torch.sign(grad)
    t = torch.minimum(torch.maximum(t, x - e), x + e)
    return torch.clamp(t, 0.0, 1.0)


def l2_formula64(x_adv, grad, x, eps, step):
    xa, g, xx = x_adv.double(), grad.double(), x.double()
    e, s = _bcast(eps, xa, torch.float64), _bcast(step, xa, torch.float64)
    gn = g.flatten(-3).norm(dim=-1)[..., None, None, None]
    d = xa + s * g / (gn + 1e-12) - xx
    dn = d.flatten(-3).norm(dim=-1)[..., None, None, None]
    d = d * torch.clamp(e / (dn + 1e-12), max=1.0)
    return torch.clamp(xx + d, 0.0, 1.0)


def duchi64(d, eps):
    """Float64 Duchi et al. (2008) projection of the rows of d ([N, D]) onto l1 balls of radii eps ([N])."""
    d = d.double()
    eps = eps.double().reshape(-1, 1)
    a = d.abs()
    mu = a.sort(dim=1, descending=True).values
    cs = mu.cumsum(1)
    j = torch.arange(1, d.shape[1] + 1, dtype=torch.float64, device=d.device)
    ok = mu - (cs - eps) / j > 0
    rho = (ok * j).max(dim=1, keepdim=True).values
    theta = (cs.gather(1, rho.long() - 1) - eps) / rho
    proj = d.sign() * (a - theta).clamp_min(0)
    outside = a.sum(1, keepdim=True) > eps
    return torch.where(outside, proj, d)


def _row_values(v, lead):
    """Per-row fp64 values ([N]) of a float / 0-d / [P] parameter for rows with leading shape lead."""
    n = 1
    for s_ in lead:
        n *= s_
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return torch.full((n,), float(v), dtype=torch.float64, device=DEV)
    v = v.to(device=DEV, dtype=torch.float32).double()
    return v.repeat_interleave(n // v.numel())


def l1_stuck(xa, g, step):
    """Maini et al.'s mask (robust_union l1_dir_topk, gap = step): within one step of an edge moving towards
    it, or on an edge."""
    return ((xa <= step) & (g < 0)) | ((xa >= 1 - step) & (g > 0)) | (xa <= 0) | (xa >= 1)


def l1_formula64(x_adv, grad, x, eps, step, k):
    """Maini et al. steepest ascent (top-k |g| among movable coords) + float64 Duchi projection."""
    lead = x_adv.shape[:-3]
    D = x_adv.shape[-3:].numel()
    xa = x_adv.reshape(-1, D)
    g = grad.reshape(-1, D)
    xx = x.expand_as(x_adv).reshape(-1, D)
    s = _row_values(step, lead)[:, None]
    stuck = l1_stuck(xa, g, s)
    score = torch.where(stuck, torch.full_like(g, -1.0), g.abs())
    kk = k.expand(lead).reshape(-1)
    order = score.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(D, device=DEV).expand_as(order).contiguous())
    sel = (ranks < kk[:, None]) & ~stuck
    mv = s * 20.0 / kk[:, None].double()
    xa1 = xa.double() + torch.where(sel, mv * g.double().sign(), torch.zeros_like(mv))
    d = duchi64(xa1 - xx.double(), _row_values(eps, lead))
    return torch.clamp(xx.double() + d, 0, 1).reshape(x_adv.shape), sel.reshape(x_adv.shape)


# ------------------------------------------------------------------------------------------------
# PGD: l_inf
# ------------------------------------------------------------------------------------------------
LINF_CASES = [
    ((2, 3, 3, 8, 8), torch.tensor([8 / 255, 0.05]), torch.tensor([2 / 255, 0.01])),
    ((2, 3, 3, 8, 8), torch.tensor(8 / 255), 2 / 255),
    ((2, 3, 3, 8, 8), torch.tensor([8 / 255, 0.05]), 0.01),  # per-peer eps, shared step
    ((3, 3, 32, 32), 8 / 255, 2 / 255),
    ((3, 3, 32, 32), 0.031, 0.007),
]


@pytest.mark.parametrize("shape,eps,step", LINF_CASES)
def test_pgd_linf_bit_exact(shape, eps, step):
    x, xa, g = make_images(shape, 1)
    assert (g == 0).any() and (xa == 0).any() and (xa == 1).any()
    want = linf_formula(xa, g, x, eps, step)
    out = xa.clone()
    ret = K.pgd_step_(out, g, x, eps, step, "linf")
    assert ret is out
    assert torch.equal(out, want)
    # sign(0) = 0: coordinates with zero gradient only move by the projection/clamp
    z = g == 0
    assert torch.equal(out[z], torch.minimum(torch.maximum(xa, x - _bcast(eps, xa)), x + _bcast(eps, xa)).clamp(0, 1)[z])
    if R is not None:
        assert torch.equal(out, R.pgd_step_(xa.clone(), g, x, eps, step, "linf"))


def test_pgd_linf_per_peer_one_launch_and_shared_x():
    """[P] eps/step: each peer uses its own; clean x [B,C,H,W] shared by the peers."""
    x, xa, g = make_images((2, 3, 3, 8, 8), 2)
    x1 = x[0].clone()
    eps, step = torch.tensor([0.02, 0.1]), torch.tensor([0.005, 0.05])
    out = K.pgd_step_(xa.clone(), g, x1, eps, step, "linf")
    for p in range(2):
        want = linf_formula(xa[p], g[p], x1, float(eps[p]), float(step[p]))
        assert torch.equal(out[p], want)


def test_pgd_linf_non_contiguous_written_back():
    x, xa, g = make_images((3, 3, 8, 8), 3)
    xa_nc = xa.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NHWC memory, NCHW view
    g_nc = g.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xa_nc.is_contiguous()
    want = linf_formula(xa, g, x, 8 / 255, 2 / 255)
    ret = K.pgd_step_(xa_nc, g_nc, x, 8 / 255, 2 / 255, "linf")
    assert ret is xa_nc
    assert torch.equal(xa_nc, want)


# ------------------------------------------------------------------------------------------------
# PGD: l2
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,eps,step",
    [
        ((2, 3, 3, 8, 8), torch.tensor([0.5, 0.05]), torch.tensor([0.1, 0.2])),  # peer 1: projection active
        ((3, 3, 32, 32), 0.5, 0.1),
        ((3, 3, 32, 32), 0.05, 0.2),
    ],
)
def test_pgd_l2(shape, eps, step):
    x, xa, g = make_images(shape, 4, spread=0.01)
    g.view(-1)[:5] = 0.0
    want = l2_formula64(xa, g, x, eps, step)
    out = K.pgd_step_(xa.clone(), g, x, eps, step, "l2")
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
    if R is not None:
        torch.testing.assert_close(out, R.pgd_step_(xa.clone(), g, x, eps, step, "l2"), rtol=0, atol=1e-6)


def test_pgd_l2_ball_radius_respected():
    x, xa, g = make_images((2, 3, 3, 8, 8), 5)
    eps = torch.tensor([0.05, 0.3])
    out = K.pgd_step_(xa.clone(), g, x, eps, 1.0, "l2")  # big step: every row is projected
    dn = (out - x).flatten(-3).norm(dim=-1)
    assert (dn <= eps.to(DEV)[:, None] * (1 + 1e-5)).all()


# ------------------------------------------------------------------------------------------------
# PGD: l1 (steepest ascent + projection)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,eps,step",
    [
        ((2, 3, 3, 8, 8), torch.tensor([12.0, 0.5]), torch.tensor([0.05, 0.05])),  # peer 1 projected
        ((3, 3, 32, 32), 0.3, 0.05),  # all projected
        ((3, 3, 32, 32), 1000.0, 0.05),  # none projected
        ((2, 3, 1, 2, 2), 1000.0, 0.05),  # k in 5..20 > 4 coordinates per row: all movable ones move
    ],
)
def test_pgd_l1(shape, eps, step):
    x, xa, g = make_images(shape, 6, spread=0.005)
    lead = shape[:-3]
    k = torch.randint(5, 21, lead, generator=_gen(7)).to(DEV)
    want, sel = l1_formula64(xa, g, x, eps, step, k)
    out = K.pgd_step_(xa.clone(), g, x, eps, step, "l1", l1_k=k)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    # masked coordinates (within one step of an edge moving towards it, or on an edge) never get selected
    stuck = l1_stuck(xa, g, _row_values(step, lead).reshape(*lead, 1, 1, 1))
    assert not (sel & stuck).any()
    if R is not None:
        torch.testing.assert_close(out, R.pgd_step_(xa.clone(), g, x, eps, step, "l1", l1_k=k), rtol=0, atol=1e-5)


def test_pgd_l1_random_k_moves_k_coords():
    """l1_k=None: k ~ U{5..20} per row on the device; without projection exactly k coordinates move,
    each by step*20/k, in the gradient's direction."""
    x, xa, g = make_images((2, 3, 3, 8, 8), 8, spread=0.0)
    xa = x.clone()  # interior points (x in (0,1)): nothing is stuck, nothing clamps for a small step
    step = 0.001
    torch.manual_seed(0)
    out = K.pgd_step_(xa.clone(), g, x, 1e6, step, "l1")
    moved = out != xa
    n = moved.flatten(-3).sum(-1)
    assert ((n >= 5) & (n <= 20)).all()
    ks = n.flatten().tolist()
    assert len(set(ks)) > 1  # drawn per row
    delta = (out - xa).flatten(-3)
    for r, kr in enumerate(ks):
        row = delta.reshape(-1, delta.shape[-1])[r]
        nz = row[row != 0]
        torch.testing.assert_close(nz.abs(), torch.full_like(nz, step * 20 / kr), rtol=1e-4, atol=0)
        grow = g.reshape(-1, delta.shape[-1])[r]
        assert torch.equal(torch.sign(nz), torch.sign(grow[row != 0]))
        # the moved coordinates are the kr largest |g|
        top = grow.abs().topk(kr).indices
        assert set(top.tolist()) == set((row != 0).nonzero().flatten().tolist())


def test_pgd_l1_ball_radius_respected():
    x, xa, g = make_images((3, 3, 32, 32), 9, spread=0.0)
    out = x.clone()
    for _ in range(3):
        K.pgd_step_(out, g, x, 0.8, 0.05, "l1", l1_k=torch.tensor([5, 10, 20], device=DEV))
    l1 = (out - x).flatten(-3).abs().sum(-1)
    assert (l1 <= 0.8 * (1 + 1e-5)).all()
    assert (out >= 0).all() and (out <= 1).all()


def test_pgd_bad_norm():
    x, xa, g = make_images((1, 3, 4, 4), 10)
    with pytest.raises(ValueError):
        K.pgd_step_(xa, g, x, 0.1, 0.01, "l3")


# ------------------------------------------------------------------------------------------------
# l1-ball projection
# ------------------------------------------------------------------------------------------------
def _delta(shape, seed, scales):
    g = _gen(seed)
    d = torch.randn(shape, generator=g)
    d = d * torch.as_tensor(scales, dtype=torch.float32).reshape((-1,) + (1,) * (d.dim() - 1))
    d.view(-1)[::7] = 0.0  # exact zeros
    return d.to(DEV)


@pytest.mark.parametrize(
    "shape,scales,eps",
    [
        ((2, 3, 3, 8, 8), [1.0, 0.001], torch.tensor([5.0, 3.0])),  # peer 1 rows inside the ball
        ((3, 3, 32, 32), [0.01, 0.002, 1.0], 12.0),  # row 0/1 inside, row 2 outside
        ((3, 3, 32, 32), [0.1, 0.2, 0.3], torch.tensor(0.5)),
        ((16, 1, 4, 4), [1.0] * 16, 1.0),
    ],
)
def test_project_l1_vs_duchi64(shape, scales, eps):
    d = _delta(shape, 11, scales)
    before = d.clone()
    lead = shape[:-3]
    D = d[(0,) * len(lead)].numel()
    want = duchi64(before.reshape(-1, D), _row_values(eps, lead)).reshape(shape)
    out = K.project_l1_(d, eps)
    assert out is d
    torch.testing.assert_close(d.double(), want, rtol=0, atol=1e-5)
    rows_before = before.reshape(-1, D)
    rows_after = d.reshape(-1, D)
    inside = rows_before.abs().sum(1) <= _row_values(eps, lead).float()
    assert torch.equal(rows_after[inside], rows_before[inside])  # untouched, bit-exact
    outside = ~inside
    if outside.any():
        torch.testing.assert_close(rows_after[outside].abs().sum(1).double(), _row_values(eps, lead)[outside],
                                   rtol=1e-5, atol=0)
    if R is not None:
        torch.testing.assert_close(d, R.project_l1_(before.clone(), eps), rtol=0, atol=1e-5)


def test_project_l1_ties_and_sparse_rows():
    d = torch.zeros(4, 1, 8, 8)
    d[0, 0, 0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # ties, outside eps=2
    d[1, 0, :, :] = 0.25  # all equal, l1 = 16
    d[2, 0, 3, 3] = -7.0  # one coordinate
    d[3] = torch.randn(1, 8, 8, generator=_gen(12))
    d = d.to(DEV)
    want = duchi64(d.reshape(4, -1), torch.full((4,), 2.0, dtype=torch.float64, device=DEV)).reshape(d.shape)
    K.project_l1_(d, 2.0)
    torch.testing.assert_close(d.double(), want, rtol=0, atol=1e-6)


def test_project_l1_non_contiguous_written_back():
    base = _delta((3, 32, 32, 3), 13, [1.0, 0.001, 0.5])
    d = base.permute(0, 3, 1, 2)  # logical [3,3,32,32], NHWC memory
    assert not d.is_contiguous()
    want = duchi64(d.reshape(3, -1), torch.full((3,), 4.0, dtype=torch.float64, device=DEV)).reshape(d.shape)
    ret = K.project_l1_(d, 4.0)
    assert ret is d
    torch.testing.assert_close(base.permute(0, 3, 1, 2).double(), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# fused losses: independent float64 formulas (autograd gives the truth gradients)
# ------------------------------------------------------------------------------------------------
def _lsm(z):
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _reduce(per, reduction, C):
    return {"none": lambda: per, "sum": per.sum, "batchmean": lambda: per.sum() / per.shape[0],
            "mean": lambda: per.sum() / (per.shape[0] * C)}[reduction]()


def f_kl(s, t, T, reduction):
    ls, lt = _lsm(s / T), _lsm(t / T)
    return _reduce((lt.exp() * (lt - ls)).sum(-1), reduction, s.shape[-1])


def f_bce_rows(z, y):
    lp = _lsm(z)
    p = lp.exp()
    oh = F.one_hot(y, z.shape[-1]).bool()
    other = p.masked_fill(oh, float("-inf")).max(-1).values
    return -lp[torch.arange(z.shape[0]), y] - torch.log(1.0001 - other)


def f_mart(c, a, y, beta):
    lc, la = _lsm(c), _lsm(a)
    kl = (lc.exp() * (lc - la)).sum(-1)
    w = 1 - lc.exp()[torch.arange(c.shape[0]), y]
    return f_bce_rows(a, y).mean() + beta * (kl * w).mean()


def f_mse(a, b, reduction):
    sq = (a - b) ** 2
    return {"mean": sq.mean, "sum": sq.sum, "batchmean": lambda: sq.sum() / a.shape[0],
            "none": lambda: sq.sum(-1)}[reduction]()


def f_tri(sn, sa, tn, ta, y, delta, use_probs, reduction="mean"):
    def psi(n, a):
        if use_probs:
            n, a = n.softmax(-1), a.softmax(-1)
        oh = F.one_hot(y, n.shape[-1]).to(n.dtype)
        u, v = n - oh, a - oh
        return (u * v).sum(-1) / (u.norm(dim=-1).clamp_min(1e-12) * v.norm(dim=-1).clamp_min(1e-12))

    r = psi(sn, sa) - psi(tn, ta)
    hub = torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta))
    return {"mean": hub.mean, "sum": hub.sum, "none": lambda: hub}[reduction]()


def _truth(fn, inputs, grad_idx, reduction="x"):
    """float64 loss and gradients of fn at the (fp32) inputs; for 'none' the gradient of the sum."""
    xs = [t.detach().double().requires_grad_(i in grad_idx) if t.is_floating_point() else t
          for i, t in enumerate(inputs)]
    loss = fn(*xs)
    grads = torch.autograd.grad(loss.sum(), [xs[i] for i in grad_idx])
    return loss.detach(), grads


def _logits(B, C, seed, scale=3.0):
    g = _gen(seed)
    return (scale * torch.randn(B, C, generator=g)).to(DEV)


def _labels(B, C, seed):
    return torch.randint(0, C, (B,), generator=_gen(seed)).to(DEV)


SHAPES = [(1, 10), (3, 100), (16, 10), (3, 1000)]


def _close(got, want, tol):
    torch.testing.assert_close(got.double(), want.double(), **tol)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_div(B, C, reduction, T):
    s, t = _logits(B, C, 20), _logits(B, C, 21)
    loss, ds, dt = K.kl_div_fwd(s, t, T, reduction, True)
    want, (gs, gt) = _truth(lambda a, b: f_kl(a, b, T, reduction), [s, t], (0, 1))
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    _close(loss, want, LOSS_TOL)
    _close(ds, gs, GRAD_TOL)
    _close(dt, gt, GRAD_TOL)
    loss2, ds2, dt2 = K.kl_div_fwd(s, t, T, reduction, False)
    assert dt2 is None and torch.equal(ds2, ds) and torch.equal(loss2, loss)
    if R is not None:
        ss, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
        ref = R.kl_div(ss, tt, T, reduction, detach_teacher=False)
        ref.sum().backward()
        _close(loss, ref, REF_TOL)
        _close(ds, ss.grad, REF_TOL)
        _close(dt, tt.grad, REF_TOL)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_boosted_ce(B, C, reduction):
    z, y = _logits(B, C, 30), _labels(B, C, 31)
    loss, dz = K.boosted_ce_fwd(z, y, reduction)
    red = {"mean": torch.mean, "sum": torch.sum, "none": lambda v: v}[reduction]
    want, (gz,) = _truth(lambda a, yy: red(f_bce_rows(a, yy)), [z, y], (0,))
    _close(loss, want, LOSS_TOL)
    _close(dz, gz, GRAD_TOL)
    if R is not None:
        zz = z.clone().requires_grad_()
        ref = R.boosted_ce(zz, y, reduction)
        ref.sum().backward()
        _close(loss, ref, REF_TOL)
        _close(dz, zz.grad, REF_TOL)


def test_boosted_ce_confident_rows():
    """Rows where the runner-up probability is near 1 (1.0001 - q small) keep full accuracy."""
    z = torch.zeros(3, 10)
    z[0, 3] = 30.0  # y = 0, q ~ 1
    z[1, 1] = 12.0
    z[2, 2] = -5.0
    y = torch.tensor([0, 1, 2])
    z, y = z.to(DEV), y.to(DEV)
    loss, dz = K.boosted_ce_fwd(z, y, "none")
    want, (gz,) = _truth(lambda a, yy: f_bce_rows(a, yy), [z, y], (0,))
    _close(loss, want, dict(rtol=1e-5, atol=1e-5))
    _close(dz, gz, dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_trades_kl(B, C, reduction):
    c, a = _logits(B, C, 40), _logits(B, C, 41)
    loss, dc, da = K.trades_kl_fwd(c, a, reduction)
    want, (gc, ga) = _truth(lambda p, q: f_kl(q, p, 1.0, reduction), [c, a], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(dc, gc, GRAD_TOL)
    _close(da, ga, GRAD_TOL)
    if R is not None:
        cc, aa = c.clone().requires_grad_(), a.clone().requires_grad_()
        ref = R.trades_kl(cc, aa, reduction)
        ref.sum().backward()
        _close(loss, ref, REF_TOL)
        _close(dc, cc.grad, REF_TOL)
        _close(da, aa.grad, REF_TOL)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_logit_mse(B, C, reduction):
    a, b = _logits(B, C, 50), _logits(B, C, 51)
    loss, da, db = K.logit_mse_fwd(a, b, reduction)
    want, (ga, gb) = _truth(lambda p, q: f_mse(p, q, reduction), [a, b], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(da, ga, GRAD_TOL)
    _close(db, gb, GRAD_TOL)
    if R is not None and reduction != "batchmean":
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = R.logit_mse(aa, bb, reduction)
        ref.sum().backward()
        _close(loss, ref, REF_TOL)
        _close(da, aa.grad, REF_TOL)
        _close(db, bb.grad, REF_TOL)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("use_probs", [True, False])
@pytest.mark.parametrize("delta", [1.0, 0.05])
def test_triangle_huber(B, C, use_probs, delta):
    sc = 3.0 if use_probs else 1.0
    sn, sa = _logits(B, C, 60, sc), _logits(B, C, 61, sc)
    tn, ta = _logits(B, C, 62, sc), _logits(B, C, 63, sc)
    y = _labels(B, C, 64)
    loss, dsn, dsa = K.triangle_huber_fwd(sn, sa, tn, ta, y, delta, use_probs)
    want, (gn, ga) = _truth(lambda a, b, c, d, yy: f_tri(a, b, c, d, yy, delta, use_probs),
                            [sn, sa, tn, ta, y], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(dsn, gn, GRAD_TOL)
    _close(dsa, ga, GRAD_TOL)
    if R is not None:
        a, b = sn.clone().requires_grad_(), sa.clone().requires_grad_()
        ref = R.triangle_huber(a, b, tn, ta, y, delta, use_probs)
        ref.backward()
        _close(loss, ref, REF_TOL)
        _close(dsn, a.grad, REF_TOL)
        _close(dsa, b.grad, REF_TOL)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triangle_huber_reductions(reduction):
    B, C = 16, 10
    sn, sa, tn, ta = (_logits(B, C, 65 + i) for i in range(4))
    y = _labels(B, C, 69)
    loss, dsn, dsa = K.triangle_huber_fwd(sn, sa, tn, ta, y, 0.3, True, reduction=reduction)
    want, (gn, ga) = _truth(lambda a, b, c, d, yy: f_tri(a, b, c, d, yy, 0.3, True, reduction),
                            [sn, sa, tn, ta, y], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(dsn, gn, GRAD_TOL)
    _close(dsa, ga, GRAD_TOL)


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("beta", [6.0, 0.5])
def test_mart_loss(B, C, beta):
    c, a = _logits(B, C, 70), _logits(B, C, 71)
    y = _labels(B, C, 72)
    loss, dc, da = K.mart_loss_fwd(c, a, y, beta)
    want, (gc, ga) = _truth(lambda p, q, yy: f_mart(p, q, yy, beta), [c, a, y], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(dc, gc, GRAD_TOL)
    _close(da, ga, GRAD_TOL)
    if R is not None:
        cc, aa = c.clone().requires_grad_(), a.clone().requires_grad_()
        ref = R.mart_loss(cc, aa, y, beta)
        ref.backward()
        _close(loss, ref, REF_TOL)
        _close(dc, cc.grad, REF_TOL)
        _close(da, aa.grad, REF_TOL)


def test_mart_weight_not_detached():
    """The (1 - p_y(clean)) weight carries gradient: the detached-weight gradient differs."""
    B, C = 3, 10
    c, a, y = _logits(B, C, 73), _logits(B, C, 74), _labels(B, C, 75)
    _, dc, _ = K.mart_loss_fwd(c, a, y, 6.0)

    def detached(p, q, yy):
        lc, la = _lsm(p), _lsm(q)
        kl = (lc.exp() * (lc - la)).sum(-1)
        w = (1 - lc.exp()[torch.arange(B), yy]).detach()
        return f_bce_rows(q, yy).mean() + 6.0 * (kl * w).mean()

    _, (gdet, _) = _truth(detached, [c, a, y], (0, 1))
    assert (dc.double() - gdet).abs().max() > 1e-4


def test_losses_non_contiguous_inputs():
    B, C = 3, 100
    s = _logits(C, B, 80).t()
    t = _logits(C, B, 81).t()
    y = _labels(B, C, 82)
    assert not s.is_contiguous()
    loss, ds, dt = K.kl_div_fwd(s, t, 2.0, "batchmean", True)
    want, (gs, gt) = _truth(lambda a, b: f_kl(a, b, 2.0, "batchmean"), [s, t], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(ds, gs, GRAD_TOL)
    _close(dt, gt, GRAD_TOL)
    loss, dc, da = K.mart_loss_fwd(s, t, y, 6.0)
    want, (gc, ga) = _truth(lambda p, q, yy: f_mart(p, q, yy, 6.0), [s, t, y], (0, 1))
    _close(loss, want, LOSS_TOL)
    _close(dc, gc, GRAD_TOL)
    _close(da, ga, GRAD_TOL)


def test_loss_bad_reduction():
    z = _logits(2, 10, 90)
    with pytest.raises(ValueError):
        K.kl_div_fwd(z, z, 1.0, "avg", False)
    with pytest.raises(ValueError):
        K.boosted_ce_fwd(z, _labels(2, 10, 91), "batchmean")


# ------------------------------------------------------------------------------------------------
# CUDA only: low precision, large shapes, CUDA graphs, no host syncs
# ------------------------------------------------------------------------------------------------
LOWP_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}
LOWP_IMG_ATOL = {torch.float32: 0.0, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # ~1 ulp near 1.0


def _check_losses_lowp(dtype, B, C):
    """bf16/fp16 logits: math is fp32 inside, so the loss equals the fp32 formula on the upcast inputs;
    gradients are rounded once to the input dtype."""
    s, t = _logits(B, C, 100).to(dtype), _logits(B, C, 101).to(dtype)
    y = _labels(B, C, 102)
    tol = LOWP_TOL[dtype]
    ltol = dict(rtol=1e-4, atol=1e-5)
    sf, tf = s.float(), t.float()
    loss, ds, dt = K.kl_div_fwd(s, t, 1.0, "batchmean", True)
    want, (gs, gt) = _truth(lambda a, b: f_kl(a, b, 1.0, "batchmean"), [sf, tf], (0, 1))
    assert loss.dtype == torch.float32 and ds.dtype == dtype and dt.dtype == dtype
    _close(loss, want, ltol)
    _close(ds, gs, tol)
    _close(dt, gt, tol)
    loss, dz = K.boosted_ce_fwd(s, y, "mean")
    want, (gz,) = _truth(lambda a, yy: f_bce_rows(a, yy).mean(), [sf, y], (0,))
    assert dz.dtype == dtype
    _close(loss, want, ltol)
    _close(dz, gz, tol)
    loss, dc, da = K.trades_kl_fwd(s, t, "batchmean")
    want, (gc, ga) = _truth(lambda p, q: f_kl(q, p, 1.0, "batchmean"), [sf, tf], (0, 1))
    _close(loss, want, ltol)
    _close(dc, gc, tol)
    _close(da, ga, tol)
    loss, dc, da = K.mart_loss_fwd(s, t, y, 6.0)
    want, (gc, ga) = _truth(lambda p, q, yy: f_mart(p, q, yy, 6.0), [sf, tf, y], (0, 1))
    _close(loss, want, ltol)
    _close(dc, gc, tol)
    _close(da, ga, tol)
    loss, da, db = K.logit_mse_fwd(s, t, "mean")
    want, (ga, gb) = _truth(lambda p, q: f_mse(p, q, "mean"), [sf, tf], (0, 1))
    _close(loss, want, ltol)
    _close(da, ga, tol)
    _close(db, gb, tol)
    loss, dsn, dsa = K.triangle_huber_fwd(s, t, t, s.flip(0), y, 1.0, True)
    want, (gn, ga) = _truth(lambda a, b, c, d, yy: f_tri(a, b, c, d, yy, 1.0, True),
                            [sf, tf, tf, sf.flip(0), y], (0, 1))
    _close(loss, want, ltol)
    _close(dsn, gn, tol)
    _close(dsa, ga, tol)


def _check_pgd_lowp(dtype, shape, eps, step):
    x, xa, g = make_images(shape, 110)
    atol = LOWP_IMG_ATOL[dtype]
    xl, xal = x.to(dtype), xa.to(dtype)
    # low precision rounds many |g| to ties: give every row 32 distinct, exactly representable large
    # gradients so the top-k (k <= 20) among the movable coordinates is unambiguous in every dtype
    D = shape[-1] * shape[-2] * shape[-3]
    rows = g.reshape(-1, D)
    n_big = min(32, D // 2)
    sign = torch.where(torch.rand(rows.shape[0], n_big, generator=_gen(111)) < 0.5, -1.0, 1.0).to(DEV)
    big = (100.0 + 8.0 * torch.arange(n_big, device=DEV)) * sign
    pos = torch.rand(rows.shape, generator=_gen(112)).to(DEV).argsort(dim=1)[:, :n_big]
    rows.scatter_(1, pos, big)
    gl = g.to(dtype)
    out = K.pgd_step_(xal.clone(), gl, xl, eps, step, "linf")
    assert out.dtype == dtype
    want = linf_formula(xal.float(), gl.float(), xl.float(), eps, step)
    if dtype == torch.float32:
        assert torch.equal(out, want)
    else:
        _close(out, want, dict(rtol=0, atol=atol))
    out = K.pgd_step_(xal.clone(), gl, xl, eps, step, "l2")
    _close(out, l2_formula64(xal.float(), gl.float(), xl.float(), eps, step), dict(rtol=0, atol=max(atol, 2e-6)))
    k = torch.randint(5, 21, shape[:-3], generator=_gen(113)).to(DEV)
    out = K.pgd_step_(xal.clone(), gl, xl, eps, step, "l1", l1_k=k)
    want, _ = l1_formula64(xal.float(), gl.float(), xl.float(), eps, step, k)
    _close(out, want, dict(rtol=0, atol=max(atol, 1e-5)))
    d = xal.float() - xl.float()
    K.project_l1_(d.to(dtype), eps)  # runs in the dtype (no comparison: the input is already rounded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_low_precision_small(dtype):
    _check_losses_lowp(dtype, 3, 100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pgd_low_precision_small(dtype):
    _check_pgd_lowp(dtype, (2, 3, 3, 8, 8), torch.tensor([8 / 255, 0.5]), torch.tensor([2 / 255, 0.05]))


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [10, 100, 1000])
def test_cuda_losses_large(dtype, C):
    if dtype == torch.float32:
        B = 128
        s, t, y = _logits(B, C, 103), _logits(B, C, 104), _labels(B, C, 105)
        loss, ds, dt = K.kl_div_fwd(s, t, 4.0, "batchmean", True)
        want, (gs, gt) = _truth(lambda a, b: f_kl(a, b, 4.0, "batchmean"), [s, t], (0, 1))
        _close(loss, want, LOSS_TOL)
        _close(ds, gs, GRAD_TOL)
        _close(dt, gt, GRAD_TOL)
        loss, dc, da = K.mart_loss_fwd(s, t, y, 6.0)
        want, (gc, ga) = _truth(lambda p, q, yy: f_mart(p, q, yy, 6.0), [s, t, y], (0, 1))
        _close(loss, want, LOSS_TOL)
        _close(dc, gc, GRAD_TOL)
        _close(da, ga, GRAD_TOL)
    else:
        _check_losses_lowp(dtype, 128, C)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_pgd_large(dtype):
    eps = torch.tensor([8 / 255, 0.5, 12.0, 0.03], device=DEV)
    step = torch.tensor([2 / 255, 0.1, 0.05, 0.01], device=DEV)
    _check_pgd_lowp(dtype, (4, 128, 3, 32, 32), eps, step)


@cuda
@needs_gpu
def test_cuda_graph_capture_and_no_host_sync():
    shape = (2, 64, 3, 32, 32)
    x, xa, g = make_images(shape, 120)
    eps = torch.tensor([8 / 255, 12.0], device=DEV)
    step = torch.tensor([2 / 255, 0.05], device=DEV)
    s, t = _logits(64, 10, 121), _logits(64, 10, 122)
    y = _labels(64, 10, 123)

    def body(buf):
        K.pgd_step_(buf, g, x, eps, step, "linf")
        K.pgd_step_(buf, g, x, eps, step, "l2")
        K.pgd_step_(buf, g, x, eps, step, "l1")  # k drawn on the device inside the graph
        K.project_l1_(buf, eps)
        return (K.kl_div_fwd(s, t, 2.0, "batchmean", True), K.boosted_ce_fwd(s, y, "mean"),
                K.mart_loss_fwd(s, t, y, 6.0), K.trades_kl_fwd(s, t, "batchmean"),
                K.logit_mse_fwd(s, t, "mean"), K.triangle_huber_fwd(s, t, t, s, y, 1.0, True))

    warm = xa.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(warm)  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        body(xa.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")

    buf = xa.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body(buf)
    buf.copy_(xa)
    graph.replay()
    torch.cuda.synchronize()
    eager = body(xa.clone())
    # the l1 step draws k at random: compare the deterministic losses and the l_inf/l2 part bounds
    for got, want in zip(outs, eager):
        for a_, b_ in zip(got, want):
            if a_ is not None:
                torch.testing.assert_close(a_, b_)
    assert (buf >= 0).all() and (buf <= 1).all()
