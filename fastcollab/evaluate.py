"""``python -m fastcollab.evaluate --run DIR``: attack every trained peer of a run.

    python -m fastcollab.evaluate --run runs/mat --attacks clean,fgsm,pgd20,cw20 --json eval.json
    python -m fastcollab.evaluate --run runs/mat-mp --attacks clean,linf-pgd50x10,l2-pgd50x10,l1-pgd50x10

    python -m fastcollab.evaluate --run runs/at --attacks clean,pgd20,aa-fast,aa --n 1000

Evaluation is in fp32, eval mode, in the evaluation's threat model (``--norm`` linf, ``--eps`` 8/255 by
default, whatever the training used; the training eps is recorded beside it), with the budgets printed and
saved beside every number. Besides the per-attack accuracies the report holds the union metrics of every
peer (per-norm, R_avg, R_worst), for a cohort the transfer matrix between peers (MAT Table 4) and the
prediction discrepancy (CAT Eq. 7), and the sanity checks with their ε sweeps. Written: ``--json`` (default
RUN/eval.json), the robustness curves beside it (``*_eps_curves.png``); per-attack results go to
``JSON.partial`` while the evaluation runs, so that a killed evaluation continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import distributed as D
from .attacks import parse_number
from .data import load_dataset
from .config import RaisingParser, check_sizes
from .errors import FastcollabError
from .evaluation import DEFAULT_ATTACKS, DEFAULT_EPS, eps_fits_norm, parse_attacks
from .evaluation.checks import CHECK_N
from .evaluation.runner import evaluate_suite, report_lines, write_report
from .rundir import load_run_models
from .train import pick_device


def build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(prog="python -m fastcollab.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by python -m fastcollab.train")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    p.add_argument("--data-dir", help="where cifar10/cifar100 live (default: the run's)")
    p.add_argument("--attacks", default=None,
                   help="comma list: clean, fgsm, pgdK, pgdKxR (R restarts), cwK, apgd-ce, apgd-t, aa-fast, aa, aa-lite, "
                        "linf-pgdK, l2-pgdK, l1-pgdK, msdK (default: the run's final attacks, else "
                        f"{','.join(DEFAULT_ATTACKS)})")
    p.add_argument("--norm", choices=["linf", "l2", "l1"], default="linf", help="threat model (default linf)")
    p.add_argument("--eps", type=lambda t: parse_number(t, "--eps"), default=None,
                   help="budget in --norm (default 8/255 for linf, 0.5 for l2, 12 for l1; never the training eps)")
    p.add_argument("--step-size", type=lambda t: parse_number(t, "--step-size"), default=None,
                   help="PGD step (default eps/4 for linf, eps/10 for l2, eps/240 for l1)")
    p.add_argument("--n", type=int, default=None, help="N test images drawn at random with --seed (default all)")
    p.add_argument("--check-n", type=int, default=CHECK_N,
                   help=f"test images of the sanity checks and ε sweeps (default {CHECK_N}; 0: no checks)")
    p.add_argument("--batch-size", type=int, default=256, help="images per attack batch (256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw and the attacks' random starts (0)")
    p.add_argument("--json", help="where to write the results (default RUN/eval.json)")
    return p


def evaluate_run(run: str | Path, dataset: str | None = None, data_dir: str | None = None,
                 attacks: str | None = None, eps: float | None = None, step: float | None = None,
                 n: int | None = None, batch_size: int = 256, device: str = "auto", seed: int = 0,
                 progress: bool = True, *, norm: str = "linf", check_n: int = CHECK_N,
                 json_path: str | Path | None = None) -> dict:
    """Evaluate every trained peer of ``run`` (see the module doc); writes ``json_path`` (default RUN/eval.json)
    and the robustness curves beside it, and returns the report. Bad input ends in one FastcollabError before
    any attack runs."""
    run = Path(run)
    dev = D.local_device(pick_device(device))
    config, models = load_run_models(run, dev)
    eps = DEFAULT_EPS[norm] if eps is None else eps
    if attacks is None:
        attacks = config.get("final_attacks") or ",".join(DEFAULT_ATTACKS)
    parsed = parse_attacks(attacks, eps=eps, step=step, norm=norm)
    data = load_dataset(dataset or config["dataset"], data_dir or config.get("data_dir"))
    if data.num_classes != config["num_classes"]:
        raise FastcollabError(f"dataset {dataset} has {data.num_classes} classes but the run's models have "
                              f"{config['num_classes']}: evaluate on a dataset with the same classes")
    eps_fits_norm(eps, norm, dim=data.x_test[0].numel())
    json_path = Path(json_path) if json_path else run / "eval.json"
    ckpt = run / "checkpoint.pt"
    fingerprint = {"run": str(run.resolve()), "dataset": dataset or config["dataset"],
                   "checkpoint": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns] if ckpt.is_file() else None}
    report = evaluate_suite(models, data.x_test, data.y_test, parsed, num_classes=data.num_classes, norm=norm,
                            eps=eps, batch_size=batch_size, seed=seed, n=n, check_n=check_n,
                            partial_path=json_path.with_name(json_path.name + ".partial"), fingerprint=fingerprint,
                            progress=progress, device=dev)
    report = {"run": str(run), "method": config.get("method"), "model": config.get("model"),
              "epochs": config.get("epochs"), "dataset": dataset or config["dataset"],
              "test_images": report["test_set"]["n"], "train_eps": config.get("eps"), **report}
    write_report(report, json_path, data.num_classes,
                 f"{config.get('method')} · {config.get('model')} · {dataset or config['dataset']}")
    return report


def check_arguments(args: argparse.Namespace) -> None:
    """The command line's values checked before a model is loaded or an image attacked."""
    check_sizes(n=(args.n, 1), batch_size=(args.batch_size, 1), check_n=(args.check_n, 0))
    if args.eps is not None:
        eps_fits_norm(args.eps, args.norm)
    if args.step_size is not None and not args.step_size > 0:
        raise FastcollabError(f"--step-size must be > 0, got {args.step_size:g}: pass e.g. --step-size 2/255")
    if args.json:
        target = Path(args.json)
        if target.is_dir():
            raise FastcollabError(f"--json {target} is a folder: pass a file path such as {target / 'eval.json'}")
        if not target.parent.is_dir():
            raise FastcollabError(f"--json {target}: folder {target.parent} does not exist: create it or pick "
                                  "another path")
        if not os.access(target.parent, os.W_OK):
            raise FastcollabError(f"--json {target}: folder {target.parent} is not writable: pick another path")


def main(argv=None) -> int:
    started = False
    try:
        args = build_parser().parse_args(argv)
        check_arguments(args)
        started = D.init_from_env(pick_device(args.device))  # under torchrun: each rank attacks its shard
        report = evaluate_run(args.run, args.dataset, args.data_dir, args.attacks, args.eps, args.step_size,
                              args.n, args.batch_size, args.device, args.seed, norm=args.norm,
                              check_n=args.check_n, json_path=args.json)
        if D.is_main():
            print("\n".join(report_lines(report)))
            print(f"written: {report['written']}")
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        D.shutdown(started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
