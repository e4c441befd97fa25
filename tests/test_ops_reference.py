"""The reference ops (fastcollab/reference.py) against independent formulations and invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcollab import reference as R


def duchi_f64(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Independent float64 l1-ball projection of one flat vector (Duchi et al. 2008), written with Python
    loops over the sorted magnitudes."""
    v = v.double()
    if v.abs().sum().item() <= eps:
        return v.clone()
    if eps == 0:
        return torch.zeros_like(v)
    mu = sorted(v.abs().tolist(), reverse=True)
    cs, rho, cs_rho = 0.0, 0, 0.0
    for j, m in enumerate(mu, start=1):
        cs += m
        if m - (cs - eps) / j > 0:
            rho, cs_rho = j, cs
    theta = (cs_rho - eps) / rho
    return torch.sign(v) * (v.abs() - theta).clamp_min(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# --------------------------------------------------------------------------------------------- l1
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 5, 5), (2, 4, 3, 8, 8)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 3.0])
def test_project_l1_matches_f64_duchi(shape, eps):
    d = torch.randn(shape) * 0.3
    out = R.project_l1_(d.clone(), eps)
    rows_in = d.reshape(-1, math.prod(shape[-3:]))
    rows_out = out.reshape_as(rows_in)
    for a, b in zip(rows_in, rows_out):
        want = duchi_f64(a, eps)
        torch.testing.assert_close(b.double(), want, atol=2e-6, rtol=1e-5)


def test_project_l1_invariants():
    d = torch.randn(64, 3, 8, 8) * torch.rand(64, 1, 1, 1)  # a mix of rows inside and outside
    eps = 4.0
    orig = d.clone()
    out = R.project_l1_(d, eps)
    assert out is d
    l1_in = orig.flatten(1).abs().sum(1)
    inside = l1_in <= eps
    assert inside.any() and (~inside).any()
    assert torch.equal(out[inside], orig[inside])  # untouched bit-for-bit
    l1_out = out.flatten(1).abs().sum(1)
    assert (l1_out <= eps * (1 + 1e-5)).all()
    torch.testing.assert_close(l1_out[~inside], torch.full_like(l1_out[~inside], eps), rtol=1e-5, atol=1e-5)
    again = R.project_l1_(out.clone(), eps)  # idempotent
    torch.testing.assert_close(again, out, rtol=0, atol=1e-6)
    assert (torch.sign(out) * torch.sign(orig) >= 0).all()  # signs never flip


def test_project_l1_per_peer_eps_and_half():
    d = torch.randn(3, 4, 2, 4, 4)
    eps = torch.tensor([0.5, 2.0, 100.0])
    out = R.project_l1_(d.clone(), eps)
    for p in range(3):
        for b in range(4):
            want = duchi_f64(d[p, b].flatten(), float(eps[p]))
            torch.testing.assert_close(out[p, b].flatten().double(), want, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[2], d[2])
    h = d.half()
    oh = R.project_l1_(h.clone(), eps)
    assert oh.dtype == torch.float16
    torch.testing.assert_close(oh.float(), R.project_l1_(h.float(), eps), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------- pgd
def _imgs(shape):
    x = torch.rand(shape)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = 1.0
    xa = (x + 0.02 * torch.randn(shape)).clamp(0, 1)
    g = torch.randn(shape)
    g.view(-1)[::5] = 0.0  # sign(0) = 0
    return xa, g, x


def test_linf_semantics_and_sign_zero():
    xa, g, x = _imgs((7, 3, 4, 4))
    out = R.pgd_step_(xa.clone(), g, x, 0.03, 0.01, "linf")
    exp = torch.clamp(torch.min(torch.max(xa + 0.01 * torch.sign(g), x - 0.03), x + 0.03), 0, 1)
    assert torch.equal(out, exp)
    zero = g == 0
    assert torch.equal(out[zero], torch.clamp(torch.min(torch.max(xa, x - 0.03), x + 0.03), 0, 1)[zero])
    assert ((out - x).abs() <= 0.03 + 1e-7).all() and (out >= 0).all() and (out <= 1).all()


def test_linf_per_peer():
    xa, g, x = _imgs((3, 5, 3, 4, 4))
    eps = torch.tensor([0.0, 0.01, 0.1])
    step = torch.tensor([0.5, 0.002, 0.05])
    out = R.pgd_step_(xa.clone(), g, x, eps, step, "linf")
    for p in range(3):
        one = R.pgd_step_(xa[p].clone(), g[p], x[p], float(eps[p]), float(step[p]), "linf")
        assert torch.equal(out[p], one)
    assert torch.equal(out[0], x[0])  # eps 0: back on x
    # shared clean images
    out2 = R.pgd_step_(xa.clone(), g, x[0], eps, step, "linf")
    for p in range(3):
        assert torch.equal(out2[p], R.pgd_step_(xa[p].clone(), g[p], x[0], float(eps[p]), float(step[p]), "linf"))


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (9, 3, 8, 8), (2, 6, 3, 8, 8)])
def test_l2_ball_box_and_formula(shape):
    xa, g, x = _imgs(shape)
    eps, step = 0.5, 0.2
    out = R.pgd_step_(xa.clone(), g, x, eps, step, "l2")
    d = (out - x).flatten(-3)
    assert (d.norm(dim=-1) <= eps * (1 + 1e-5)).all()
    assert (out >= 0).all() and (out <= 1).all()
    x64, xa64, g64 = x.double(), xa.double(), g.double()
    gn = g64.flatten(-3).norm(dim=-1)[(...,) + (None,) * 3]
    dd = xa64 + step * g64 / (gn + 1e-12) - x64
    dn = dd.flatten(-3).norm(dim=-1)[(...,) + (None,) * 3]
    want = (x64 + dd * torch.clamp(eps / (dn + 1e-12), max=1)).clamp(0, 1)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)


def test_l1_step_semantics():
    B = 6
    x = torch.full((B, 1, 4, 8), 0.5)
    xa = x.clone()
    g = torch.randn(B, 1, 4, 8)
    k = torch.tensor([5, 6, 10, 15, 20, 20])
    out = R.pgd_step_(xa.clone(), g, x, 1000.0, 0.01, "l1", l1_k=k)  # huge eps: no projection
    moved = (out != xa).flatten(1)
    assert torch.equal(moved.sum(1), k)
    for b in range(B):
        top = g[b].flatten().abs().topk(int(k[b])).indices
        assert set(moved[b].nonzero().flatten().tolist()) == set(top.tolist())
        mag = (out[b] - xa[b]).flatten()[top]
        torch.testing.assert_close(mag, 0.01 * 20 / k[b].item() * torch.sign(g[b].flatten()[top]))
    # total l1 movement is 20*step whatever k is
    torch.testing.assert_close((out - xa).flatten(1).abs().sum(1), torch.full((B,), 0.2), rtol=1e-5, atol=1e-6)


def test_l1_masks_stuck_coordinates_and_projects():
    x = torch.zeros(2, 1, 2, 16)
    x[:, :, 0] = 1.0
    g = torch.ones(2, 1, 2, 16)
    g[:, :, 1] = -1.0
    g[:, :, 0] *= 10  # the largest |g| sit at 1 with g > 0: stuck
    x[:, :, 1, :3] = 0.5  # a few movable ones: interior (Maini et al. also mask x_adv <= 0 whatever g)
    g[:, :, 1, :3] = 0.5
    g[:, :, 1, 3:] = -1.0  # at 0 with g < 0: stuck
    out = R.pgd_step_(x.clone(), g, x, 0.3, 0.05, "l1", l1_k=5)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert (out[:, :, 1, 3:] == 0).all()
    assert ((out - x).flatten(1).abs().sum(1) <= 0.3 + 1e-6).all()
    assert (out[:, :, 1, :3] > 0.5).all()


def test_l1_random_k_on_device_and_ball():
    xa, g, x = _imgs((2, 16, 3, 8, 8))
    eps = torch.tensor([1.0, 3.0])
    out = R.pgd_step_(xa.clone(), g, x, eps, torch.tensor([0.05, 0.1]), "l1")
    l1 = (out - x).flatten(2).abs().sum(-1)
    assert (l1 <= eps[:, None] * (1 + 1e-5)).all()
    assert (out >= 0).all() and (out <= 1).all()
    k = R.draw_l1_k((1000,), "cpu")
    assert k.min() >= 5 and k.max() <= 20 and k.dtype == torch.int64 and len(k.unique()) == 16


# --------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_div_against_torch(T):
    s, t = torch.randn(9, 100, dtype=torch.float64), torch.randn(9, 100, dtype=torch.float64)
    ls, lt = F.log_softmax(s / T, 1), F.log_softmax(t / T, 1)
    tk = F.kl_div(ls, lt, reduction="none", log_target=True)
    torch.testing.assert_close(R.kl_div(s, t, T, "batchmean"), tk.sum() / 9)
    torch.testing.assert_close(R.kl_div(s, t, T, "mean"), tk.mean())
    torch.testing.assert_close(R.kl_div(s, t, T, "sum"), tk.sum())
    torch.testing.assert_close(R.kl_div(s, t, T, "none"), tk.sum(1))
    h = s.half()
    assert R.kl_div(h, t.half()).dtype == torch.float32


def test_kl_div_detach():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    R.kl_div(s, t).backward()
    assert t.grad is None and s.grad is not None
    R.kl_div(s, t, detach_teacher=False).backward()
    assert t.grad is not None
    s.grad = None
    R.kl_div(s, t, T=2.0).backward()  # d/ds = (p_s - p_t) / (T B)
    want = (torch.softmax(s / 2, 1) - torch.softmax(t / 2, 1)) / (2 * 4)
    torch.testing.assert_close(s.grad, want.detach())


def test_boosted_ce_and_mart_formulas():
    z = torch.randn(16, 10, dtype=torch.float64)
    c = torch.randn(16, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    p = torch.softmax(z, 1)
    other = p.clone()
    other[torch.arange(16), y] = -1
    bce = F.cross_entropy(z, y, reduction="none") - torch.log(1.0001 - other.max(1).values)
    torch.testing.assert_close(R.boosted_ce(z, y, "none"), bce)
    torch.testing.assert_close(R.boosted_ce(z, y), bce.mean())
    torch.testing.assert_close(R.boosted_ce(z, y, "sum"), bce.sum())
    pc = torch.softmax(c, 1)
    kl = (pc * (torch.log(pc) - torch.log(p))).sum(1)
    w = 1 - pc[torch.arange(16), y]
    torch.testing.assert_close(R.mart_loss(c, z, y, 6.0), bce.mean() + 6.0 * (kl * w).mean())
    torch.testing.assert_close(R.trades_kl(c, z, "none"), kl)


def test_trades_grads_both_and_logit_mse():
    c = torch.randn(5, 10, requires_grad=True)
    a = torch.randn(5, 10, requires_grad=True)
    R.trades_kl(c, a).backward()
    assert c.grad is not None and a.grad is not None and c.grad.abs().sum() > 0
    x, y = torch.randn(6, 7), torch.randn(6, 7)
    torch.testing.assert_close(R.logit_mse(x, y), F.mse_loss(x, y))
    torch.testing.assert_close(R.logit_mse(x, y, "sum"), F.mse_loss(x, y, reduction="sum"))
    torch.testing.assert_close(R.logit_mse(x, y, "none"), ((x - y) ** 2).sum(1))


def test_triangle_huber_formula():
    B, C = 8, 10
    sn, sa, tn, ta = (torch.randn(B, C, dtype=torch.float64) for _ in range(4))
    y = torch.randint(0, C, (B,))
    oh = F.one_hot(y, C).double()

    def psi(a, b):
        u, v = torch.softmax(a, 1) - oh, torch.softmax(b, 1) - oh
        return F.cosine_similarity(u, v, dim=1, eps=1e-12)

    r = psi(sn, sa) - psi(tn, ta)
    for delta in (0.01, 1.0):
        want = F.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta)
        torch.testing.assert_close(R.triangle_huber(sn, sa, tn, ta, y, delta, reduction="none"), want)
        torch.testing.assert_close(R.triangle_huber(sn, sa, tn, ta, y, delta), want.mean())
    s = sn.clone().requires_grad_()
    t = tn.clone().requires_grad_()
    R.triangle_huber(s, sa, t, ta, y).backward()
    assert s.grad is not None and t.grad is None
