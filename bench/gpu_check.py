"""Helpers of bench/gpu_check.sh: the environment record, a short profile of one engine, and the summary.

    python -m bench.gpu_check env OUT/env.json
    python -m bench.gpu_check profile --engine fast --model resnet18 --batch-size 128 --steps 3 --json OUT/p.json
    python -m bench.gpu_check summarize OUT          # OUT/summary.json from the steps' records and JSON files

``profile`` runs warm-up steps (the graphed engine captures during them), then ``--steps`` steps under
torch.profiler and reports per step: GPU kernels launched, GPU busy % (the union of kernel intervals over the
profiled wall-clock window) and the top kernels by total GPU time. On the CPU (``--device cpu``, the dry run of
gpu_check.sh) the same code counts CPU operators instead, so the logic is exercised without a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def env_record() -> dict:
    from fastcollab import _cuda_toolkit, _ext

    nvcc = _cuda_toolkit.find_nvcc()
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "nvcc": nvcc,
           "cuda_home": _cuda_toolkit.cuda_home(nvcc) if nvcc else None, "backends": _ext.report().splitlines()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   sms=p.multi_processor_count)
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        out["triton"] = f"unavailable ({type(e).__name__}: {e})"
    return out


def busy_fraction(intervals: list[tuple[float, float]], window: float) -> float:
    """Length of the union of ``(start, end)`` intervals over ``window`` (same unit)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / window if window > 0 else 0.0


def profile(engine_name: str, method: str, model: str, batch_size: int, steps: int, warmup: int,
            device: torch.device, peers: int | None = 2) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.throughput import build_cohort, make_batches
    from fastcollab.engine import EagerEngine, Precision, make_engine
    from fastcollab.methods import StepContext

    cuda = device.type == "cuda"
    cohort = build_cohort(method, model, device, peers=peers)
    precision = Precision(device, amp=cuda)
    engine = (EagerEngine(cohort, precision) if engine_name == "eager" else make_engine("fast", cohort, precision))
    batches, _ = make_batches(warmup + steps, batch_size, device)
    ctx = StepContext(epoch=0, epochs=1)
    for i, (x, y) in enumerate(batches[:warmup]):
        torch.manual_seed(i)
        engine.step(x, y, ctx)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for i, (x, y) in enumerate(batches[warmup:]):
            torch.manual_seed(warmup + i)
            engine.step(x, y, ctx)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    all_spans = [(e.time_range.start, e.time_range.end) for e in events]
    window = (max(e for _, e in all_spans) - min(s for s, _ in all_spans)) if all_spans else 0.0
    per_name: dict[str, list] = {}
    for e in kernels:
        rec = per_name.setdefault(e.name, [0, 0.0])
        rec[0] += 1
        rec[1] += e.time_range.end - e.time_range.start
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    stats = engine.stats() if hasattr(engine, "stats") else {"engine": engine.name}
    return {"engine": engine_name, "engine_stats": stats, "method": method, "model": model, "batch_size": batch_size,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "profiled_steps": steps,
            "what": "GPU kernels" if cuda else "top-level CPU operators (dry run: no GPU)",
            "kernels_per_step": len(kernels) / steps,
            "busy_percent": 100 * busy_fraction(spans, window), "window_ms_per_step": window / 1e3 / steps,
            "top": [{"name": n[:160], "calls_per_step": c / steps, "ms_per_step": t / 1e3 / steps}
                    for n, (c, t) in top]}


def summarize(out_dir: Path) -> dict:
    """summary.json: every step's record (steps.jsonl) plus the JSON each step wrote."""
    steps = [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    summary = {"steps": steps, "ok": all(s["status"] == "ok" or s["status"].startswith("skipped") for s in steps)}
    for f in sorted(out_dir.glob("*.json")):
        if f.name != "summary.json":
            try:
                summary[f.stem] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                summary[f.stem] = {"unreadable": str(e)}
    for k, v in summary.items():
        if k.startswith("throughput") and isinstance(v, dict):
            print(f"{k}: " + "  ".join(f"{c} {v[c]['images_per_s']:.1f} img/s" for c in ("eager", "eager_bf16", "fast")
                                       if isinstance(v.get(c), dict))
                  + (f"  FELL BACK: {v['fallback_reason']}" if v.get("fallback_reason") else ""))
        if k.startswith("profile") and isinstance(v, dict) and "kernels_per_step" in v:
            print(f"{k}: {v['kernels_per_step']:.0f} {v['what']} per step, busy {v['busy_percent']:.1f}%")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("json")
    pr = sub.add_parser("profile")
    pr.add_argument("--engine", choices=["fast", "eager"], default="fast")
    pr.add_argument("--method", default="mat")
    pr.add_argument("--model", default="resnet18")
    pr.add_argument("--peers", type=int, default=2)
    pr.add_argument("--batch-size", type=int, default=128)
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--warmup", type=int, default=5)
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--json", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("dir")
    args = p.parse_args(argv)
    if args.cmd == "env":
        rec = env_record()
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(json.dumps(rec, indent=2))
    elif args.cmd == "profile":
        rec = profile(args.engine, args.method, args.model, args.batch_size, args.steps, args.warmup,
                      torch.device(args.device), args.peers)
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(f"{rec['engine']}: {rec['kernels_per_step']:.0f} {rec['what']} per step, busy {rec['busy_percent']:.1f}%")
    else:
        return 0 if summarize(Path(args.dir))["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
