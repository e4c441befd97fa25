"""``python -m fastcollab.evaluate --run DIR``: attack every trained peer of a run.

    python -m fastcollab.evaluate --run runs/mat --attacks clean,fgsm,pgd20,cw20 --json eval.json
    python -m fastcollab.evaluate --run runs/mat-mp --attacks clean,linf-pgd50,l2-pgd50,l1-pgd50

Evaluation is in fp32, eval mode, with the budgets printed and saved beside every number. Besides the
per-attack accuracies the report holds the union metrics of every peer (per-norm, R_avg, R_worst), and for
a cohort the transfer matrix between peers (MAT Table 4) and the prediction discrepancy (CAT Eq. 7).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .attacks import parse_number
from .data import load_dataset
from .errors import FastcollabError
from .evaluation import DEFAULT_ATTACKS, evaluate_cohort, parse_attacks
from .rundir import load_run_models
from .train import pick_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcollab.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by python -m fastcollab.train")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    p.add_argument("--data-dir")
    p.add_argument("--attacks", default=None,
                   help="comma list: clean, fgsm, pgdK, cwK, linf-pgdK, l2-pgdK, l1-pgdK, msdK (default: the run's "
                        f"final attacks, else {','.join(DEFAULT_ATTACKS)})")
    p.add_argument("--eps", type=lambda t: parse_number(t, "--eps"), default=None,
                   help="l_inf budget (default: the run's training eps)")
    p.add_argument("--step-size", type=lambda t: parse_number(t, "--step-size"), default=2 / 255)
    p.add_argument("--n", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here too")
    return p


def evaluate_run(run: str | Path, dataset: str | None = None, data_dir: str | None = None,
                 attacks: str | None = None, eps: float | None = None, step: float = 2 / 255,
                 n: int | None = None, batch_size: int = 256, device: str = "auto", seed: int = 0,
                 progress: bool = True) -> dict:
    dev = pick_device(device)
    config, models = load_run_models(run, dev)
    eps = config["eps"] if eps is None else eps
    if attacks is None:
        attacks = config.get("final_attacks") or ",".join(DEFAULT_ATTACKS)
    parsed = parse_attacks(attacks, eps=eps, step=step)
    data = load_dataset(dataset or config["dataset"], data_dir or config.get("data_dir"))
    if data.num_classes != config["num_classes"]:
        raise FastcollabError(f"dataset {dataset} has {data.num_classes} classes but the run's models have "
                              f"{config['num_classes']}: evaluate on a dataset with the same classes")
    count = len(data.x_test) if n is None else min(n, len(data.x_test))
    torch.manual_seed(seed)
    with tqdm(total=count * len(models), desc="evaluate", unit="img", disable=None if progress else True) as bar:
        report = evaluate_cohort(models, data.x_test[:count], data.y_test[:count], parsed, batch_size, bar)
    return {"run": str(run), "dataset": dataset or config["dataset"], "test_images": count,
            "attacks": {a.name: a.describe() for a in parsed}, **report}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate_run(args.run, args.dataset, args.data_dir, args.attacks, args.eps, args.step_size,
                              args.n, args.batch_size, args.device, args.seed)
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for peer, accs in report["peers"].items():
        union = report["union"].get(peer, {})
        print(f"{peer}: " + "  ".join(f"{k} {v:.2f}%" for k, v in accs.items())
              + ("  |  union " + "  ".join(f"{k} {v:.2f}%" for k, v in union.items()) if union else ""))
    if "transfer" in report:
        t = report["transfer"]
        print(f"transfer ({t['attack']}; rows: source, columns: target):")
        for src, row in t["accuracy"].items():
            print(f"  {src}: " + "  ".join(f"{dst} {v:.2f}%" for dst, v in row.items()))
        print("prediction discrepancy: " + "  ".join(f"{k} {v:.2f}%" for k, v in report["discrepancy"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
