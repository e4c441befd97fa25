"""Fused ops vs their plain-PyTorch reference on the current device.

    python -m bench.ops [--json out.json] [--device cpu|cuda] [--repeat 50]

For every op: warm-up, then the median wall time of ``--repeat`` timed calls (CUDA: synchronised), for
the reference (fastcollab.reference, i.e. the unfused torch sequence) and for the backend that
fastcollab.ops picks here; prints the ratio reference/fused (> 1: the fused op is faster).
Losses are timed forward + backward (the fused forward already writes the gradient).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from fastcollab import ops
from fastcollab import reference as R


def _timeit(fn, device, repeat, warmup=5):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cases(device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.rand(*shape, generator=g).to(device)

    def rndn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cases = []
    shape = (2, 128, 3, 32, 32)
    x = rnd(*shape)
    xa = (x + 0.01 * rndn(*shape)).clamp(0, 1)
    grad = rndn(*shape)
    eps_pp = torch.tensor([8 / 255, 16 / 255], device=device)
    k = torch.randint(5, 21, shape[:2], generator=g).to(device)
    for norm, eps, step in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1), ("l1", 10.0, 0.05)):
        buf = xa.clone()
        kk = k if norm == "l1" else None
        cases.append((f"pgd_step_ {norm} {list(shape)}",
                      lambda buf=buf, n=norm, e=eps, s=step, kk=kk: R.pgd_step_(buf, grad, x, e, s, n, l1_k=kk),
                      lambda buf=buf, n=norm, e=eps, s=step, kk=kk: ops.pgd_step_(buf, grad, x, e, s, n, l1_k=kk),
                      ("pgd_step_", xa)))
    buf = xa.clone()
    cases.append((f"pgd_step_ linf per-peer eps {list(shape)}",
                  lambda: R.pgd_step_(buf, grad, x, eps_pp, 2 / 255, "linf"),
                  lambda: ops.pgd_step_(buf, grad, x, eps_pp, 2 / 255, "linf"), ("pgd_step_", xa)))
    d0 = 0.01 * rndn(256, 3, 32, 32)
    dbuf = d0.clone()

    def ref_proj():
        dbuf.copy_(d0)
        R.project_l1_(dbuf, 10.0)

    def fused_proj():
        dbuf.copy_(d0)
        ops.project_l1_(dbuf, 10.0)

    cases.append(("project_l1_ [256,3,32,32] (+copy)", ref_proj, fused_proj, ("project_l1_", d0)))

    for B, C in ((128, 10), (128, 100), (512, 1000)):
        a = rndn(B, C).requires_grad_()
        b = rndn(B, C).requires_grad_()
        c, d = rndn(B, C), rndn(B, C)
        y = torch.randint(0, C, (B,), generator=g).to(device)
        losses = {
            "kl_div": lambda m: m.kl_div(a, c, 4.0),
            "boosted_ce": lambda m: m.boosted_ce(a, y),
            "trades_kl": lambda m: m.trades_kl(a, b),
            "mart_loss": lambda m: m.mart_loss(a, b, y),
            "logit_mse": lambda m: m.logit_mse(a, b),
            "triangle_huber": lambda m: m.triangle_huber(a, b, c, d, y),
        }
        for name, f in losses.items():
            def run(m=None, f=f):
                loss = f(m)
                loss.backward()
                a.grad = None
                b.grad = None

            cases.append((f"{name} fwd+bwd [{B},{C}]", lambda run=run: run(R), lambda run=run: run(ops), (name, a)))
    return cases


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(ops.backend_report(device), f"threads={torch.get_num_threads()} loadavg={_loadavg()}")
    rows = []
    print(f"{'op':44s} {'backend':9s} {'ref ms':>9s} {'fused ms':>9s} {'ref/fused':>9s}")
    for name, ref, fused, (opname, t) in _cases(device):
        if args.filter not in name:
            continue
        backend = ops.resolve(opname, device, t.dtype)
        tr = _timeit(ref, device, args.repeat)
        tf = _timeit(fused, device, args.repeat)
        rows.append({"op": name, "backend": backend, "ref_ms": tr * 1e3, "fused_ms": tf * 1e3, "ratio": tr / tf})
        print(f"{name:44s} {backend:9s} {tr * 1e3:9.3f} {tf * 1e3:9.3f} {tr / tf:9.2f}")
    meta = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg": _loadavg(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.ops " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
