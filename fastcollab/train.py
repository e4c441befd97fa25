"""``python -m fastcollab.train``: train a cohort with any method, evaluate it honestly, keep everything.

    python -m fastcollab.train --method mat --model resnet18 --dataset cifar10 --amp --out runs/mat

writes into ``--out``: config.yaml (the resolved configuration), metrics.jsonl (one line per epoch),
checkpoint.pt (every epoch, atomically), curves.png, and final.json (clean / FGSM / PGD-20 / CW-20 accuracy
of every peer on the test split). ``--resume`` continues a killed run and ends where an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import ops
from .attacks import AttackSpec, parse_number
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model_state, save_checkpoint, set_rng_state
from .cohort import Cohort, sgd_for
from .config import read_yaml, resolve_config, write_yaml
from .data import DeviceLoader, load_dataset
from .engine import Precision, make_engine
from .errors import FastcollabError
from .evaluation import EvalAttack, evaluate_model, parse_attacks
from .methods import StepContext, get_method, list_methods
from .plots import plot_curves
from .rundir import CONFIG, CURVES, FINAL, build_peer_models, write_json, write_metrics
from .schedule import LRSchedule
from .teachers import load_teacher

RESUME_MAY_CHANGE = ("device", "data_dir", "out")


def _number(what):
    return lambda text: parse_number(text, what)


def _int_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 75,90,100, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcollab.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    g = p.add_argument_group("run")
    g.add_argument("--method", help=f"one of: {', '.join(list_methods())}")
    g.add_argument("--model", help="architecture (python -c 'import fastcollab.models as m; print(m.list_models())'),"
                                   " or one per peer: A,B")
    g.add_argument("--dataset", help="cifar10 | cifar100 | synthetic[:N] | npz:PATH")
    g.add_argument("--data-dir", help="where cifar10/cifar100 live (downloaded there if absent)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--amp", action="store_true", default=None, help="bf16 autocast")
    g.add_argument("--amp-dtype", choices=["bf16", "fp16"], help="fp16 uses a GradScaler (CUDA only)")
    g.add_argument("--out", help="run directory (default runs/METHOD-MODEL-TIME)")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    g.add_argument("--config", help="YAML file of defaults (keys as the long options, - or _)")
    g.add_argument("--device", help="auto | cpu | cuda[:N]")
    g.add_argument("--engine", help="auto (= fast) | fast (CUDA graphs on a GPU, folded-BN CPU path) | eager")
    g.add_argument("--view-bn", choices=["eval", "train"], help="BN mode of no-grad peer views (default eval)")
    g.add_argument("--normalize", action="store_true", default=None,
                   help="normalise by the dataset's mean/std inside the model")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    o = p.add_argument_group("optimisation (defaults: the method's paper)")
    o.add_argument("--lr", type=float)
    o.add_argument("--momentum", type=float)
    o.add_argument("--nesterov", action="store_true", default=None)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--schedule", choices=["piecewise", "cosine"])
    o.add_argument("--lr-drops", type=_int_list, help="epochs of the ×0.1 drops (default: the paper's, "
                                                      "scaled to --epochs)")
    a = p.add_argument_group("training attack (defaults: the method's paper)")
    a.add_argument("--eps", type=_number("--eps"), help="e.g. 8/255")
    a.add_argument("--step-size", dest="step", type=_number("--step-size"), help="e.g. 2/255")
    a.add_argument("--attack-steps", type=int)
    a.add_argument("--attack-init", choices=["uniform", "normal", "zero"])
    a.add_argument("--attack-bn", choices=["eval", "train"])
    a.add_argument("--attack-objective", choices=["ce", "bce", "cw", "trades_kl"],
                   help="replace the method's inner objective (an ablation; default: the paper's)")
    m = p.add_argument_group("method hyper-parameters (defaults: the method's paper)")
    seen = set()
    for name in list_methods():
        for flag, kwargs in get_method(name).cli_options.items():
            if flag not in seen:
                seen.add(flag)
                m.add_argument(flag, **{"default": None, **kwargs})
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-subset", type=int, help="test images attacked with PGD-10 after each epoch (512)")
    e.add_argument("--final-eval-size", type=int, help="test images of the final evaluation (all)")
    e.add_argument("--final-attacks", help="comma list, default clean,fgsm,pgd20,cw20")
    e.add_argument("--eval-batch-size", type=int)
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastcollabError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return device


def resolve_for_resume(out: Path, given: dict) -> dict:
    """A resumed run keeps its saved configuration; a flag that would change it is an error."""
    if not (out / CONFIG).is_file():
        raise FastcollabError(f"--resume: {out} holds no run ({CONFIG} missing): start it without --resume")
    saved = read_yaml(out / CONFIG)
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key in ("resume", "config", "progress"):
            continue
        if key in saved and saved[key] != value:
            raise FastcollabError(f"--resume: {out} was started with {key}={saved[key]!r}, not {value!r}: drop "
                                  f"--{key.replace('_', '-')}, or start a new run in another --out")
    saved.update({k: given[k] for k in RESUME_MAY_CHANGE if k in given})
    return saved


class Trainer:
    """Owns one run: data, cohort, engine, and the run directory."""

    def __init__(self, config: dict, out: Path, progress: bool = True):
        self.config, self.out, self.progress = config, out, progress
        self.device = pick_device(config["device"])
        torch.manual_seed(config["seed"])
        self.data = load_dataset(config["dataset"], config["data_dir"])
        config["num_classes"] = self.data.num_classes
        self.method = get_method(config["method"])(config)
        models = build_peer_models(config, self.method, self.data.num_classes, self.data.mean, self.data.std)
        self.models = {n: m.to(self.device) for n, m in models.items()}
        self.optimizers = {n: sgd_for(m, config["lr"], config["momentum"], config["weight_decay"],
                                      config["nesterov"]) for n, m in self.models.items()}
        schedules = {n: LRSchedule(config["schedule"], config["lr"], config["epochs"], config["lr_drops"])
                     for n in self.models}
        frozen = {p.name: load_teacher(config.get(p.source), self.device, what=f"--{p.source}",
                                       num_classes=self.data.num_classes)
                  for p in self.method.peers() if not p.trainable}
        self.cohort = Cohort(self.method, {**self.models, **frozen}, self.optimizers, schedules)
        self.precision = Precision(self.device, config["amp"], config["amp_dtype"])
        self.engine = make_engine(config["engine"], self.cohort, self.precision, config["view_bn"])
        if config["batch_size"] > len(self.data.x_train):
            raise FastcollabError(f"--batch-size {config['batch_size']} is larger than the training set "
                                  f"({len(self.data.x_train)} images): lower it")
        self.loader = DeviceLoader(self.data.x_train, self.data.y_train, config["batch_size"], self.device,
                                   train=True, seed=config["seed"])
        n_sub = min(config["eval_subset"], len(self.data.x_test))
        self.subset = (self.data.x_test[:n_sub], self.data.y_test[:n_sub])
        self.monitor = [EvalAttack("clean", None),
                        EvalAttack("pgd10", AttackSpec(eps=config["eps"], step=config["eps"] / 4, steps=10))]
        self.metrics: list[dict] = []
        self.start_epoch = 0

    # ------------------------------------------------------------------------------ persistence
    def restore(self) -> None:
        ckpt = load_checkpoint(self.out / CHECKPOINT_NAME, map_location=self.device)
        where = str(self.out / CHECKPOINT_NAME)
        for name, model in self.models.items():
            load_model_state(model, ckpt["models"][name], where)
            self.optimizers[name].load_state_dict(ckpt["optimizers"][name])
        if self.precision.scaler is not None and ckpt["scaler"] is not None:
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state({k: (v.cpu() if torch.is_tensor(v) else [t.cpu() for t in v]) for k, v in ckpt["rng"].items()})
        self.start_epoch, self.metrics = int(ckpt["epoch"]), list(ckpt["metrics"])

    def save(self, epoch: int) -> None:
        save_checkpoint(self.out / CHECKPOINT_NAME, epoch=epoch, models=self.models, optimizers=self.optimizers,
                        scaler=self.precision.scaler, metrics=self.metrics, config=self.config)
        write_metrics(self.out, self.metrics)
        plot_curves(self.metrics, self.out / CURVES, f"{self.config['method']} · {self.config['model']} · "
                                                     f"{self.config['dataset']}")

    # ------------------------------------------------------------------------------ training
    def train_epoch(self, epoch: int) -> dict:
        cfg, loader = self.config, self.loader
        loader.set_epoch(epoch)
        ctx = StepContext(epoch=epoch, epochs=cfg["epochs"])
        sums: dict[str, torch.Tensor] = {}
        n_steps = len(loader)
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=None if self.progress else True,
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            self.cohort.set_epoch_time(epoch + i / n_steps)
            result = self.engine.step(x, y, ctx)
            scalars = {"loss": result.total.detach(), **{k: v.detach() for k, v in result.terms.items()},
                       **{f"{p}/train_acc": c for p, c in result.correct.items()}}
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            if self.progress and (i % 5 == 0 or i == n_steps - 1):
                accs = [float(sums[f"{p}/train_acc"]) / (i + 1) * 100 for p in result.correct]
                bar.set_postfix(loss=f"{float(sums['loss']) / (i + 1):.3f}",
                                acc="/".join(f"{a:.1f}" for a in accs))
        bar.close()
        return {k: float(v) / n_steps for k, v in sums.items()}

    def evaluate_peers(self, images, labels, attacks: list[EvalAttack], desc: str) -> dict[str, dict]:
        total = len(images) * len(self.models)
        with tqdm(total=total, desc=desc, disable=None if self.progress else True, leave=False,
                  unit="img") as bar:
            return {n: evaluate_model(m, images, labels, attacks, self.config["eval_batch_size"], bar)
                    for n, m in self.models.items()}

    def run(self) -> dict:
        cfg = self.config
        print(f"fastcollab: {cfg['method']} · peers {', '.join(self.models)} · {cfg['model']} · {cfg['dataset']} "
            f"({len(self.data.x_train)} train / {len(self.data.x_test)} test) · {self.device} · "
            f"{self.precision.describe()} · engine {self.engine.name} · ops {ops.backend_report()}")
        for epoch in range(self.start_epoch, cfg["epochs"]):
            t0 = time.perf_counter()
            train = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t0
            monitor = self.evaluate_peers(*self.subset, self.monitor, "eval PGD-10")
            record = {"epoch": epoch + 1, "time_s": round(epoch_time, 3),
                      "lr": {n: self.cohort.lr(n) for n in self.models},
                      "loss": train["loss"],
                      "terms": {k: v for k, v in train.items() if k != "loss" and not k.endswith("/train_acc")},
                      "peers": {n: {"train_acc": 100 * train[f"{n}/train_acc"],
                                    "clean_acc": monitor[n]["clean"], "pgd10_acc": monitor[n]["pgd10"]}
                                for n in self.models},
                      "eval_subset": len(self.subset[0])}
            self.metrics.append(record)
            self.save(epoch + 1)
            print(f"epoch {epoch + 1}/{cfg['epochs']}  {epoch_time:.1f}s  loss {train['loss']:.4f}  " + "  ".join(
                f"{n}: clean {r['clean_acc']:.1f}% pgd10 {r['pgd10_acc']:.1f}%" for n, r in record["peers"].items()))
        return self.final_evaluation()

    def final_evaluation(self) -> dict:
        """final.json: per peer the accuracy under each final attack; the union metrics (per-norm, R_avg,
        R_worst); for cohorts the transfer matrix between peers (MAT Table 4) and the prediction
        discrepancy (CAT Eq. 7). Frozen teachers are not evaluated (they belong to their own run)."""
        from .evaluation import evaluate_cohort

        cfg = self.config
        attacks = parse_attacks(cfg["final_attacks"], eps=cfg["eps"] if cfg["eps"] > 0 else 8 / 255)
        n = len(self.data.x_test) if cfg["final_eval_size"] is None else min(cfg["final_eval_size"],
                                                                              len(self.data.x_test))
        torch.manual_seed(cfg["seed"] + 1)  # the evaluation's random starts do not depend on training
        with tqdm(total=n * len(self.models), desc="final evaluation", disable=None if self.progress else True,
                  leave=False, unit="img") as bar:
            report = evaluate_cohort(self.models, self.data.x_test[:n], self.data.y_test[:n], attacks,
                                     cfg["eval_batch_size"], bar)
        final = {"method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"], "test_images": n,
                 "attacks": {a.name: a.describe() for a in attacks}, **report}
        write_json(self.out / FINAL, final)
        for peer, accs in report["peers"].items():
            union = report["union"].get(peer, {})
            print(f"final {peer}: " + "  ".join(f"{k} {v:.2f}%" for k, v in accs.items())
                  + ("  |  union " + "  ".join(f"{k} {v:.2f}%" for k, v in union.items()) if union else ""))
        if "discrepancy" in report:
            print("prediction discrepancy: " + "  ".join(f"{k} {v:.2f}%" for k, v in report["discrepancy"].items()))
        print(f"run directory: {self.out}")
        return final


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        given = {k: v for k, v in vars(args).items() if v is not None}
        progress = given.pop("progress", True)
        if given.get("resume"):
            if "out" not in given:
                raise FastcollabError("--resume needs --out DIR, the run directory to continue")
            config = resolve_for_resume(Path(given["out"]), given)
        else:
            config = resolve_config(given, read_yaml(given["config"]) if "config" in given else None)
            if config["out"] is None:
                config["out"] = f"runs/{config['method']}-{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(config["out"])
        if not given.get("resume") and (out / CHECKPOINT_NAME).exists():
            raise FastcollabError(f"{out} already holds a run: pass --resume to continue it, or another --out")
        trainer = Trainer(config, out, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / CONFIG, {k: v for k, v in config.items()})
        if given.get("resume"):
            trainer.restore()
        trainer.run()
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
