"""fastcollab's cohort APGD (``aa-fast`` = APGD-CE + APGD-T) against the standard AutoAttack's APGD pair
(``pyautoattack`` 0.2.0, version ``lite``), same models, same images, same process.

    python -m bench.apgd --run RUN_DIR [--run RUN_DIR ...] [--n 64] [--eps 2/255] [--json PATH]

Every peer of every run joins one cohort. fastcollab attacks the whole cohort in one loop; AutoAttack
runs once per peer. Reports per peer the robust accuracy of both, the per-example disagreements, and the
wall time per attack (APGD-CE, APGD-T) of each side (AutoAttack's from its own log), the fastest of
``--repeats`` interleaved rounds. A short warm-up runs first (lazy imports).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time

import torch

from bench.throughput import write_result
from fastcollab.aa_standard import run_standard_autoattack
from fastcollab.apgd import APGDSpec, apgd_cohort
from fastcollab.attacks import parse_number
from fastcollab.data import load_dataset
from fastcollab.rundir import load_run_models


def _log_time(result: dict, attack: str) -> float:
    """AutoAttack's cumulative time after ``attack`` (from its own log line), in seconds."""
    for line in result["meta"]["log"]:
        m = re.search(rf"after {attack}: .*total time ([0-9.]+) s", line)
        if m:
            return float(m.group(1))
    return 0.0  # not run: no robust point was left


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.apgd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--eps", type=lambda t: parse_number(t, "--eps"), default=2 / 255)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest of each is reported")
    p.add_argument("--json")
    a = p.parse_args(argv)
    models, dataset = {}, None
    for run in a.run:
        config, peers = load_run_models(run, torch.device("cpu"))
        dataset = dataset or config["dataset"]
        for name, m in peers.items():
            models[f"{run}:{name}"] = m
    data = load_dataset(dataset, None)
    x = data.x_test[:a.n].float() / 255  # uint8 NCHW
    y = data.y_test[:a.n].long()
    apgd_cohort(models, x[:4], y[:4], APGDSpec(eps=a.eps, steps=2))  # warm-up (lazy imports)
    with torch.no_grad():
        clean = {n: int((m(x).argmax(1) == y).sum()) for n, m in models.items()}
    ours_s, aa_s = [], []
    for _ in range(a.repeats):   # interleaved, so that both sides see the same machine load
        t0 = time.perf_counter()
        ce = apgd_cohort(models, x, y, APGDSpec(eps=a.eps, steps=a.steps))
        t1 = time.perf_counter()
        tgt = apgd_cohort(models, x, y, APGDSpec(eps=a.eps, steps=a.steps, loss="dlr-targeted"),
                          already_broken={n: ~r for n, (r, _) in ce.items()})
        t2 = time.perf_counter()
        ours_s.append({"apgd-ce": t1 - t0, "apgd-t": t2 - t1, "total": t2 - t0})
        aa = {n: run_standard_autoattack(m, x, y, eps=a.eps, version="lite") for n, m in models.items()}
        aa_s.append({"apgd-ce": sum(_log_time(r, "APGD-CE") for r in aa.values()),
                     "apgd-t": sum(max(_log_time(r, "APGD-T") - _log_time(r, "APGD-CE"), 0.0) for r in aa.values()),
                     "total": sum(r["meta"]["time_s"] for r in aa.values())})
    best = lambda runs: {k: min(r[k] for r in runs) for k in runs[0]}  # noqa: E731
    out = {"n": a.n, "eps": a.eps, "steps": a.steps, "repeats": a.repeats, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "fastcollab_cohort_s": best(ours_s), "pyautoattack_per_peer_sum_s": best(aa_s),
           "peers": {n: {"clean": clean[n], "aa_fast": int(tgt[n][0].sum()), "aa_lite": int(aa[n]["robust"].sum()),
                         "disagree": int((tgt[n][0] != aa[n]["robust"]).sum())} for n in models}}
    print(json.dumps(out, indent=1))
    write_result(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
