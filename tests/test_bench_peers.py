"""bench.peers: importing an official repository's functions from a checkout, driving them beside fastcollab's
engines, comparing. No network and no official code: the "peer repositories" here are written by the tests
(the official functions' signatures, our own bodies), in a temporary folder."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from bench import peers
from fastcollab.errors import FastcollabError

# TRADES' signature (trades.py: trades_loss(model, x_natural, y, optimizer, step_size, epsilon, perturb_steps,
# beta, distance)); the body is TRADES Eq. 5 written for this test; ``.cuda()`` as the official code calls it
FAKE_TRADES = '''
import torch
import torch.nn.functional as F

LOSS_SCALE = {loss_scale}


def trades_loss(model, x_natural, y, optimizer, step_size=0.003, epsilon=0.031, perturb_steps=10, beta=1.0,
                distance="l_inf"):
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x_natural), dim=1)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).cuda().detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(kl, [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x_natural - epsilon),
                          x_natural + epsilon).clamp(0.0, 1.0)
    model.train()
    optimizer.zero_grad()
    clean = model(x_natural)
    adv = model(x_adv.detach())
    robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return LOSS_SCALE * (F.cross_entropy(clean, y) + beta * robust)
'''

# CAT's layout: train_cat.py imports packages it never uses in attack_pgd (tensorboardX: stubbed when absent)
FAKE_CAT_TRADES = '''
import torch
import torch.nn.functional as F


def trades_loss(model, epoch, x_natural, y, step_size=0.003, epsilon=0.031, perturb_steps=10, distance="l_inf"):
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x_natural), dim=1)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).cuda().detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(kl, [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x_natural - epsilon),
                          x_natural + epsilon).clamp(0.0, 1.0)
    model.train()
    return x_adv.detach()
'''
FAKE_CAT_SCRIPT = '''
import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from trades import *


def attack_pgd(model, X, y, epsilon, alpha, attack_iters, restarts, norm, BNeval=False):
    if BNeval:
        model.eval()
    delta = torch.zeros_like(X).cuda().uniform_(-epsilon, epsilon)
    delta = torch.max(torch.min(delta, 1 - X), -X)
    for _ in range(attack_iters):
        delta.requires_grad_()
        grad = torch.autograd.grad(F.cross_entropy(model(X + delta), y), [delta])[0]
        delta = (delta.detach() + alpha * grad.sign()).clamp(-epsilon, epsilon)
        delta = torch.max(torch.min(delta, 1 - X), -X)
    if BNeval:
        model.train()
    return delta.detach(), torch.zeros(y.shape[0])
'''


def _repo(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def _run(repo, method, out, *extra):
    rc = peers.main(["--peer-repo", str(repo), "--peer-commit", "fake0000", "--method", method,
                     "--batch-size", "8", "--steps", "1", "--warmup", "1", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_trades_peer_drive_and_schema(tmp_path):
    repo = _repo(tmp_path, {"trades.py": FAKE_TRADES.format(loss_scale=1.0)})
    res = _run(repo, "trades", tmp_path / "out.json")
    for key in ("official", "fastcollab_eager", "fastcollab_fast"):
        assert res[key]["images_per_s"] > 0 and len(res[key]["losses"]) == 2
    assert res["ratio_fast_vs_official"] == pytest.approx(
        res["fastcollab_fast"]["images_per_s"] / res["official"]["images_per_s"])
    assert res["ratio_eager_vs_official"] > 0
    assert res["peer"]["commit"] == "fake0000" and res["peer"]["functions"] == ["trades.trades_loss"]
    assert res["settings"]["official"]["beta"] == res["settings"]["fastcollab"]["beta"] == 6.0
    assert res["settings"]["official"]["step_size"] == res["settings"]["fastcollab"]["step"] == 0.007
    assert len(res["losses"]["official_channels_last"]) == 2
    # an honest TRADES step computes fastcollab's loss: same within the sign-flip tolerance
    assert res["same_losses"], res["losses"]
    assert res["first_step_loss_diff"]["eager"] < 5e-3
    # the shim is gone afterwards and the peer's module did not stay importable
    import torch
    assert torch.Tensor.cuda.__name__ == "cuda"
    assert "trades" not in sys.modules


def test_a_different_loss_is_caught(tmp_path):
    """The comparison can fail: a peer whose loss is 10 % larger differs beyond the tolerance."""
    res = _run(_repo(tmp_path, {"trades.py": FAKE_TRADES.format(loss_scale=1.1)}), "trades",
               tmp_path / "out.json", "--no-self-check")
    assert not res["same_losses"]
    assert res["max_loss_diff"]["eager"] > 0.1
    assert "official_self_diff" not in res


def test_cat_inline_loop_with_stubbed_imports(tmp_path):
    res = _run(_repo(tmp_path, {"trades.py": FAKE_CAT_TRADES, "train_cat.py": FAKE_CAT_SCRIPT}), "cat",
               tmp_path / "out.json")
    assert res["peer"]["functions"] == ["train_cat.attack_pgd", "train_cat.trades_loss"]
    if "tensorboardX" in res["peer"]["stubbed_imports"]:
        assert "tensorboardX" not in sys.modules
    assert res["settings"]["fastcollab"]["view_bn"] == "train"
    assert res["same_losses"], res["losses"]


def test_missing_repo_is_one_line(tmp_path, capsys):
    assert peers.main(["--peer-repo", str(tmp_path / "nowhere"), "--method", "trades"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a directory" in err and "yaodongyu/TRADES" in err


@pytest.mark.parametrize("files, needle", [
    ({}, "has no mart.py"),
    ({"mart.py": "def other():\n    pass\n"}, "has no mart_loss"),
    ({"mart.py": "import not_a_module_anywhere\n"}, "importing"),
])
def test_repo_without_the_expected_code(tmp_path, files, needle):
    with pytest.raises(FastcollabError, match=needle) as info:
        peers.load_peer(_repo(tmp_path, files), "mart")
    assert "YisenWang/MART" in str(info.value)


def test_short_training_run_reports_accuracy(tmp_path, mini_npz):
    """--train-epochs: both loops train on real images, then clean / PGD-20 accuracy of each."""
    d = np.load(mini_npz)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=d["x_train"][:64], y_train=d["y_train"][:64], x_test=d["x_test"][:32],
             y_test=d["y_test"][:32])
    repo = _repo(tmp_path, {"trades.py": FAKE_TRADES.format(loss_scale=1.0)})
    out = tmp_path / "acc.json"
    rc = peers.main(["--peer-repo", str(repo), "--method", "trades", "--batch-size", "32", "--train-epochs", "1",
                     "--data", f"npz:{data}", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["train_steps"] == 2 and res["test_images"] == 32
    for loop in ("official", "fastcollab_fast"):
        acc = res["accuracy"][loop]["p0"]
        assert 0 <= acc["pgd20"] <= acc["clean"] <= 100
    assert len(res["losses"]["official"]) == len(res["losses"]["fastcollab_fast"]) == 2


def test_bad_data_spec_is_one_line(tmp_path, capsys):
    repo = _repo(tmp_path, {"trades.py": FAKE_TRADES.format(loss_scale=1.0)})
    assert peers.main(["--peer-repo", str(repo), "--method", "trades", "--data", "npz:/no/such.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bench.peers:")
