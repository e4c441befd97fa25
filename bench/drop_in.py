"""The fused ops dropped into a typical TRADES training loop: the four-line PGD update and the KL replaced by
``fastcollab.ops.pgd_step_`` and ``fastcollab.ops.trades_kl``; everything else unchanged.

    python -m bench.drop_in [--model smallcnn] [--batch-size 128] [--steps 10] [--json PATH]

Runs both loops from the same weights, batch and seed in one process, interleaved, and reports ms per
training step (median), the ratio, and whether the two produce the same losses.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bench.throughput import write_result
from fastcollab import ops
from fastcollab.models import create_model

EPS, STEP, STEPS, BETA = 0.031, 0.007, 10, 6.0


def trades_step_plain(model, opt, x, y):
    """What a TRADES script does today (Zhang et al.'s loop, input gradients only)."""
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
        grad, = torch.autograd.grad(kl, x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()                      # the four-line update
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    logits, logits_adv = model(x), model(x_adv)
    loss = F.cross_entropy(logits, y) + BETA * F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1),
                                                         reduction="batchmean")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def trades_step_fused(model, opt, x, y):
    """The same loop with fastcollab's fused ops."""
    model.eval()
    with torch.no_grad():
        clean = model(x)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp_(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        kl = ops.kl_div(model(x_adv), clean, reduction="sum")
        grad, = torch.autograd.grad(kl, x_adv)
        x_adv = ops.pgd_step_(x_adv.detach(), grad, x, EPS, STEP)      # one fused, in-place update
    model.train()
    logits, logits_adv = model(x), model(x_adv)
    loss = F.cross_entropy(logits, y) + BETA * ops.trades_kl(logits, logits_adv)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.drop_in", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop (after 2 warm-up steps)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = create_model(args.model)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    loops = {"plain": trades_step_plain, "fused": trades_step_fused}
    state = {}
    for name in loops:
        model = copy.deepcopy(base)
        state[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times = {n: [] for n in loops}
    losses = {n: [] for n in loops}
    for i in range(args.steps + 2):
        for name, step in loops.items():  # interleaved: both loops see the same machine load
            torch.manual_seed(100 + i)
            t0 = time.perf_counter()
            loss = step(*state[name], x, y)
            dt = time.perf_counter() - t0
            losses[name].append(float(loss))
            if i >= 2:
                times[name].append(dt * 1e3)
    ms = {n: statistics.median(t) for n, t in times.items()}
    diff = max(abs(a - b) for a, b in zip(losses["plain"], losses["fused"]))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": f"cpu ({platform.machine()}, "
              f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "model": args.model,
              "batch_size": args.batch_size, "ms_per_step": ms, "ratio_plain_over_fused": ms["plain"] / ms["fused"],
              "max_loss_diff": diff, "ops": ops.backend_report("cpu")}
    print(json.dumps(report, indent=2))
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
