"""What one per-epoch monitor costs (``--monitor-attack``): each attack run exactly as ``Trainer.monitor_epoch``
runs it (``run_attacks`` with ``clean`` first, the training threat model, the first N test images), on the
peers of a trained run.

    python -m bench.monitor --run RUN_DIR [--attacks pgd10,apgd-ce] [--n 512] [--repeats 2] [--json PATH]

Reports per attack the accuracy of every peer, the wall time of the attack (the fastest of ``--repeats``
interleaved rounds, CUDA-synchronised on a GPU) and its ratio to the first attack listed (PGD-10 by default).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from bench.throughput import write_result
from fastcollab.config import pick_device
from fastcollab.data import load_dataset
from fastcollab.evaluation import parse_attack
from fastcollab.evaluation.core import percent
from fastcollab.evaluation.runner import Partial, run_attacks
from fastcollab.rundir import load_run_models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--attacks", default="pgd10,apgd-ce", help="monitor attacks to time (pgd10,apgd-ce)")
    p.add_argument("--n", type=int, default=512, help="monitored images: the first N test images (512)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest is reported (2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    config, models = load_run_models(a.run, device)
    data = load_dataset(config["dataset"], config.get("data_dir"))
    x, y = data.x_test[:a.n], data.y_test[:a.n]
    attacks = [parse_attack(name, eps=config["eps"]) for name in a.attacks.split(",")]
    clean = parse_attack("clean")
    times: dict[str, list[float]] = {t.name: [] for t in attacks}
    accuracy: dict[str, dict[str, float]] = {}
    for _ in range(a.repeats):  # interleaved, so that every attack sees the same machine load
        for attack in attacks:
            out = run_attacks(models, x, y, [clean, attack], batch_size=config.get("eval_batch_size", 256), seed=0,
                              device=device, partial=Partial(None, {}), progress=False)
            times[attack.name].append(out["time_s"][attack.name])
            for name in ("clean", attack.name):
                accuracy[name] = {n: round(percent(c), 2) for n, c in out["correct"][name].items()}
    fastest = {name: min(t) for name, t in times.items()}
    first = attacks[0].name
    result = {"run": str(a.run), "n": len(x), "eps": config["eps"], "device": str(device),
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "repeats": a.repeats, "accuracy": accuracy, "time_s": fastest,
              f"ratio_to_{first}": {name: round(t / max(fastest[first], 1e-9), 2) for name, t in fastest.items()}}
    print(json.dumps(result, indent=1))
    write_result(a.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
