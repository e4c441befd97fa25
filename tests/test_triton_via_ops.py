"""The Triton backend through the public ``fastcollab.ops`` API, against formulas written here.

No GPU: the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors. With a GPU
and the compiled mode already chosen by an earlier test module, the same tests run on CUDA tensors.
Every op is forced to the ``triton`` backend (and the test checks that no fallback happened); the expected
values are independent plain-torch formulas (float64 where it helps), not ``fastcollab.reference``.
Shapes are small so the interpreter stays fast.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # fastcollab.ops imports the checkout's top-level kernels/ package
    sys.path.insert(0, _ROOT)

from fastcollab import ops  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)

pytestmark = pytest.mark.skipif(
    DEV is None or "triton" not in ops.available_backends(),
    reason="triton backend unavailable (no GPU and TRITON_INTERPRET != 1, or triton/kernels missing)",
)

ALL_OPS = ("pgd_step_", "project_l1_", "kl_div", "boosted_ce", "trades_kl", "mart_loss", "logit_mse", "triangle_huber")


@pytest.fixture(autouse=True)
def triton_backend():
    prev = getattr(ops, "_override", None)
    ops.set_backend("triton")
    torch.manual_seed(0)
    for op in ALL_OPS:  # really Triton, not a silent fallback
        assert ops.resolve(op, DEV, torch.float32) == "triton", op
    yield
    ops.set_backend(prev)


# =============================================================================================== helpers
def _imgs(shape, dtype=torch.float32):
    x = torch.rand(shape, dtype=dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = 1.0
    xa = (x + 0.02 * torch.randn(shape, dtype=dtype)).clamp(0, 1)
    g = torch.randn(shape, dtype=dtype)
    g.view(-1)[::5] = 0.0  # sign(0) = 0
    g.view(-1)[1::13] = -0.0
    return xa.to(DEV), g.to(DEV), x.to(DEV)


def _bcast(v, ref, dtype):
    """float / per-peer [P] tensor -> broadcastable against ``ref`` [P, ...]."""
    if isinstance(v, torch.Tensor):
        return v.to(device=ref.device, dtype=dtype).reshape((-1,) + (1,) * (ref.dim() - 1))
    return v


def _row_param(v, lead, dtype):
    """float / per-peer [P] tensor -> one value per row, shape [*lead]."""
    if isinstance(v, torch.Tensor):
        return v.to(device=DEV, dtype=dtype).reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    return torch.full(lead, float(v), dtype=dtype, device=DEV).reshape(-1)


def duchi64(v: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Duchi et al. (2008) sort-based l1-ball projection of every row of v [N, D] (float64), radius eps [N].
    Rows already inside the ball are returned as they are."""
    v = v.double()
    eps = eps.double()
    a = v.abs()
    mu = torch.sort(a, dim=1, descending=True).values
    cs = torch.cumsum(mu, dim=1)
    j = torch.arange(1, v.shape[1] + 1, dtype=torch.float64, device=v.device)
    cond = mu - (cs - eps[:, None]) / j > 0
    rho = cond.sum(1).clamp_min(1)
    theta = (cs.gather(1, (rho - 1)[:, None]).squeeze(1) - eps) / rho
    proj = torch.sign(v) * (a - theta[:, None]).clamp_min(0)
    inside = a.sum(1) <= eps
    return torch.where(inside[:, None], v, proj)


def _close_grad(got, want, tol=1e-4):
    scale = want.abs().max().item() + 1e-30
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=tol)


# =============================================================================================== pgd_step_
@pytest.mark.parametrize(
    "shape,per_peer,shared_x",
    [((7, 3, 5, 5), False, False), ((2, 16, 3, 8, 8), False, False), ((2, 16, 3, 8, 8), True, False),
     ((3, 4, 3, 8, 8), True, True), ((2, 128, 3, 32, 32), True, False)],
)
def test_linf_bit_exact(shape, per_peer, shared_x):
    xa, g, x = _imgs(shape)
    if shared_x:
        x = x[0]
    if per_peer:
        P = shape[0]
        eps = torch.linspace(0.0, 0.1, P, device=DEV)
        step = torch.linspace(0.001, 0.03, P, device=DEV)
    else:
        eps, step = 8 / 255, 2 / 255
    e = _bcast(eps, xa, torch.float32)
    s = _bcast(step, xa, torch.float32)
    t = xa + s * torch.sign(g)
    t = torch.minimum(torch.maximum(t, x - e), x + e)
    want = torch.clamp(t, 0.0, 1.0)
    got = xa.clone()
    assert ops.pgd_step_(got, g, x, eps, step, "linf") is got
    assert torch.equal(got, want)


def test_linf_sign_zero_is_zero():
    x = torch.rand(4, 3, 6, 6, device=DEV) * 0.8 + 0.1
    xa = x + 0.01 * (torch.rand_like(x) - 0.5)
    g = torch.zeros_like(x)
    g.view(-1)[::2] = -0.0
    got = ops.pgd_step_(xa.clone(), g, x, 8 / 255, 2 / 255, "linf")
    assert torch.equal(got, xa)  # no gradient: no move (inside the ball and the box)


def test_linf_noncontiguous_and_float64():
    xa, g, x = _imgs((4, 3, 6, 6), torch.float64)
    want = torch.clamp(torch.minimum(torch.maximum(xa + 0.01 * torch.sign(g), x - 0.03), x + 0.03), 0, 1)
    assert torch.equal(ops.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf"), want)
    xa, g, x = _imgs((4, 3, 6, 6))
    base = xa.clone().transpose(2, 3)  # non-contiguous, updated in place
    gt, xt = g.transpose(2, 3), x.transpose(2, 3)
    want = torch.clamp(torch.minimum(torch.maximum(base + 0.01 * torch.sign(gt), xt - 0.03), xt + 0.03), 0, 1)
    ops.pgd_step_(base, gt, xt, 0.03, 0.01, "linf")
    assert torch.equal(base, want)


def _l2_formula(xa, g, x, eps, step):
    lead = xa.shape[:-3]
    D = xa.shape[-3:].numel()
    xa64 = xa.double().reshape(-1, D)
    g64 = g.double().reshape(-1, D)
    x64 = x.double().expand(xa.shape).reshape(-1, D)
    e = _row_param(eps, lead, torch.float64)[:, None]
    s = _row_param(step, lead, torch.float64)[:, None]
    t = xa64 + s * g64 / (g64.norm(dim=1, keepdim=True) + 1e-12)
    d = t - x64
    d = d * torch.clamp(e / (d.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
    return (x64 + d).clamp(0, 1).reshape(xa.shape)


@pytest.mark.parametrize("shape,per_peer,shared_x", [((5, 3, 8, 8), False, False), ((2, 6, 3, 8, 8), True, False),
                                                     ((2, 6, 3, 8, 8), True, True)])
def test_l2(shape, per_peer, shared_x):
    xa, g, x = _imgs(shape)
    if shared_x:
        x = x[0]
    eps, step = (torch.tensor([1.0, 0.05], device=DEV), torch.tensor([0.1, 0.5], device=DEV)) if per_peer else (0.5, 0.05)
    want = _l2_formula(xa, g, x, eps, step)
    got = ops.pgd_step_(xa.clone(), g, x, eps, step, "l2")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
    d = (got - x).flatten(-3).norm(dim=-1)
    e = eps[:, None] if per_peer else eps
    assert (d <= e * (1 + 1e-5) + 1e-6).all()


def _l1_formula(xa, g, x, eps, step, k):
    lead = xa.shape[:-3]
    D = xa.shape[-3:].numel()
    xa64 = xa.double().reshape(-1, D)
    g64 = g.double().reshape(-1, D)
    x64 = x.double().expand(xa.shape).reshape(-1, D)
    kk = k.expand(lead).reshape(-1)
    s = _row_param(step, lead, torch.float64)
    # Maini et al.'s l1_dir_topk mask (gap = step): within one step of an edge moving towards it, or on an edge
    gap = s.to(xa.dtype).double()[:, None]  # the kernels compare in the images' dtype
    stuck = ((xa64 <= gap) & (g64 < 0)) | ((xa64 >= 1 - gap) & (g64 > 0)) | (xa64 <= 0) | (xa64 >= 1)
    score = torch.where(stuck, torch.full_like(g64, -1.0), g64.abs())
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: lowest index first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(D, device=DEV).expand_as(order))
    sel = (rank < kk[:, None]) & ~stuck
    mv = (s * 20.0 / kk.double())[:, None]
    xa1 = xa64 + torch.where(sel, mv * torch.sign(g64), torch.zeros_like(g64))
    d = duchi64(xa1 - x64, _row_param(eps, lead, torch.float64))
    return (x64 + d).clamp(0, 1).reshape(xa.shape)


@pytest.mark.parametrize("shape,per_peer,shared_x", [((5, 3, 8, 8), False, False), ((2, 6, 3, 8, 8), True, False),
                                                     ((2, 6, 3, 8, 8), True, True)])
def test_l1_fixed_k(shape, per_peer, shared_x):
    xa, g, x = _imgs(shape)
    if shared_x:
        x = x[0]
    lead = shape[:-3]
    eps, step = (torch.tensor([2.0, 0.3], device=DEV), torch.tensor([0.05, 0.2], device=DEV)) if per_peer else (1.0, 0.05)
    for k in (7, torch.randint(5, 21, lead, device=DEV)):
        kt = torch.full(lead, k, dtype=torch.int64, device=DEV) if isinstance(k, int) else k
        want = _l1_formula(xa, g, x, eps, step, kt)
        got = ops.pgd_step_(xa.clone(), g, x, eps, step, "l1", l1_k=k)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
        d = (got - x).flatten(-3).abs().sum(-1)
        e = eps[:, None] if per_peer else eps
        assert (d <= e * (1 + 1e-5) + 1e-6).all()


# =============================================================================================== project_l1_
@pytest.mark.parametrize("shape,per_peer", [((16, 3, 8, 8), False), ((2, 8, 3, 8, 8), True), ((1, 1, 1, 1), False)])
def test_project_l1_duchi(shape, per_peer):
    lead = shape[:-3]
    d = torch.randn(shape, device=DEV) * torch.rand(lead + (1, 1, 1), device=DEV) * 0.1
    d.view(-1, d.shape[-3:].numel())[0] *= 1e-3  # at least one row inside the ball
    eps = torch.tensor([0.5, 3.0], device=DEV) if per_peer else 2.0
    rows = d.reshape(-1, d.shape[-3:].numel())
    e_rows = _row_param(eps, lead, torch.float64)
    inside = rows.abs().sum(1) <= e_rows.float()
    assert inside.any()
    want = duchi64(rows, e_rows)
    got = d.clone()
    assert ops.project_l1_(got, eps) is got
    g_rows = got.reshape(rows.shape)
    torch.testing.assert_close(g_rows.double(), want, atol=2e-6, rtol=1e-5)
    assert torch.equal(g_rows[inside], rows[inside])  # in-ball rows untouched, bit for bit
    assert (g_rows.double().abs().sum(1) <= e_rows * (1 + 1e-5) + 1e-6).all()


def test_project_l1_edge_radii_and_float64():
    d = torch.randn(6, 3, 4, 4, dtype=torch.float64, device=DEV)
    for eps in (0.0, 1e-3, 1.0, 1e4):
        want = duchi64(d.reshape(6, -1), torch.full((6,), eps, dtype=torch.float64, device=DEV))
        got = ops.project_l1_(d.clone(), eps)
        torch.testing.assert_close(got.reshape(6, -1), want, atol=1e-10, rtol=1e-9)


# =============================================================================================== losses
def _logits(B, C, n, scale=3.0):
    return [(torch.randn(B, C, device=DEV) * scale).requires_grad_() for _ in range(n)]


def _red(per, reduction, C):
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "batchmean":
        return per.sum() / per.shape[0]
    return per.sum() / (per.shape[0] * C)  # "mean" for the KLs: over B*C


def _check(got, want64, inputs, inputs64, rtol=2e-5, atol=2e-6):
    """Values and gradients (with a random upstream gradient) of an fp32 op against a float64 formula."""
    assert got.shape == want64.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want64.detach(), rtol=rtol, atol=atol)
    w = torch.randn(got.shape, device=DEV)
    need = [i for i, t in enumerate(inputs64) if t.requires_grad]
    got_g = torch.autograd.grad((got * w).sum(), [inputs[i] for i in need], allow_unused=True)
    want_g = torch.autograd.grad((want64 * w.double()).sum(), [inputs64[i] for i in need], allow_unused=True)
    for a, b in zip(got_g, want_g):
        assert a is not None and b is not None
        assert a.dtype == torch.float32
        _close_grad(a, b)
    return got_g


def _d64(ts, grads):
    return [t.detach().double().requires_grad_(g) for t, g in zip(ts, grads)]


def _kl64(s, t, T):
    lt = F.log_softmax(t / T, -1)
    return (lt.exp() * (lt - F.log_softmax(s / T, -1))).sum(-1)


@pytest.mark.parametrize("B,C", [(6, 10), (5, 100)])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("detach_teacher", [True, False])
def test_kl_div(B, C, reduction, T, detach_teacher):
    s, t = _logits(B, C, 2)
    s64, t64 = _d64((s, t), (True, not detach_teacher))
    want = _red(_kl64(s64, t64, T), reduction, C)
    got = ops.kl_div(s, t, T, reduction, detach_teacher=detach_teacher)
    _check(got, want, (s, t), (s64, t64))
    if detach_teacher:
        assert torch.autograd.grad(ops.kl_div(s, t, T, reduction).sum(), t, allow_unused=True)[0] is None


def test_kl_div_teacher_grad_closed_form():
    s, t = _logits(4, 10, 2)
    T = 2.0
    (dt,) = torch.autograd.grad(ops.kl_div(s, t, T, "sum", detach_teacher=False), t)
    ps, pt = torch.softmax(s.double() / T, -1), torch.softmax(t.double() / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(dt.double(), pt * ((pt.log() - ps.log()) - kl) / T, atol=1e-6, rtol=1e-5)


def test_kl_div_noncontiguous():
    base_s, base_t = _logits(10, 6, 2)  # [B=6, C=10] views with strides (1, 6)
    s, t = base_s.t(), base_t.t()
    s64, t64 = _d64((base_s, base_t), (True, True))
    want = _red(_kl64(s64.t(), t64.t(), 3.0), "batchmean", 10)
    got = ops.kl_div(s, t, 3.0, "batchmean", detach_teacher=False)
    _check(got, want, (base_s, base_t), (s64, t64))


def _bce64(z, y):
    p = torch.softmax(z, -1)
    lp = F.log_softmax(z, -1)
    oh = F.one_hot(y, z.shape[1]).bool()
    q = p.masked_fill(oh, -1.0).amax(-1)
    return -lp[torch.arange(z.shape[0]), y] - torch.log(1.0001 - q)


@pytest.mark.parametrize("B,C", [(6, 10), (5, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_boosted_ce(B, C, reduction):
    (z,) = _logits(B, C, 1)
    y = torch.randint(0, C, (B,), device=DEV)
    (z64,) = _d64((z,), (True,))
    per = _bce64(z64, y)
    want = per if reduction == "none" else (per.sum() if reduction == "sum" else per.mean())
    _check(ops.boosted_ce(z, y, reduction), want, (z,), (z64,))


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_trades_kl(reduction):
    c, a = _logits(6, 10, 2)
    c64, a64 = _d64((c, a), (True, True))
    want = _red(_kl64(a64, c64, 1.0), reduction, 10)  # KL(p(clean) || p(adv))
    _check(ops.trades_kl(c, a, reduction), want, (c, a), (c64, a64))


@pytest.mark.parametrize("beta", [6.0, 1.5])
def test_mart_loss(beta):
    c, a = _logits(6, 10, 2)
    y = torch.randint(0, 10, (6,), device=DEV)
    c64, a64 = _d64((c, a), (True, True))
    pc = torch.softmax(c64, -1)
    w = 1.0 - pc[torch.arange(6), y]
    want = _bce64(a64, y).mean() + beta * (_kl64(a64, c64, 1.0) * w).mean()
    _check(ops.mart_loss(c, a, y, beta), want, (c, a), (c64, a64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_mse(reduction):
    a, b = _logits(6, 10, 2)
    a64, b64 = _d64((a, b), (True, True))
    sq = (a64 - b64) ** 2
    want = {"mean": sq.mean(), "sum": sq.sum(), "none": sq.sum(-1)}[reduction]
    _check(ops.logit_mse(a, b, reduction), want, (a, b), (a64, b64))


def _tri64(sn, sa, tn, ta, y, delta, use_probs):
    def cos(n, a):
        if use_probs:
            n, a = torch.softmax(n, -1), torch.softmax(a, -1)
        oh = F.one_hot(y, n.shape[1]).double()
        u, v = n - oh, a - oh
        return (u * v).sum(-1) / (u.norm(dim=-1).clamp_min(1e-12) * v.norm(dim=-1).clamp_min(1e-12))

    r = cos(sn, sa) - cos(tn, ta)
    return torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta))


@pytest.mark.parametrize("B,C", [(6, 10), (5, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("delta,use_probs", [(1.0, True), (0.05, True), (1.0, False), (0.1, False)])
def test_triangle_huber(B, C, reduction, delta, use_probs):
    sn, sa, tn, ta = _logits(B, C, 4)
    y = torch.randint(0, C, (B,), device=DEV)
    sn64, sa64, tn64, ta64 = _d64((sn, sa, tn, ta), (True, True, False, False))
    per = _tri64(sn64, sa64, tn64, ta64, y, delta, use_probs)
    want = per if reduction == "none" else (per.sum() if reduction == "sum" else per.mean())
    got = ops.triangle_huber(sn, sa, tn, ta, y, delta, use_probs, reduction)
    _check(got, want, (sn, sa), (sn64, sa64))
    # the teacher is a constant
    again = ops.triangle_huber(sn, sa, tn, ta, y, delta, use_probs, reduction)
    assert torch.autograd.grad(again.sum(), [tn, ta], allow_unused=True) == (None, None)


def test_triangle_huber_default_args():
    sn, sa, tn, ta = _logits(6, 10, 4)
    y = torch.randint(0, 10, (6,), device=DEV)
    sn64, sa64, tn64, ta64 = _d64((sn, sa, tn, ta), (True, True, False, False))
    want = _tri64(sn64, sa64, tn64, ta64, y, 1.0, True).mean()
    _check(ops.triangle_huber(sn, sa, tn, ta, y), want, (sn, sa), (sn64, sa64))
