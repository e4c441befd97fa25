"""``python -m fastcollab.train``: train a cohort with any method, evaluate it honestly, keep everything.

    python -m fastcollab.train --method mat --model resnet18 --dataset cifar10 --amp --out runs/mat

writes into ``--out``: config.yaml (the resolved configuration), metrics.jsonl (one line per epoch),
checkpoint.pt (every epoch, atomically), curves.png, and final.json (clean / FGSM / PGD-20 / CW-20 accuracy
of every peer on the test split, and ``"status": "ok"``). ``--resume`` continues a killed run and ends where an
uninterrupted run would.

Every setting is checked before the first step. ``--out`` must be new, empty, or (with ``--resume``) the same
run; a lock file keeps a second live run out of it. A loss that goes non-finite (or above 1e6) stops the run:
the last good checkpoint is kept, final.json says ``"status": "diverged"``, and the exit status is 3. Exit
status 2 is bad input (one line naming the fix), 130 is Ctrl-C (one line with the resume command).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as D
from . import ops
from .attacks import parse_number
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, best_of, load_checkpoint, load_model_state, save_checkpoint,
                         set_rng_state)
from .cohort import Cohort, sgd_for
from .config import (GENERAL, TRANSIENT, RaisingParser, check_general, flag_of, monitor_attack, parse_file_values,
                     pick_device, read_yaml, resolve_config, write_yaml)
from .data import DeviceLoader, hold_out, load_dataset
from .engine import Precision, make_distributed_engine
from .engine.distributed import gather_cohort
from .errors import FastcollabError
from .evaluation import parse_attack, parse_attacks
from .evaluation.library import check_applicable
from .evaluation.core import percent
from .evaluation.runner import Partial, run_attacks
from .methods import StepContext, get_method, list_methods
from .plots import plot_curves
from .rundir import (CONFIG, CURVES, FINAL, RUN_FILES, RunLock, build_peer_models, check_out_folder, run_status,
                     write_json, write_metrics)
from .schedule import LRSchedule
from .teachers import load_teacher
from .weights import warm_start

# how to run, or what to evaluate at the end: a resumed run may change these (the training is unaffected)
RESUME_MAY_CHANGE = ("device", "data_dir", "out", "final_attacks", "final_eval_size", "model_dir", "peer_parallel",
                     "sync_bn")
#: a loss (or loss term) at or above this magnitude, or non-finite, means the run has diverged
LOSS_LIMIT = 1e6
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class Diverged(FastcollabError):
    """The training loss went non-finite or exploded; the message says where, what and the fix."""


def _number(what):
    return lambda text: parse_number(text, what)


def _int_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 75,90,100, got {text!r}") from None


def _shown(value) -> str:
    """A default as a user would type it: 8/255 rather than 0.0313..., lists comma-separated."""
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float) and 0 < value < 1:
        frac = Fraction(value).limit_denominator(255)
        if frac.denominator == 255 and abs(float(frac) - value) < 1e-12:
            return f"{frac.numerator}/255"
    return f"{value:g}" if isinstance(value, float) else str(value)


def paper_defaults_text(method: str | None, model: str | None, dataset: str | None = None) -> str:
    """The epilog of ``--help``: the chosen method's resolved paper defaults for the chosen model."""
    method, model = method or GENERAL["method"], model or GENERAL["model"]
    defaults = get_method(method).defaults_for(model, dataset or GENERAL["dataset"])
    items = [f"{flag_of(k)[2:]}={_shown(v)}" for k, v in defaults.items()]
    return (f"paper defaults of --method {method} for --model {model} (a flag overrides its own; pass\n"
            "--method / --model / --dataset with --help to see others):\n"
            + textwrap.fill(", ".join(items), width=100, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False))


def build_parser(method: str | None = None, model: str | None = None,
                 dataset: str | None = None) -> argparse.ArgumentParser:
    p = RaisingParser(prog="python -m fastcollab.train", description=__doc__,
                      epilog=paper_defaults_text(method, model, dataset),
                      formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    g = p.add_argument_group("run")
    g.add_argument("--method", help=f"one of: {', '.join(list_methods())}")
    g.add_argument("--model", help="architecture (python -c 'import fastcollab.models as m; print(m.list_models())'),"
                                   " or one per peer: A,B")
    g.add_argument("--dataset", help="cifar10 | cifar100 | synthetic[:N] | npz:PATH")
    g.add_argument("--data-dir", help="where cifar10/cifar100/svhn/tiny-imagenet live (downloaded there if absent)")
    g.add_argument("--epochs", type=int, help="training epochs (the paper's; its lr drops are scaled to this)")
    g.add_argument("--batch-size", type=int, help="training batch size (128)")
    g.add_argument("--amp", action="store_true", default=None, help="bf16 autocast")
    g.add_argument("--amp-dtype", choices=["bf16", "fp16"], help="fp16 uses a GradScaler (CUDA only)")
    g.add_argument("--out", help="run directory (default runs/METHOD-MODEL-TIME)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="write into an --out that holds other files or another run (its run files are replaced)")
    g.add_argument("--seed", type=int, help="random seed of weights, data order and attacks (0)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    g.add_argument("--re-evaluate", action="store_true", default=None,
                   help="with --resume on a finished run: run its final evaluation again")
    g.add_argument("--config", help="YAML file of defaults (keys as the long options, - or _)")
    g.add_argument("--device", help="auto | cpu | cuda[:N]")
    g.add_argument("--engine", help="auto (= fast) | fast (CUDA graphs on a GPU, folded-BN CPU path) | eager")
    g.add_argument("--view-bn", choices=["eval", "train"], help="BN mode of no-grad peer views (default eval)")
    g.add_argument("--peer-parallel", action="store_true", default=None,
                   help="under torchrun: one peer (or a replica group of it) per rank, instead of data-parallel")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on CUDA: SyncBatchNorm in the trainable peers (default: BN statistics "
                        "averaged across ranks after each step)")
    g.add_argument("--normalize", action="store_true", default=None,
                   help="normalise by the dataset's mean/std inside the model")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (plain lines only)")
    g.add_argument("--verbose", action="store_true", default=None, help="print every op's backend at start-up")
    o = p.add_argument_group("optimisation (defaults: the method's paper)")
    o.add_argument("--lr", type=float, help="initial SGD learning rate")
    o.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    o.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    o.add_argument("--weight-decay", type=float, help="SGD weight decay")
    o.add_argument("--schedule", choices=["piecewise", "cosine"], help="lr schedule (piecewise: ×0.1 at --lr-drops)")
    o.add_argument("--lr-drops", type=_int_list, help="epochs of the ×0.1 drops (default: the paper's, "
                                                      "scaled to --epochs)")
    a = p.add_argument_group("training attack (defaults: the method's paper)")
    a.add_argument("--eps", type=_number("--eps"), help="e.g. 8/255")
    a.add_argument("--step-size", dest="step", type=_number("--step-size"), help="e.g. 2/255")
    a.add_argument("--attack-steps", type=int, help="PGD steps of the training attack")
    a.add_argument("--attack-init", choices=["uniform", "normal", "zero"], help="random start of the training attack")
    a.add_argument("--attack-bn", choices=["eval", "train"], help="BN mode while the training attack runs")
    a.add_argument("--allow-large-eps", action="store_true", default=None,
                   help="accept budgets above the plausible range (l_inf > 1: usually a forgotten /255)")
    a.add_argument("--attack-objective", choices=["ce", "bce", "cw", "trades_kl"],
                   help="replace the method's inner objective (an ablation; default: the paper's)")
    m = p.add_argument_group("method hyper-parameters (defaults: the method's paper)")
    seen = set()
    for name in list_methods():
        for flag, kwargs in get_method(name).cli_options.items():
            if flag not in seen:
                seen.add(flag)
                m.add_argument(flag, **{"default": None, **kwargs})
    w = p.add_argument_group("external weights (fastcollab.weights)")
    w.add_argument("--init", help="start from a checkpoint: PATH for every trainable peer, or p0=PATH,p1=PATH")
    w.add_argument("--teacher-model", help="architecture of a --teacher checkpoint file (e.g. wrn-34-10)")
    w.add_argument("--teacher-normalize", help="inputs of a --teacher file without normalisation buffers: none | "
                                               "cifar10 | cifar100 | MEAN,STD")
    w.add_argument("--allow-partial-load", action="store_true", default=None,
                   help="load only the fitting tensors of a --teacher / --init file (named in a warning)")
    w.add_argument("--model-dir", help="where --teacher robustbench:NAME looks (MODEL_DIR/cifar10/Linf/NAME.pt; "
                                       "default $MODEL_DIR or ./models)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-subset", type=int, help="test images attacked by the monitor attack after each epoch "
                                                   "(512); with --val-split, the held-out images are monitored "
                                                   "instead")
    e.add_argument("--monitor-attack", help="the attack of the per-epoch monitor, in the training threat model: "
                                            "pgd10, or any white-box attack of evaluate, e.g. apgd-ce "
                                            "(fastcollab's APGD over the whole cohort at once) (pgd10)")
    e.add_argument("--val-split", type=int, help="hold out N training images (seeded) for model selection (0)")
    e.add_argument("--select", choices=["last", "best-pgd"],
                   help="final weights: the last epoch, or the epoch with the best mean validation accuracy "
                        "under the monitor attack over the peers (needs --val-split) (last)")
    e.add_argument("--final-eval-size", type=int, help="test images of the final evaluation (all)")
    e.add_argument("--final-attacks", help="comma list, default clean,fgsm,pgd20,cw20")
    e.add_argument("--eval-batch-size", type=int, help="batch size of the evaluations (256)")
    return p


def resolve_for_resume(out: Path, given: dict) -> dict:
    """A resumed run keeps its saved configuration; a flag that would change it is an error."""
    if not (out / CONFIG).is_file():
        raise FastcollabError(f"--resume: {out} holds no run ({CONFIG} missing): start it without --resume")
    saved = {**GENERAL, **read_yaml(out / CONFIG)}
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key in TRANSIENT:
            continue
        if key not in saved:
            raise FastcollabError(f"--resume: --{key.replace('_', '-')} is not a setting of the run in {out} "
                                  f"(method {saved['method']}): drop it")
        if saved[key] != value:
            raise FastcollabError(f"--resume: {out} was started with {key}={saved[key]!r}, not {value!r}: drop "
                                  f"--{key.replace('_', '-')}, or start a new run in another --out")
    saved.update({k: given[k] for k in RESUME_MAY_CHANGE if k in given})
    check_general(saved)
    return saved


class DivergenceWatch:
    """Per loss term, the first step of the epoch whose value was non-finite or at least :data:`LOSS_LIMIT`,
    kept on the device (no host sync per step); :meth:`first_bad` reads it (one sync)."""

    def __init__(self):
        self.names: list[str] = []
        self.first: torch.Tensor | None = None

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        if self.first is None:
            self.names = list(losses)
            self.first = torch.full((len(self.names),), -1, dtype=torch.long,
                                    device=next(iter(losses.values())).device)
        values = torch.stack([losses[k].float().reshape(()) for k in self.names])
        bad = ~(values.abs() < LOSS_LIMIT)  # NaN compares false: caught too
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def first_bad(self) -> tuple[int, list[str]] | None:
        """``(step, names of the terms bad at that step)`` for the first bad step, else None."""
        if self.first is None:
            return None
        first = self.first.tolist()
        hit = [s for s in first if s >= 0]
        if not hit:
            return None
        step = min(hit)
        return step, [n for n, s in zip(self.names, first) if s == step]


class Trainer:
    """Owns one run: data, cohort, engine, and the run directory."""

    def __init__(self, config: dict, out: Path, progress: bool = True, verbose: bool = False):
        self.config, self.out, self.progress, self.verbose = config, out, progress and D.is_main(), verbose
        self.device = D.local_device(pick_device(config["device"]))
        torch.manual_seed(config["seed"])
        self.data = load_dataset(config["dataset"], config["data_dir"])
        config["num_classes"] = self.data.num_classes
        config["image_size"] = int(self.data.x_train.shape[-1])
        # the final attacks must fit this dataset (DLR: >= 3 classes; AutoAttack: the extra) before training
        self.monitor = [parse_attack("clean"), monitor_attack(config)]
        check_applicable(parse_attacks(config["final_attacks"]) + self.monitor, self.data.num_classes)
        self.method = get_method(config["method"])(config)
        models = build_peer_models(config, self.method, self.data.num_classes, self.data.mean, self.data.std)
        self.models = {n: m.to(self.device) for n, m in models.items()}
        self.optimizers = {n: sgd_for(m, config["lr"], config["momentum"], config["weight_decay"],
                                      config["nesterov"]) for n, m in self.models.items()}
        schedules = {n: LRSchedule.from_config(config) for n in self.models}
        frozen_peers = [p for p in self.method.peers() if not p.trainable]
        if not frozen_peers:
            for key in ("teacher_model", "teacher_normalize"):
                if config.get(key) is not None:
                    raise FastcollabError(f"--{key.replace('_', '-')} does not apply: method {config['method']} "
                                          "has no teacher; drop it")
            if config.get("allow_partial_load") and not config.get("init"):
                raise FastcollabError(f"--allow-partial-load does not apply: method {config['method']} has no "
                                      "teacher and there is no --init; drop it")
        if config.get("init"):
            config["init"] = warm_start(self.models, config["init"], config.get("allow_partial_load"))
        frozen = {p.name: load_teacher(config.get(p.source), self.device, what=f"--{p.source}",
                                       num_classes=self.data.num_classes, arch=config.get("teacher_model"),
                                       normalize=config.get("teacher_normalize"), models_root=config.get("model_dir"),
                                       allow_partial=config.get("allow_partial_load"),
                                       image_size=config["image_size"])
                  for p in frozen_peers}
        self.cohort = Cohort(self.method, {**self.models, **frozen}, self.optimizers, schedules)
        self.precision = Precision(self.device, config["amp"], config["amp_dtype"])
        self.engine, shard = make_distributed_engine(config["engine"], self.cohort, self.precision, config["view_bn"],
                                                     peer_parallel=config["peer_parallel"], sync_bn=config["sync_bn"])
        x_train, y_train = self.data.x_train, self.data.y_train
        if config["val_split"]:  # model selection on held-out training images, never on the test set
            x_train, y_train, *held = hold_out(x_train, y_train, config["val_split"], config["seed"])
            self.monitor_set, self.subset = "val", tuple(held)
        else:
            n_sub = min(config["eval_subset"], len(self.data.x_test))
            self.monitor_set, self.subset = "test", (self.data.x_test[:n_sub], self.data.y_test[:n_sub])
        if config["batch_size"] > len(x_train):
            raise FastcollabError(f"--batch-size {config['batch_size']} is larger than the training set "
                                  f"({len(x_train)} images): lower it")
        self.loader = DeviceLoader(x_train, y_train, config["batch_size"], self.device, train=True,
                                   seed=config["seed"])
        self.loader.set_shard(*shard)
        D.seed_per_rank(config["seed"])
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
        D.seed_per_rank(self.config["seed"] + self.start_epoch)

    def save(self, epoch: int) -> None:
        D.on_main(lambda: self._write(epoch))
        if self.config["select"] == "best-pgd" and best_of(self.metrics)[0] == epoch:
            D.on_main(lambda: save_checkpoint(self.out / BEST_NAME, epoch=epoch, models=self.models,
                                              optimizers=self.optimizers, scaler=self.precision.scaler,
                                              metrics=self.metrics, config=self.config))

    def load_selected(self) -> dict:
        """``--select best-pgd``: put the selected epoch's weights in place for the final evaluation; returns
        what final.json records about the selection."""
        if self.config["select"] == "last":
            return {"selection": "last epoch"}
        epoch, score = best_of(self.metrics)
        ckpt = load_checkpoint(self.out / BEST_NAME, map_location=self.device)
        for name, model in self.models.items():
            load_model_state(model, ckpt["models"][name], str(self.out / BEST_NAME))
        return {"selection": f"best mean {self.monitor[1].name} accuracy on {len(self.subset[0])} held-out "
                             "training images", "selected_epoch": epoch, "selected_val_robust_acc": score}

    def _write(self, epoch: int) -> None:
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
        watch = DivergenceWatch()
        bar = tqdm(loader, total=n_steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=None if self.progress else True,
                   leave=False, dynamic_ncols=True)
        try:
            for i, (x, y) in enumerate(bar):
                self.cohort.set_epoch_time(epoch + i / n_steps)
                result = self.engine.step(x, y, ctx)
                losses = {"loss": result.total.detach(), **{k: v.detach() for k, v in result.terms.items()}}
                watch.update(i, losses)
                scalars = {**losses, **{f"{p}/train_acc": c for p, c in result.correct.items()}}
                for k, v in scalars.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                if self.progress and (i % 5 == 0 or i == n_steps - 1):  # the bar syncs here anyway
                    if not D.is_distributed():  # ranks decide together, at the end of the epoch
                        self.stop_if_diverged(watch, epoch, n_steps)
                    bar.set_postfix(loss=f"{float(sums['loss']) / (i + 1):.3f}",
                                    **{p: f"{float(sums[f'{p}/train_acc']) / (i + 1) * 100:.1f}%"
                                       for p in result.correct})
        finally:
            bar.close()
        self.stop_if_diverged(watch, epoch, n_steps)
        gather_cohort(self.engine)  # peer-parallel: every peer's weights on every rank, for evaluation and saving
        return D.weighted_mean({k: float(v) / n_steps for k, v in sums.items()}, n_steps * len(y))

    def stop_if_diverged(self, watch: "DivergenceWatch", epoch: int, n_steps: int) -> None:
        """If a loss went bad, write final.json (status diverged) and raise :class:`Diverged`; the diverged
        weights are never saved, so checkpoint.pt stays the last good epoch."""
        found = watch.first_bad()  # one host sync
        # every rank stops together: a peer-parallel rank that stopped alone would leave the others waiting
        steps = D.gather_rows(torch.tensor([found[0] if found else -1], device=self.device)).tolist()
        if max(steps) < 0:
            return
        step, terms = found or (min(s for s in steps if s >= 0), ["a loss on another rank"])
        kept = (f"the last good checkpoint ({self.out / CHECKPOINT_NAME}, epoch {epoch}) is kept" if epoch > 0
                else "no checkpoint was written (it diverged in the first epoch)")
        message = (f"training diverged at epoch {epoch + 1}, step {step + 1}/{n_steps}: {', '.join(terms)} went "
                   f"non-finite or above {LOSS_LIMIT:g}; {kept}; lower --lr (e.g. 10x) or warm it up, in a new "
                   "--out (or --overwrite)")
        cfg = self.config
        D.on_main(lambda: write_json(self.out / FINAL, {
            "status": "diverged", "method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"],
            "epoch": epoch + 1, "step": step + 1, "terms": terms, "message": message}))
        raise Diverged(message)

    def monitor_epoch(self) -> tuple[dict[str, dict[str, float]], float]:
        """Per peer, the accuracy (%) on the monitored images (the held-out training images with
        ``--val-split``, else the test subset) clean and under ``--monitor-attack``, and the seconds it took.
        The final evaluation's code path (PGD keeps its best iterate; APGD attacks the whole cohort at once;
        sharded over ranks). The attacks seed their own noise inside a forked RNG: monitoring never changes
        the training's random stream."""
        images, labels = self.subset
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = run_attacks(self.models, images, labels, self.monitor, batch_size=self.config["eval_batch_size"],
                              seed=self.config["seed"], device=self.device, partial=Partial(None, {}),
                              progress=self.progress, report=False)
        accuracy = {n: {a.name: percent(out["correct"][a.name][n]) for a in self.monitor} for n in self.models}
        return accuracy, sum(out["time_s"].values())

    def banner(self) -> str:
        """One short start-up line; the backend of every op with ``--verbose``."""
        cfg = self.config
        backends = sorted({ops.resolve(op, self.device) for op in ops._OPS})
        line = (f"fastcollab: {cfg['method']} · peers {', '.join(self.models)} · {cfg['model']} · {cfg['dataset']} "
                f"({len(self.data.x_train)} train / {len(self.data.x_test)} test) · {self.device} · "
                f"{self.precision.describe()} · engine {self.engine.name} · ops {'/'.join(backends)}")
        return line + ("\n" + ops.backend_report(self.device) if self.verbose else "")

    def run(self) -> dict:
        cfg = self.config
        print(self.banner())
        if self.start_epoch:
            print(f"resuming {self.out} after epoch {self.start_epoch}/{cfg['epochs']}"
                  + (" (training done: final evaluation only)" if self.start_epoch >= cfg["epochs"] else ""))
        for epoch in range(self.start_epoch, cfg["epochs"]):
            t0 = time.perf_counter()
            train = self.train_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t0
            monitor, monitor_time = self.monitor_epoch()
            robust = self.monitor[1].name
            record = {"epoch": epoch + 1, "time_s": round(epoch_time, 3),
                      "lr": {n: self.cohort.lr(n) for n in self.models},
                      "loss": train["loss"],
                      "terms": {k: v for k, v in train.items() if k != "loss" and not k.endswith("/train_acc")},
                      "peers": {n: {"train_acc": 100 * train[f"{n}/train_acc"],
                                    "clean_acc": monitor[n]["clean"], f"{robust}_acc": monitor[n][robust]}
                                for n in self.models},
                      "monitor": self.monitor_set, "monitor_attack": robust, "eval_subset": len(self.subset[0]),
                      "monitor_time_s": round(monitor_time, 3)}
            if hasattr(self.engine, "stats"):  # the graphed engine: captures, replays, why it fell back
                record["engine"] = self.engine.stats()
            self.metrics.append(record)
            self.save(epoch + 1)
            print(f"epoch {epoch + 1}/{cfg['epochs']}  {epoch_time:.1f}s  loss {train['loss']:.4f}  " + "  ".join(
                f"{n}: clean {r['clean_acc']:.1f}% {robust} {r[robust + '_acc']:.1f}%" for n, r in record["peers"].items()))
        return self.final_evaluation()

    def final_evaluation(self) -> dict:
        """final.json: per peer the accuracy under each final attack in the evaluation's threat model (l_inf
        8/255 for every method; the training eps is recorded beside it as ``train_eps``); the union metrics
        (per-norm, R_avg, R_worst); for cohorts the transfer matrix between peers (MAT Table 4) and the
        prediction discrepancy (CAT Eq. 7); the sanity checks and ε sweeps (``checks``, ``eps_sweep``, the
        robustness curves in final_eps_curves.png). Resumable per attack (final.partial.json); sharded over ranks.
        Frozen teachers are not evaluated (they belong to their own run)."""
        from .evaluation import DEFAULT_EPS
        from .evaluation.runner import evaluate_suite, report_lines, write_report

        cfg = self.config
        selection = self.load_selected()
        norm = "linf"
        attacks = parse_attacks(cfg["final_attacks"], eps=DEFAULT_EPS[norm], norm=norm)
        report = evaluate_suite(self.models, self.data.x_test, self.data.y_test, attacks,
                                num_classes=self.data.num_classes, norm=norm, eps=DEFAULT_EPS[norm],
                                batch_size=cfg["eval_batch_size"], seed=cfg["seed"] + 1, n=cfg["final_eval_size"],
                                check_n=min(128, cfg["eval_subset"]), partial_path=self.out / "final.partial.json",
                                fingerprint={"checkpoint_epoch": cfg["epochs"]}, progress=self.progress,
                                device=self.device)
        final = {"status": "ok", "method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"],
                 "epochs": cfg["epochs"], "test_images": report["test_set"]["n"], "train_eps": cfg["eps"], **selection,
                 **report}
        write_report(final, self.out / FINAL, self.data.num_classes,
                     f"{cfg['method']} · {cfg['model']} · {cfg['dataset']}")
        if D.is_main():
            print("\n".join(report_lines(final, prefix="final ")))
            print(f"run directory: {self.out}")
        return final


def parse_command_line(argv) -> dict:
    """The settings the user typed (``None``: not given), the ``--config`` file's values read through the
    same parser as the flags."""
    pre = RaisingParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--model")
    pre.add_argument("--dataset")
    chosen, _ = pre.parse_known_args(argv)
    parser = build_parser(chosen.method, chosen.model, chosen.dataset)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "config" in given and not given.get("resume"):
        given["file_values"] = parse_file_values(parser, read_yaml(given["config"]), given["config"])
    return given


def main(argv=None) -> int:
    lock, trainer, out, started = None, None, None, False
    try:
        given = parse_command_line(argv)
        progress, verbose = given.pop("progress", True), given.pop("verbose", False)
        overwrite, re_evaluate = given.pop("overwrite", False), given.pop("re_evaluate", False)
        resume = given.get("resume", False)
        if re_evaluate and not resume:
            raise FastcollabError("--re-evaluate re-runs the final evaluation of a finished run: add --resume")
        if resume:
            if "out" not in given:
                raise FastcollabError("--resume needs --out DIR, the run directory to continue")
            check_out_folder(Path(given["out"]), resume=True, overwrite=False)
            config = resolve_for_resume(Path(given["out"]), given)
        else:
            file_values = given.pop("file_values", None)
            config = resolve_config(given, file_values, given.get("config"))
            if config["out"] is None:
                config["out"] = f"runs/{config['method']}-{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}"
        started = D.init_from_env(pick_device(config["device"]))  # launched by torchrun: join its group
        config["out"] = D.broadcast_object(config["out"])  # the default name holds rank 0's clock
        out = Path(config["out"])
        check_out_folder(out, resume, overwrite)
        if resume and run_status(out) == "ok" and not re_evaluate:
            print(f"{out} is a finished run (final.json status ok): nothing to do; pass --re-evaluate to run its "
                  "final evaluation again")
            return 0
        created = not out.exists()
        D.barrier()  # every rank has checked --out before rank 0 takes it
        lock = RunLock(out).acquire() if D.is_main() else None
        try:
            trainer = Trainer(config, out, progress=progress, verbose=verbose)
        except BaseException:
            if lock is not None:
                lock.release()
                lock = None
                if created:
                    out.rmdir()
            raise
        if overwrite and D.is_main():
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        D.on_main(lambda: write_yaml(out / CONFIG, config))
        if resume and (out / CHECKPOINT_NAME).exists():
            trainer.restore()
        with D.quiet_unless_main():
            trainer.run()
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except FastcollabError as e:
        if D.is_main() or trainer is not None:  # set-up errors are the same on every rank: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(interrupted_line(out, trainer), file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        if not D.lost_a_rank(e):
            raise
        print(f"stopped: rank {D.rank()} lost another rank of the run ({str(e).splitlines()[0][:160]}); "
              + interrupted_line(out, trainer), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if lock is not None:
            lock.release()
        D.shutdown(started)
    return 0


def interrupted_line(out: Path | None, trainer: "Trainer | None") -> str:
    """The one line Ctrl-C ends with: where the last checkpoint is and the exact command that continues."""
    if out is None or trainer is None:
        return "interrupted before the run started: nothing was trained"
    resume = f"python -m fastcollab.train --resume --out {shlex.quote(str(out))}"
    done = len(trainer.metrics)
    where = (f"the last checkpoint is {out / CHECKPOINT_NAME} (epoch {done}/{trainer.config['epochs']})" if done
             else "no epoch had finished (no checkpoint yet)")
    return f"interrupted: {where}; continue with: {resume}"


if __name__ == "__main__":
    sys.exit(main())
