"""Throughput of one cohort training step: images/s, ms/step, achieved TFLOP/s, fraction of peak, memory.

    python -m bench.throughput --method mat --model smallcnn --peers 2 --batch-size 128 --engine fast
    python -m bench.throughput --compare --method mat --peers 2 --model smallcnn --batch-size 128 --json F
    python -m bench.throughput --ablate --method mat --model smallcnn --batch-size 128     # CPU: each change

Engines: ``eager`` (EagerEngine, fp32, the reference ops: the careful researcher's PyTorch), ``fast`` (the
CPU fast path, or the CUDA-graphed engine on a GPU), ``paper`` (what users migrate from: parameter
gradients inside the attack via ``loss.backward()``, clean logits recomputed at every attack step, every
view its own forward, a torch DataLoader over a CPU TensorDataset; fp32, reference ops).

``--compare`` runs eager (fp32) and fast in one process -- on CUDA also eager bf16 (same autocast and ops as
fast, no graph: the graph's gain is ``fast / eager_bf16``, bf16's is ``eager_bf16 / eager``) -- interleaved
step by step (the 2-core CPU is shared: interleaving makes the ratio fair), from the same weights, batches and
random seed per step, and writes ``{"eager": {...}, "eager_bf16": {...} or null, "fast": {...},
"ratio": fast_img_s / eager_img_s, "graph_ratio": fast / eager_bf16, "fallback_reason": ..., "captures": ...,
"replays": ..., "same_losses": ..., "max_loss_diff": ...}``. A graphed engine that fell back to eager is never
reported as ``fast``: its column is ``fast_fell_back``, ``fast`` and the ratios are null, and
``fallback_reason`` says why. Each column records its own peak GPU memory (peak of its steps above what was
allocated before them); the header records the TF32 settings and the device's datasheet peak.
Losses are "the same" when they agree within ``--loss-rtol`` (fp32 on CPU: PGD's sign() turns float-rounding
differences of the folded / channels_last / fused-op arithmetic into a few flipped pixels, so one step's losses
agree to ~1e-4 (MAT) .. ~1e-3 (TRADES-KL attacks, whose first step is a difference of nearly equal softmaxes),
not bitwise; by default every step starts both engines from the same weights, see ``sync_cohort``). Timing: ``--warmup`` steps first, then the median of ``--steps`` steps (CUDA: events after
a synchronize). FLOPs of one step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` during
a warm-up step of the eager engine (convolutions and matmuls, forward and backward).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcollab import ops, reference
from fastcollab.attacks import OBJECTIVES, OBJECTIVES_WITH_GUIDE_IN_LOOP, bn_mode, random_init
from fastcollab.cohort import Cohort, sgd_for
from fastcollab.config import resolve_config
from fastcollab.data import DeviceLoader, load_dataset
from fastcollab.engine import EagerEngine, Precision, make_engine
from fastcollab.engine.fast import FastEngine, ops_backend
from fastcollab.methods import CLEAN, LogitTable, StepContext, get_method
from fastcollab.rundir import build_peer_models
from fastcollab.schedule import LRSchedule

# NVIDIA datasheet peaks, dense (the sparse figures / 2), TFLOP/s: bf16 tensor cores, tf32 tensor cores, fp32
# (CUDA cores). Matched against torch.cuda.get_device_name in this order (most specific first): an SXM H100
# reports "NVIDIA H100 80GB HBM3", a PCIe one "NVIDIA H100 PCIe".
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},       # SXM
    "H200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},       # SXM
}


class _NoModules:
    """FlopCounterMode's module tracker hooks backward into every module, which autograd.grad with respect
    to an input (the attacks) rejects; counting totals needs no per-module attribution."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class StepFlopCounter(FlopCounterMode):
    """torch.utils.flop_counter.FlopCounterMode (its FLOP formulas), totals only."""

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


# ------------------------------------------------------------------------------------------------ cohort
def build_cohort(method: str, model: str, device: torch.device, seed: int = 0, peers: int | None = None,
                 peer_methods: str | None = None, num_classes: int = 10, overrides: dict | None = None) -> Cohort:
    """The cohort ``python -m fastcollab.train`` builds for these settings (paper defaults, or ``overrides``
    of them, fresh weights from ``seed``): the same seed gives bit-identical weights."""
    given = {"method": method, "model": model, "dataset": "synthetic", "device": str(device), "epochs": 1,
             **(overrides or {})}
    if peers is not None and method == "mat":
        given["peers"] = peers
    if peer_methods is not None and method == "cat":
        given["peer_methods"] = [t.strip() for t in peer_methods.split(",") if t.strip()]
    cfg = resolve_config(given)
    cfg["num_classes"] = num_classes
    torch.manual_seed(seed)
    m = get_method(method)(cfg)
    models = {n: mm.to(device) for n, mm in build_peer_models(cfg, m, num_classes).items()}
    if any(not p.trainable for p in m.peers()):
        raise SystemExit(f"bench.throughput: {method} needs a frozen teacher; benchmark it through train.py")
    opts = {n: sgd_for(mm, cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["nesterov"]) for n, mm in models.items()}
    sched = {n: LRSchedule(cfg["schedule"], cfg["lr"], cfg["epochs"], cfg["lr_drops"]) for n in models}
    return Cohort(m, models, opts, sched)


def make_batches(n: int, batch_size: int, device: torch.device, seed: int = 0, dataset: str | None = None):
    """``n`` training batches of the synthetic set (or of ``dataset``, a load_dataset spec) through the
    on-device loader (crop + flip)."""
    data = load_dataset(dataset or f"synthetic:{max(n * batch_size, batch_size)}")
    loader = DeviceLoader(data.x_train, data.y_train, batch_size, device, train=True, seed=seed)
    out = []
    while len(out) < n:
        out.extend(list(loader))
    return out[:n], data


# ------------------------------------------------------------------------------------ paper-style loop
class PaperStyleEngine(EagerEngine):
    """What users migrate from (same math, spent carelessly): ``loss.backward()`` inside the attack (parameter
    gradients computed and thrown away), clean reference logits recomputed at every attack step, each view its
    own forward, fp32, reference ops. Data come from a torch DataLoader over a CPU TensorDataset (``run``)."""

    name = "paper"

    def _attack(self, a, x, y, clean):
        spec = a.spec
        if getattr(spec, "norm", None) not in ("linf", "l2", "l1"):
            return super()._attack(a, x, y, clean)
        models = self.cohort.models
        model, guide = models[a.peer], models.get(a.guide)
        objective = OBJECTIVES[spec.objective]
        x_adv = random_init(x.detach(), spec)
        with bn_mode([model], [spec.bn_mode]):
            for _ in range(spec.steps):
                ref = {}
                if a.spec.objective == "trades_kl":
                    with bn_mode([model], ["eval"]):
                        ref["attacked_clean"] = model(x).detach()
                if a.spec.objective == "teacher_kl":
                    ref["guide_clean"] = guide(x).detach()
                x_adv.requires_grad_(True)
                logits = {"attacked": model(x_adv)}
                if spec.objective in OBJECTIVES_WITH_GUIDE_IN_LOOP:
                    logits["guide"] = guide(x_adv)
                loss = objective(logits, y, ref).sum()
                model.zero_grad()
                loss.backward()                       # parameter gradients too: the paper-code habit
                grad = x_adv.grad.detach()
                x_adv = x_adv.detach()
                reference.pgd_step_(x_adv, grad, x, spec.eps, spec.step, spec.norm,
                                    reference.draw_l1_k(x_adv.shape[:-3], x.device) if spec.norm == "l1" else None)
        return x_adv.detach()

    def compute_table(self, x, y):
        plan, models = self.plan, self.cohort.models
        clean = {m: self._nograd(m, [x], "eval")[0] for m in plan.clean_refs}
        inputs = {CLEAN: x, **self._attacks(x, y, clean)}
        table = {(m, CLEAN): logits for m, logits in clean.items()}
        for m, keys in plan.nograd_batched.items():            # one forward per view, not one per model
            for k in keys:
                table[m, k] = self._nograd(m, [inputs[k]], "eval")[0]
        for v in plan.nograd_single:
            table[v.model, v.input] = self._nograd(v.model, [inputs[v.input]], self.view_bn)[0]
        for v in plan.grad_views:
            table[v.model, v.input] = models[v.model](inputs[v.input]).float()
        return LogitTable(table)


def paper_batches(batches, device):
    """The same batches, served the paper-code way: a DataLoader over a CPU TensorDataset, moved per batch."""
    xs = torch.cat([b[0].cpu() for b in batches])
    ys = torch.cat([b[1].cpu() for b in batches])
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=batches[0][0].shape[0],
                                     shuffle=False, num_workers=0)
    for x, y in dl:
        yield x.to(device), y.to(device)


# ------------------------------------------------------------------------------------------------ timing
class Runner:
    """One engine of the benchmark with its cohort, timer and records."""

    def __init__(self, label: str, engine, backend: str | None, device: torch.device):
        self.label, self.engine, self.backend, self.device = label, engine, backend, device
        self.times: list[float] = []
        self.losses: list[float] = []
        self.flops: int | None = None
        self.peak_mem_mib: float | None = None     # CUDA: the largest step's peak above what was allocated before

    def step(self, x, y, seed: int, timed: bool, count_flops: bool = False) -> None:
        cohort = self.engine.cohort
        cohort.set_epoch_time(0.0)
        torch.manual_seed(seed)
        counter = StepFlopCounter() if count_flops else contextlib.nullcontext()
        cuda = self.device.type == "cuda"
        with ops_backend(self.backend):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            with counter:
                result = self.engine.step(x, y, StepContext(epoch=0, epochs=1))
            if cuda:
                end.record()
                torch.cuda.synchronize()
                dt = start.elapsed_time(end) / 1e3
                peak = (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20
                self.peak_mem_mib = max(self.peak_mem_mib or 0.0, peak)
            else:
                dt = time.perf_counter() - t0
        self.losses.append(float(result.total.detach()))
        if count_flops:
            self.flops = int(counter.get_total_flops())
        if timed:
            self.times.append(dt)

    def report(self, batch_size: int, flops: int | None) -> dict:
        med = statistics.median(self.times)
        out = {"engine": self.label, "describe": getattr(self.engine, "describe", lambda: self.label)(),
               "ops_backend": self.backend or ops.resolve("kl_div", self.device),
               "images_per_s": batch_size / med, "ms_per_step": 1e3 * med,
               "ms_per_step_all": [round(1e3 * t, 2) for t in self.times], "losses": self.losses,
               "flops_per_step": flops, "peak_step_memory_mib": self.peak_mem_mib}
        stats = getattr(self.engine, "stats", None)
        if callable(stats):
            out.update(stats())       # graphed engine: fallback_reason, captures, replays, ...
        precision = getattr(self.engine, "precision", None)
        kind = precision.amp_dtype if precision is not None and precision.amp else _fp32_kind()
        out["precision"] = kind
        if flops:
            out["achieved_tflops"] = flops / med / 1e12
            peak = peak_tflops(self.device, kind)
            if peak:
                out["peak_tflops"], out["fraction_of_peak"] = peak, out["achieved_tflops"] / peak
        return out


def _fp32_kind() -> str:
    """fp32 convolutions run on TF32 tensor cores when cuDNN may use TF32 (torch's default)."""
    return "tf32" if torch.cuda.is_available() and torch.backends.cudnn.allow_tf32 else "fp32"


def peak_tflops(device: torch.device, kind: str = "bf16", name: str | None = None) -> float | None:
    """The datasheet peak (dense TFLOP/s) of this GPU for ``kind`` (bf16 / tf32 / fp32); None if unknown."""
    if device.type != "cuda" and name is None:
        return None
    name = name if name is not None else torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peaks is None else peaks.get("bf16" if kind == "fp16" else kind)


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20}
    return {"peak_rss_mib (process)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def make_runner(kind: str, args, device: torch.device, ablation: dict | None = None) -> Runner:
    cohort = build_cohort(args.method, args.model, device, args.seed, args.peers, args.peer_methods)
    fp32 = Precision(device)
    if kind == "eager":
        return Runner("eager", EagerEngine(cohort, fp32, args.view_bn), "reference", device)
    if kind == "eager_bf16":   # fast's precision and ops, no graph
        return Runner("eager_bf16", EagerEngine(cohort, Precision(device, amp=True), args.view_bn), None, device)
    if kind == "paper":
        return Runner("paper", PaperStyleEngine(cohort, fp32, args.view_bn), "reference", device)
    if kind == "fast" and ablation is None:
        precision = Precision(device, amp=args.amp or (device.type == "cuda" and not args.fp32))
        return Runner("fast", make_engine("fast", cohort, precision, args.view_bn), None, device)
    opts = dict(ablation or {})
    backend = opts.pop("ops_backend", None)
    return Runner(kind, FastEngine(cohort, fp32, args.view_bn, **opts), backend, device)


ABLATIONS = {   # CPU: each change of the fast path alone, then all together
    "eager (reference ops)": None,
    "+ C++ fused ops only": dict(twins=False, channels_last=False, ops_backend="cpp"),
    "+ gradient-free eval twin only": dict(fold_bn=False, swap_relu_pool=False, channels_last=False,
                                           ops_backend="reference"),
    "+ BN folded into conv (twin)": dict(swap_relu_pool=False, channels_last=False, ops_backend="reference"),
    "+ channels_last only": dict(twins=False, ops_backend="reference"),
    "+ fold + relu/pool swap (twin)": dict(channels_last=False, ops_backend="reference"),
    "fast (all of the above)": dict(ops_backend="cpp"),
}


@torch.no_grad()
def sync_cohort(src: Cohort, dst: Cohort) -> None:
    """Copy weights, BN statistics and momentum buffers of ``src`` into ``dst`` in place (layouts kept)."""
    for name, m in src.models.items():
        dst.models[name].load_state_dict(m.state_dict())
    for name, opt in src.optimizers.items():
        other = dst.optimizers[name]
        for ga, gb in zip(opt.param_groups, other.param_groups):
            for pa, pb in zip(ga["params"], gb["params"]):
                buf_a = opt.state.get(pa, {}).get("momentum_buffer")
                buf_b = other.state.get(pb, {}).get("momentum_buffer")
                if buf_a is not None and buf_b is not None:
                    buf_b.copy_(buf_a)


def run_interleaved(runners: list[Runner], batches, args) -> None:
    """Warm-up then timed steps, the engines taking turns on each batch with the same seed (and, unless
    --no-resync, the same weights: each step starts every engine from the first engine's state, outside the
    timed region, so that loss differences are one step's rounding, not rounding compounded over steps)."""
    n_warm = args.warmup
    for i, (x, y) in enumerate(batches):
        if not args.no_resync:
            for r in runners[1:]:
                sync_cohort(runners[0].engine.cohort, r.engine.cohort)
        for j, r in enumerate(runners):
            count = i == 0 and j == 0 and not args.no_flops
            r.step(x, y, args.seed * 1000 + i, timed=i >= n_warm, count_flops=count)
        print(f"  step {i + 1}/{len(batches)}: " + "  ".join(
            f"{r.label} {r.losses[-1]:.5f}" + (f" {1e3 * r.times[-1]:.0f} ms" if i >= n_warm else " (warm-up)")
            for r in runners), file=sys.stderr, flush=True)


def header(args, device) -> dict:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": dev,
           "torch": torch.__version__, "command": "python -m bench.throughput " + " ".join(sys.argv[1:]),
           "method": args.method, "model": args.model, "peers": args.peers, "peer_methods": args.peer_methods,
           "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
           "tf32": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision(),
                    "cudnn_benchmark": torch.backends.cudnn.benchmark}}
    if device.type == "cuda":
        out["peak_tflops"] = {k: peak_tflops(device, k) for k in ("bf16", "tf32", "fp32")}
    return out


def compare(runners: list[Runner], args, out: dict) -> None:
    """The --compare columns (eager fp32, eager bf16 when run, fast or fast_fell_back) and their ratios."""
    flops = runners[0].flops
    reps = {r.label: r.report(args.batch_size, flops) for r in runners}
    e, f, eb = reps["eager"], reps["fast"], reps.get("eager_bf16")
    fell_back = f.get("fallback_reason") is not None
    if fell_back:
        f["engine"] = "fast (FELL BACK to eager)"
    bf16 = bool(getattr(runners[1].engine, "precision", None) and runners[1].engine.precision.amp)
    rtol = args.loss_rtol if args.loss_rtol is not None else (5e-2 if bf16 else 5e-3)
    diffs = [abs(a - b) for a, b in zip(e["losses"], f["losses"])]
    same = all(d <= rtol * max(1.0, abs(a)) for d, a in zip(diffs, e["losses"]))
    out.update({"eager": e, "eager_bf16": eb, "fast": None if fell_back else f,
                "fallback_reason": f.get("fallback_reason"), "captures": f.get("captures"),
                "replays": f.get("replays"),
                "ratio": None if fell_back else f["images_per_s"] / e["images_per_s"],
                "graph_ratio": None if fell_back or eb is None else f["images_per_s"] / eb["images_per_s"],
                "bf16_ratio": None if eb is None else eb["images_per_s"] / e["images_per_s"],
                "same_losses": same, "max_loss_diff": max(diffs), "loss_rtol": rtol})
    if eb is None:
        out["eager_bf16_skipped"] = "CPU: the CPU fast engine runs fp32, so eager bf16 is not one of its parts"
    if fell_back:
        out["fast_fell_back"] = f
        out["ratio_fell_back_vs_eager"] = f["images_per_s"] / e["images_per_s"]
    if "paper" in reps:
        pr = reps["paper"]
        out["paper"] = pr
        out["ratio_vs_paper"] = f["images_per_s"] / pr["images_per_s"]
        out["paper_max_loss_diff"] = max(abs(a - b) for a, b in zip(e["losses"], pr["losses"]))
    for r in reps.values():
        mem = r.get("peak_step_memory_mib")
        print(f"{r['engine']:26s} {r['ms_per_step']:9.1f} ms/step  {r['images_per_s']:8.2f} img/s  "
              + (f"{r['achieved_tflops']:.4f} TFLOP/s" if r.get("achieved_tflops") else "")
              + (f" ({100 * r['fraction_of_peak']:.1f}% of {r['precision']} peak)" if r.get("fraction_of_peak") else "")
              + (f"  peak +{mem:.0f} MiB" if mem is not None else ""))
    if fell_back:
        print(f"FAST FELL BACK TO EAGER (no fast column): {out['fallback_reason']}")
    else:
        print(f"ratio fast/eager {out['ratio']:.3f}"
              + (f"   graph gain fast/eager_bf16 {out['graph_ratio']:.3f}" if out["graph_ratio"] else "")
              + (f"   captures {out['captures']} replays {out['replays']}" if out["captures"] is not None else ""))
    print(f"same losses: {same} (max |dloss| {out['max_loss_diff']:.2e}, rtol {rtol})"
          + (f"   fast/paper {out['ratio_vs_paper']:.3f}" if "paper" in reps else ""))


# ------------------------------------------------------------------------------------ --world N (scale out)
def _world_worker(rank: int, world: int, rendezvous: str, args, mode: str, results) -> None:
    """One rank of ``--world``: ``mode`` is ``single`` (world 1, the plain engine on the whole batch),
    ``data`` or ``peer``; times every step and, by wrapping torch.distributed's collectives, the time and
    bytes spent in them."""
    import torch.distributed as dist

    from fastcollab import distributed as D
    from fastcollab.engine import make_distributed_engine

    torch.set_num_threads(args.threads or 1)
    if mode != "single":
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    spent = {"s": 0.0, "bytes": 0, "calls": 0}
    for name in ("all_reduce", "all_gather", "broadcast"):
        fn = getattr(dist, name)

        def timed(*a, _fn=fn, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            spent["s"] += time.perf_counter() - t0
            spent["bytes"] += sum(t.numel() * t.element_size() for t in a if torch.is_tensor(t))
            spent["calls"] += 1
            return out
        setattr(dist, name, timed)
    device = torch.device("cpu")
    cohort = build_cohort(args.method, args.model, device, args.seed, args.peers, args.peer_methods)
    engine, (index, count) = make_distributed_engine(args.engine if args.engine != "paper" else "fast", cohort,
                                                     Precision(device), args.view_bn,
                                                     peer_parallel=mode == "peer")
    batches, _ = make_batches(args.warmup + args.steps, args.batch_size, device, args.seed)
    times, ctx = [], StepContext()
    for i, (x, y) in enumerate(batches):
        lo, hi = D.shard_bounds(len(y), index, count)
        if i == args.warmup:
            spent.update(s=0.0, bytes=0, calls=0)
        t0 = time.perf_counter()
        engine.step(x[lo:hi], y[lo:hi], ctx)
        times.append(time.perf_counter() - t0)
    timed_steps = times[args.warmup:]
    if rank == 0:
        results[mode] = {"world": world, "ms_per_step": 1e3 * statistics.median(timed_steps),
                         "images_per_s": args.batch_size / statistics.median(timed_steps),
                         "collective_ms_per_step": 1e3 * spent["s"] / len(timed_steps),
                         "collectives_per_step": spent["calls"] / len(timed_steps),
                         "bytes_sent_per_step_per_rank": spent["bytes"] / len(timed_steps)}
    if mode != "single":
        dist.destroy_process_group()


def measure_world(args, world: int) -> dict:
    """``--world N`` (CPU, gloo): images/s of one process, then of N data-parallel and N peer-parallel processes
    (one thread each unless --threads), in one run; collective time and bytes per step of rank 0."""
    import tempfile

    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_world_worker, args=(1, "", args, "single", results), nprocs=1)
        for mode in ("data", "peer"):
            mp.spawn(_world_worker, args=(world, f"file://{tmp}/{mode}", args, mode, results), nprocs=world)
    out = dict(results)
    for mode in ("data", "peer"):
        out[mode]["speedup_vs_1"] = out[mode]["images_per_s"] / out["single"]["images_per_s"]
    for mode, r in out.items():
        print(f"{mode:6s} x{r['world']}: {r['ms_per_step']:8.1f} ms/step  {r['images_per_s']:7.2f} img/s  "
              f"collectives {r['collective_ms_per_step']:6.1f} ms/step ({r['collectives_per_step']:.0f} calls, "
              f"{r['bytes_sent_per_step_per_rank'] / 1e6:.3f} MB/rank)"
              + (f"  x{r['speedup_vs_1']:.2f} vs 1 process" if "speedup_vs_1" in r else ""))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="mat")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--peers", type=int, default=None, help="mat: number of peers (default 2)")
    p.add_argument("--peer-methods", default=None, help="cat: base methods, e.g. trades,alp")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--engine", choices=["eager", "fast", "paper"], default="fast")
    p.add_argument("--compare", action="store_true",
                   help="eager fp32 vs fast in one process (CUDA: and eager bf16, to separate graph and bf16 gains)")
    p.add_argument("--with-paper", action="store_true", help="with --compare: the paper-style loop as well")
    p.add_argument("--ablate", action="store_true", help="CPU: each change of the fast path alone")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="fast engine in bf16 autocast (default on CUDA)")
    p.add_argument("--fp32", action="store_true", help="fast engine in fp32 even on CUDA")
    p.add_argument("--view-bn", default="eval", choices=["eval", "train"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="relative tolerance of 'same losses' (default 5e-3 fp32, 5e-2 bf16)")
    p.add_argument("--no-resync", action="store_true",
                   help="let each engine's weights drift (default: every step starts from the eager state)")
    p.add_argument("--no-flops", action="store_true", help="skip the FlopCounterMode step count")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--world", type=int, default=None,
                   help="CPU scale-out: 1 process vs N data-parallel vs N peer-parallel processes (gloo)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    batches, _ = make_batches(args.warmup + args.steps, args.batch_size, device, args.seed)
    out = header(args, device)

    if args.world:
        out["world"] = measure_world(args, args.world)
    elif args.ablate:
        runners = [make_runner("eager", args, device) if v is None else make_runner(k, args, device, v)
                   for k, v in ABLATIONS.items()]
        runners[0].label = "eager (reference ops)"
        run_interleaved(runners, batches, args)
        flops = runners[0].flops
        base = runners[0].report(args.batch_size, flops)
        out["ablation"] = {}
        for r in runners:
            rep = r.report(args.batch_size, flops)
            rep["ratio_vs_eager"] = rep["images_per_s"] / base["images_per_s"]
            rep["max_loss_diff_vs_eager"] = max(abs(a - b) for a, b in zip(r.losses, runners[0].losses))
            out["ablation"][r.label] = rep
            print(f"{r.label:34s} {rep['ms_per_step']:9.1f} ms/step  {rep['images_per_s']:7.2f} img/s  "
                  f"x{rep['ratio_vs_eager']:.3f}  max|dloss| {rep['max_loss_diff_vs_eager']:.2e}")
    elif args.compare:
        runners = [make_runner("eager", args, device), make_runner("fast", args, device)]
        if cuda:
            runners.append(make_runner("eager_bf16", args, device))
        if args.with_paper:
            runners.append(make_runner("paper", args, device))
        run_interleaved(runners, batches, args)
        compare(runners, args, out)
    else:
        r = make_runner(args.engine, args, device)
        loader = paper_batches(batches, device) if args.engine == "paper" else iter(batches)
        run_interleaved([r], list(loader), args)
        rep = r.report(args.batch_size, r.flops)
        out[args.engine] = rep
        print(f"{args.engine}: {rep['ms_per_step']:.1f} ms/step  {rep['images_per_s']:.2f} img/s"
              + (f"  {rep['achieved_tflops']:.4f} TFLOP/s" if rep.get("achieved_tflops") else "")
              + (f" ({100 * rep['fraction_of_peak']:.1f}% of peak)" if rep.get("fraction_of_peak") else ""))
    out["memory"] = _memory(device)
    print(json.dumps(out["memory"]))
    write_result(args.json, out)
    return 0


def write_result(path: str | None, out: dict) -> None:
    """The benchmark's JSON, when ``--json PATH`` was given (its folder created)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
