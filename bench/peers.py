"""fastcollab beside the official TRADES, MART and CAT training loops: same model, data, seeds; one process.

    python -m bench.peers --peer-repo /work/peers/TRADES --method trades --model smallcnn --steps 4 --json t.json
    python -m bench.peers --peer-repo /work/peers/MART   --method mart   --model smallcnn --steps 4
    python -m bench.peers --peer-repo /work/peers/CAT    --method cat    --model smallcnn --steps 4
    python -m bench.peers --peer-repo /work/peers/TRADES --method trades --train-epochs 3 --data npz:mini.npz

``--peer-repo`` is a local checkout of the official repository (yaodongyu/TRADES, YisenWang/MART,
liuxingbin/CAT). Nothing of it is copied into fastcollab: its own functions are imported from the checkout at
run time and driven the way its own training script drives them:

- trades: ``trades.trades_loss`` then ``loss.backward()``, ``optimizer.step()`` (train_trades_cifar10.py,
  ``train()`` lines 74-90);
- mart: ``mart.mart_loss`` then backward and step (train_resnet.py, ``train()`` lines 85-101);
- cat: its training step exists only inline in ``train_cat.py`` (``main()``, lines 223-298). The bench
  imports that script's ``attack_pgd`` and ``trades_loss`` (from its trades.py) and repeats the call sequence
  of those lines in :func:`_cat_step`, each statement annotated with the line it mirrors.

The official loop, fastcollab's eager engine and its fast engine start from the same weights (three cohorts
built from one seed; the official loop runs on fastcollab's model instances, so only the loop differs), take
turns on the same batches with the same seed per step, and — unless ``--no-resync`` — every step starts all
of them from the official loop's state (weights, BN statistics, momentum), outside the timed region, so that a
loss difference is one step's, not drift. Where the official code hard-codes a setting (TRADES' step 0.007,
CAT's β = 6), fastcollab is configured to match; the JSON lists every setting on both sides.

``--data SPEC`` takes the batches from a dataset (default: synthetic images). ``--train-epochs E`` replaces
the timing by a short training run: the official loop and the fast engine each train E epochs from the same
weights (never re-synced), then each peer's clean and PGD-20 accuracy on the test split.

Tolerance. The attacks take ``sign()`` of an input gradient, so float rounding flips a few pixels of ``x'``
and moves the loss by far more than rounding (more at small batches: each example weighs 1/B). The size of
that effect is measured in the same run: an extra, untimed copy of the official loop runs on channels_last
weights (the same math in a different convolution summation order) and its loss differs from the official
loop's by ``official_self_diff`` on each step. Step i's losses count as the same when they differ by at most
``max(--loss-rtol·max(1, |L_i|), 3 × official_self_diff_i)``: the fixed relative bound (5e-3, the one
bench.throughput uses between fastcollab's own engines) or, where the official code itself is noisier on that
step, three times its own noise (one sample of it, hence the margin). ``--no-self-check``: the fixed bound.
One known difference lies above that noise on trained weights (~1e-3 on TRADES / MART losses of 3-5):
fastcollab clips the ``x + 0.001·N`` random start to [0, 1] before the first attack gradient, the official
``trades_loss`` / ``mart_loss`` do not (bench/RESULTS.md, "Against the official code", measures it).

Two shims, both listed in the JSON: the official functions draw noise with ``torch.randn(...).cuda()``; on a
CPU-only machine ``Tensor.cuda`` is made the identity while an official function runs. Modules that an
imported official script imports at top level but that the imported functions never use, and that are not
installed here (CAT's train_cat.py: torchvision, tensorboardX), are stubbed by empty modules during its import.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.throughput import Runner, build_cohort, header, make_batches, run_interleaved, write_result
from fastcollab.cohort import Cohort
from fastcollab.engine import Precision, make_engine
from fastcollab.data import load_dataset
from fastcollab.errors import FastcollabError
from fastcollab.evaluation import evaluate_model, parse_attacks


# ------------------------------------------------------------------------------------ official settings
@dataclass(frozen=True)
class PeerSpec:
    """One official repository: where its code is, what its script passes, and the fastcollab twin config."""

    repo: str                          # GitHub owner/name
    module: str                        # imported from the checkout
    functions: tuple[str, ...]         # looked up in that module
    official: dict                     # what the official training script passes (source noted per key)
    fastcollab: dict                   # resolve_config overrides that make fastcollab compute the same step
    view_bn: str = "eval"              # fastcollab engine's no-grad peer views
    stub_if_absent: tuple[str, ...] = ()   # unused top-level imports of the module, stubbed when missing
    shadowed: tuple[str, ...] = ()     # top-level module names of the checkout (kept out of sys.modules after)


PEERS: dict[str, PeerSpec] = {
    "trades": PeerSpec(
        "yaodongyu/TRADES", "trades", ("trades_loss",),
        official={"step_size": 0.007, "epsilon": 0.031, "perturb_steps": 10, "beta": 6.0, "distance": "l_inf",
                  "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
                  "source": "train_trades_cifar10.py argparse defaults; trades_loss called at lines 81-88"},
        fastcollab={"method": "trades", "eps": 0.031, "step": 0.007, "attack_steps": 10, "beta": 6.0,
                    "attack_init": "normal", "attack_bn": "eval", "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 2e-4},
        shadowed=("trades",)),
    "mart": PeerSpec(
        "YisenWang/MART", "mart", ("mart_loss",),
        official={"step_size": 0.007, "epsilon": 0.031, "perturb_steps": 10, "beta": 5.0, "distance": "l_inf",
                  "lr": 0.01, "momentum": 0.9, "weight_decay": 3.5e-3,
                  "source": "train_resnet.py argparse defaults; mart_loss called at lines 92-99"},
        fastcollab={"method": "mart", "eps": 0.031, "step": 0.007, "attack_steps": 10, "beta": 5.0,
                    "attack_init": "normal", "attack_bn": "eval", "lr": 0.01, "momentum": 0.9,
                    "weight_decay": 3.5e-3},
        shadowed=("mart",)),
    "cat": PeerSpec(
        "liuxingbin/CAT", "train_cat", ("attack_pgd", "trades_loss"),
        official={"epsilon": 8 / 255, "pgd_alpha": 2 / 255, "attack_iters": 10, "restarts": 1, "norm": "l_inf",
                  "BNeval": True, "trades_beta": 6.0, "alp_mse_weight": 1.0, "base_weight": 1 / 20,
                  "kd_weight": 19 / 20, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "peers": "model1 TRADES (trades.py trades_loss), model2 ALP (attack_pgd)",
                  "source": "train_cat.sh (--epsilon 8 --pgd-alpha 2 --attack-iters 10 --BNeval --weight_decay "
                            "5e-4 --lr-max 0.1); train_cat.py lines 247-298 (6.0, F.mse_loss, 1/20, 19/20 "
                            "hard-coded)"},
        fastcollab={"method": "cat", "peer_methods": ["trades", "alp"], "alpha": 0.05, "beta": 6.0,
                    "alp_lambda": 1.0, "eps": 8 / 255, "step": 2 / 255, "attack_steps": 10,
                    "attack_init": "per-peer", "attack_bn": "eval", "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 5e-4},
        view_bn="train",        # train_cat.py lines 274-275: the cross-peer logits are train-mode forwards
        stub_if_absent=("torchvision", "torchvision.transforms", "tensorboardX"),
        shadowed=("train_cat", "trades", "models", "utils", "torchvision", "tensorboardX")),
}


# ------------------------------------------------------------------------------------ importing the code
@dataclass
class PeerCode:
    """The official functions, imported from a checkout, and what it took to import them."""

    method: str
    repo: Path
    commit: str
    fn: dict[str, Callable]
    stubbed: list[str] = field(default_factory=list)


def _commit(repo: Path, given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not runnable)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout: pass --peer-commit)"


def _stub(name: str) -> types.ModuleType:
    """An empty stand-in for a module the official script imports but the imported functions never call."""
    mod = types.ModuleType(name, "bench.peers stub: imported by the official script, unused by the bench")
    def attr(a: str):
        if a.startswith("__"):
            raise AttributeError(a)
        return _unused(f"{name}.{a}")     # ``from X import Y`` works; calling Y fails with one clear line
    mod.__getattr__ = attr
    return mod


def _unused(what: str):
    def fail(*a, **k):
        raise FastcollabError(f"bench.peers stubbed {what}, but the official code called it: install the real "
                              f"package into the venv")
    return fail


@contextlib.contextmanager
def _import_scope(repo: Path, spec: PeerSpec, stubbed: list[str]):
    """``repo`` first on sys.path, its module names free of earlier imports (two checkouts may both have a
    trades.py), absent unused imports stubbed; everything restored afterwards (the imported functions keep
    their own module globals)."""
    saved_path = list(sys.path)
    owned = lambda n: n.split(".")[0] in spec.shadowed  # noqa: E731
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if owned(n)}
    absent = {n.split(".")[0] for n in spec.stub_if_absent if importlib.util.find_spec(n.split(".")[0]) is None}
    for name in spec.stub_if_absent:
        if name.split(".")[0] in absent:
            sys.modules[name] = _stub(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, sys.modules[name])
            stubbed.append(name)
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for n in [n for n in sys.modules if owned(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def load_peer(repo: str | Path | None, method: str, commit: str | None = None) -> PeerCode:
    """Import the official functions of ``method`` from the checkout ``repo``; one FastcollabError if the
    checkout is missing or is not the expected repository."""
    if method not in PEERS:
        raise FastcollabError(f"unknown --method {method!r}: use one of {', '.join(PEERS)}")
    spec = PEERS[method]
    fetch = f"git clone https://github.com/{spec.repo}"
    if repo is None or not Path(repo).is_dir():
        raise FastcollabError(f"--peer-repo {repo} is not a directory: pass a local checkout of {spec.repo} "
                              f"({fetch})")
    repo = Path(repo).resolve()
    path = repo / f"{spec.module}.py"
    if not path.is_file():
        raise FastcollabError(f"--peer-repo {repo} has no {spec.module}.py: pass a checkout of {spec.repo} "
                              f"({fetch})")
    stubbed: list[str] = []
    with _import_scope(repo, spec, stubbed):
        try:
            module = importlib.import_module(spec.module)
        except Exception as e:  # noqa: BLE001 - any import failure of foreign code becomes one clear line
            raise FastcollabError(f"importing {path} failed ({type(e).__name__}: {e}): install what it "
                                  f"needs into the venv, or pass a checkout of {spec.repo}") from None
    missing = [f for f in spec.functions if not callable(getattr(module, f, None))]
    if missing:
        raise FastcollabError(f"{path} has no {', '.join(missing)}: pass a checkout of {spec.repo} ({fetch})")
    return PeerCode(method, repo, _commit(repo, commit), {f: getattr(module, f) for f in spec.functions}, stubbed)


@contextlib.contextmanager
def cuda_calls_stay(device: torch.device):
    """The official functions move fresh noise with ``.cuda()`` (e.g. TRADES trades.py line 32); on a CPU
    that raises, so while they run on the CPU ``Tensor.cuda`` returns the tensor itself. On CUDA: untouched."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# ------------------------------------------------------------------------------------ the official steps
def _single_step(loss_name: str):
    """TRADES / MART: their ``train()`` — model.train(), zero_grad, the official loss, backward, step."""
    def step(code: PeerCode, models, opts, x, y, s) -> torch.Tensor:
        model, opt = models["p0"], opts["p0"]
        model.train()
        opt.zero_grad()
        loss = code.fn[loss_name](model=model, x_natural=x, y=y, optimizer=opt, step_size=s["step_size"],
                                  epsilon=s["epsilon"], perturb_steps=s["perturb_steps"], beta=s["beta"],
                                  distance=s["distance"])
        loss.backward()
        opt.step()
        return loss
    return step


def _cat_step(code: PeerCode, models, opts, x, y, s) -> torch.Tensor:
    """One iteration of train_cat.py's inline loop (``main()``, lines 223-298; ``--attack pgd``), calling its
    own ``trades_loss`` (trades.py) and ``attack_pgd``; model1 = fastcollab peer p0, model2 = p1."""
    m1, m2, o1, o2 = models["p0"], models["p1"], opts["p0"], opts["p1"]
    m1.train()                                                        # lines 225-226
    m2.train()
    kl = torch.nn.KLDivLoss(reduction="batchmean")                    # line 223
    x1 = code.fn["trades_loss"](m1, 0, x, y, s["pgd_alpha"], s["epsilon"], s["attack_iters"])    # 247-248
    d2, _ = code.fn["attack_pgd"](m2, x, y, s["epsilon"], s["pgd_alpha"], s["attack_iters"], s["restarts"],
                                  s["norm"], BNeval=s["BNeval"])      # 250-251
    x2 = torch.clamp(x + d2.detach(), min=0, max=1)                   # 253-255 (limits of line 18)
    c1, a1 = m1(x), m1(x1)                                            # 261-262
    loss1 = F.cross_entropy(c1, y) + s["trades_beta"] * kl(F.log_softmax(a1, dim=1), F.softmax(c1, dim=1))
    a2, c2 = m2(x2), m2(x)                                            # 268-269
    loss2 = 0.5 * (F.cross_entropy(a2, y) + F.cross_entropy(c2, y)) + s["alp_mse_weight"] * F.mse_loss(a2, c2)
    a12, a21 = m1(x2), m2(x1)                                         # 274-275
    loss3 = (kl(F.log_softmax(a1, dim=1), F.softmax(a21, dim=1).detach())
             + kl(F.log_softmax(a2, dim=1), F.softmax(a12, dim=1).detach()))                 # 277-279
    loss = s["base_weight"] * (loss1 + loss2) + s["kd_weight"] * loss3                       # 281
    o1.zero_grad()                                                    # 282-286
    o2.zero_grad()
    loss.backward()
    o1.step()
    o2.step()
    out1 = m1(x)                                                      # 290-291: the logging forward and
    log = F.cross_entropy(out1, y)                                    # 294-298: its statistics (host syncs)
    loss1.item(), (a1.max(1)[1] == y).sum().item(), log.item(), (out1.max(1)[1] == y).sum().item()
    return loss


OFFICIAL_STEPS = {"trades": _single_step("trades_loss"), "mart": _single_step("mart_loss"), "cat": _cat_step}


class OfficialLoop:
    """The official step as an engine for bench.throughput's Runner: ``step`` returns ``.total``."""

    name = "official"

    def __init__(self, code: PeerCode, cohort: Cohort, device: torch.device):
        self.code, self.cohort, self.device = code, cohort, device
        self.settings = PEERS[code.method].official

    def describe(self) -> str:
        return f"official {PEERS[self.code.method].repo} @ {self.code.commit[:12]}"

    def step(self, x, y, ctx):
        with cuda_calls_stay(self.device):
            loss = OFFICIAL_STEPS[self.code.method](self.code, self.cohort.models, self.cohort.optimizers, x, y,
                                                    self.settings)
        return types.SimpleNamespace(total=loss)


# ------------------------------------------------------------------------------------ the benchmark
def make_runners(code: PeerCode, args, device: torch.device, self_check: bool) -> list[Runner]:
    """Official (first: the others are re-synced from it), fastcollab eager, fastcollab fast, and the
    untimed official self-check on channels_last weights. Each cohort is built from the same seed."""
    spec = PEERS[code.method]
    cohort = lambda: build_cohort(code.method, args.model, device, args.seed, overrides=spec.fastcollab)  # noqa: E731
    fp32 = Precision(device)
    runners = [Runner("official", OfficialLoop(code, cohort(), device), None, device),
               Runner("fastcollab eager", make_engine("eager", cohort(), fp32, spec.view_bn), "reference", device),
               Runner("fastcollab fast", make_engine("fast", cohort(), Precision(device, amp=args.amp),
                                                     spec.view_bn), None, device)]
    if self_check:
        twin = cohort()
        for m in twin.models.values():
            m.to(memory_format=torch.channels_last)
        runners.append(Runner("official (channels_last self-check)", OfficialLoop(code, twin, device), None,
                              device))
    return runners


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


SELF_DIFF_MARGIN = 3.0


def compare(runners: list[Runner], batch_size: int, rtol: float) -> dict:
    """images/s of each loop, the ratios against the official loop, the losses side by side, and whether
    they agree: step i's losses are the same when they differ by at most ``tolerance[i] = max(rtol·max(1,
    |L_i|), SELF_DIFF_MARGIN × |L_i − L_i(official on channels_last)|)``: the official loop's own
    sensitivity to summation order on that step (one sample of the sign-flip noise, hence the margin), never
    less than the fixed relative bound (without the self-check: the fixed bound alone)."""
    reports = [r.report(batch_size, r.flops) for r in runners]
    reports[0]["ops_backend"] = "none (the official code: plain torch)"
    off, eager, fast = reports[:3]

    def diffs(rep):
        return [abs(a - b) for a, b in zip(off["losses"], rep["losses"])]

    self_diffs = diffs(reports[3]) if len(reports) > 3 else [0.0] * len(off["losses"])
    tolerance = [max(rtol * max(1.0, abs(a)), SELF_DIFF_MARGIN * d) for a, d in zip(off["losses"], self_diffs)]
    within = lambda rep: all(d <= t for d, t in zip(diffs(rep), tolerance))  # noqa: E731
    out = {"official": off, "fastcollab_eager": eager, "fastcollab_fast": fast,
           "ratio_eager_vs_official": eager["images_per_s"] / off["images_per_s"],
           "ratio_fast_vs_official": fast["images_per_s"] / off["images_per_s"],
           "losses": {"official": off["losses"], "fastcollab_eager": eager["losses"],
                      "fastcollab_fast": fast["losses"]},
           "loss_diff": {"eager": diffs(eager), "fast": diffs(fast)},
           "first_step_loss_diff": {"eager": diffs(eager)[0], "fast": diffs(fast)[0]},
           "max_loss_diff": {"eager": max(diffs(eager)), "fast": max(diffs(fast))},
           "loss_rtol": rtol, "self_diff_margin": SELF_DIFF_MARGIN, "tolerance": tolerance,
           "same_losses": within(eager) and within(fast)}
    if len(reports) > 3:
        out["losses"]["official_channels_last"] = reports[3]["losses"]
        out["official_self_diff"] = self_diffs
    return out


def accuracy_run(code: PeerCode, args, device: torch.device) -> dict:
    """``--train-epochs E``: the official loop and fastcollab's fast engine each train from the same weights on
    the same batch sequence (interleaved, never re-synced, the base learning rate throughout), then every
    peer's clean and PGD-20 accuracy on the test split (fastcollab's evaluation, eps of the method's setting,
    step eps/4, eval-mode BN). Noise: the binomial standard error of one accuracy on that many images."""
    data = load_dataset(args.data)
    steps = args.train_epochs * (len(data.x_train) // args.batch_size)
    batches, _ = make_batches(steps, args.batch_size, device, args.seed, args.data)
    official, _, fast = make_runners(code, args, device, self_check=False)
    run_interleaved([official, fast], batches, args)
    attacks = parse_attacks("clean,pgd20", eps=PEERS[code.method].fastcollab["eps"])
    acc = {}
    for label, r in (("official", official), ("fastcollab_fast", fast)):
        acc[label] = {}
        for name, model in r.engine.cohort.models.items():
            model.eval()
            acc[label][name] = evaluate_model(model, data.x_test, data.y_test, attacks)
    n = len(data.x_test)
    se = {k: 100 * math.sqrt(max(v, 1e-9) / 100 * (1 - v / 100) / n)
          for k, v in next(iter(acc["official"].values())).items()}
    return {"train_epochs": args.train_epochs, "train_steps": steps, "test_images": n, "accuracy": acc,
            "binomial_se_pct": se, "eval": "clean, pgd20 (fastcollab.evaluation, uniform init, eval BN)",
            "lr": "base lr of the settings, constant", "losses": {"official": official.losses,
                                                                  "fastcollab_fast": fast.losses},
            "official_s_per_step": statistics.median(official.times),
            "fastcollab_fast_s_per_step": statistics.median(fast.times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-repo", required=True, help="local checkout of the official repository")
    p.add_argument("--peer-commit", default=None, help="its commit, when the checkout has no .git")
    p.add_argument("--method", required=True, choices=sorted(PEERS))
    p.add_argument("--model", default="smallcnn", choices=["smallcnn", "resnet18"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help="training batches from this dataset spec (e.g. npz:cifar10_mini.npz); default synthetic")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="fastcollab fast engine in bf16 autocast (GPU)")
    p.add_argument("--loss-rtol", type=float, default=5e-3)
    p.add_argument("--no-self-check", action="store_true", help="skip the official channels_last self-check")
    p.add_argument("--no-resync", action="store_true", help="let each loop's weights drift")
    p.add_argument("--train-epochs", type=int, default=0,
                   help="instead of timing: train official and fast E epochs on --data, compare clean/PGD-20")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.train_epochs and not args.data:
        raise SystemExit("bench.peers: --train-epochs needs --data, e.g. npz:/work/shared/data/cifar10_mini.npz")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("bench.peers: --steps and --batch-size must be >= 1, --warmup >= 0")
    try:
        code = load_peer(args.peer_repo, args.method, args.peer_commit)
        if args.data:
            load_dataset(args.data)          # a bad spec fails here, in one line, before any work
    except FastcollabError as e:
        print(f"bench.peers: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.no_flops = False        # run_interleaved counts the official loop's FLOPs on its first step
    args.peers, args.peer_methods = None, None     # header() fields of bench.throughput
    if args.train_epochs:
        args.warmup, args.no_resync, args.no_flops = 0, True, True
        out = {**header(args, device), **accuracy_run(code, args, device)}
        out["command"] = "python -m bench.peers " + " ".join(sys.argv[1:] if argv is None else argv)
        print(json.dumps(out["accuracy"]), f"binomial SE (pp): {out['binomial_se_pct']}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    batches, _ = make_batches(args.warmup + args.steps, args.batch_size, device, args.seed, args.data)
    runners = make_runners(code, args, device, not args.no_self_check)
    out = header(args, device)
    out["command"] = "python -m bench.peers " + " ".join(sys.argv[1:] if argv is None else argv)
    out["threads"] = torch.get_num_threads()
    out["load_average_before"] = _load_average()
    run_interleaved(runners, batches, args)
    out["load_average_after"] = _load_average()
    spec = PEERS[args.method]
    out["peer"] = {"repo": spec.repo, "checkout": str(code.repo), "commit": code.commit,
                   "functions": [f"{spec.module}.{f}" for f in spec.functions],
                   "stubbed_imports": code.stubbed,
                   "shims": [] if device.type == "cuda" else ["Tensor.cuda is the identity while official code "
                                                             "runs (CPU-only machine)"]}
    out["settings"] = {"official": spec.official, "fastcollab": {**spec.fastcollab, "view_bn": spec.view_bn},
                       "model": f"fastcollab {args.model} instances, same initial weights (seed {args.seed})",
                       "data": f"bench.throughput.make_batches ({args.data or 'synthetic'}, crop + flip), same "
                               "batches and per-step seeds for every loop", "resync_every_step": not args.no_resync}
    out.update(compare(runners, args.batch_size, args.loss_rtol))
    for key in ("official", "fastcollab_eager", "fastcollab_fast"):
        r = out[key]
        print(f"{key:17s} {r['ms_per_step']:9.1f} ms/step  {r['images_per_s']:7.2f} img/s")
    print(f"fast/official {out['ratio_fast_vs_official']:.3f}  eager/official {out['ratio_eager_vs_official']:.3f}"
          f"  same losses: {out['same_losses']} (max |dloss| eager {out['max_loss_diff']['eager']:.2e}, fast "
          f"{out['max_loss_diff']['fast']:.2e}; official self-diff max {max(out.get('official_self_diff', [0])):.2e})"
          f"  load {out['load_average_before']} -> {out['load_average_after']}")
    write_result(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
