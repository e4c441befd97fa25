"""``python -m fastcollab.study``: methods × seeds at one equal budget, resumable, with a mean ± std table.

    python -m fastcollab.study --out studies/mini40 --seeds 0,1,2 \\
        --common "--model smallcnn --dataset npz:../shared/data/cifar10_mini.npz --epochs 40 --lr 0.01" \\
        --variant at="--method at" --variant mat="--method mat" --variant mat-a0="--method mat --alpha 0" \\
        --evaluate "--attacks clean,pgd20,aa-fast"

or the same as a YAML file (``--spec study.yaml`` with keys ``common``, ``seeds``, ``variants`` (name: flags),
``evaluate``, ``jobs``). Every (variant, seed) is one ordinary run of ``python -m fastcollab.train`` in
``OUT/VARIANT/seedS`` (``--seed S --out ...`` appended to the common and the variant's flags), so each run
holds its own config, metrics, checkpoint and final.json. When ``--evaluate`` is given, every finished run is
then attacked by ``python -m fastcollab.evaluate`` with those flags (results in ``OUT/VARIANT/seedS/eval.json``).

Runs start in seed-major order (all variants at the first seed, then the next seed), ``jobs`` at a time.
Resuming: run the same command again. A finished run is kept, a run with a checkpoint is continued with
``--resume``, a run killed before its first checkpoint is started again; a spec that differs from the one saved
in ``OUT/study.yaml`` is refused (a study is one budget). Diverged and failed runs are reported in the table,
never averaged in silently.

Outputs: ``study.json`` (every run's numbers and the aggregates), ``study.md`` (per variant and peer: seeds,
clean and every attack as mean ± std over seeds, s/epoch, the evaluation checks' status) and ``study.png``
(mean ± std of every attack per variant and peer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import read_yaml
from .errors import FastcollabError

SPEC, RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "study.yaml", "study.json", "study.md", "study.png"
EVAL_JSON, TRAIN_LOG, EVAL_LOG = "eval.json", "train.log", "evaluate.log"
RESERVED = ("--seed", "--out", "--resume", "--config")


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    flags: tuple[str, ...]
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"


def parse_spec(args: argparse.Namespace) -> dict:
    """The study's specification from ``--spec FILE`` and/or the flags (the flags win)."""
    spec: dict = {"common": "", "seeds": [0], "variants": {}, "evaluate": "", "jobs": 1}
    if args.spec:
        data = read_yaml(args.spec, "--spec")
        unknown = sorted(set(data) - set(spec))
        if unknown:
            raise FastcollabError(f"--spec {args.spec}: unknown keys {', '.join(unknown)}: use {', '.join(spec)}")
        spec.update(data)
    if args.common is not None:
        spec["common"] = args.common
    if args.seeds is not None:
        spec["seeds"] = args.seeds
    if args.evaluate is not None:
        spec["evaluate"] = args.evaluate
    if args.jobs is not None:
        spec["jobs"] = args.jobs
    for item in args.variant or []:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise FastcollabError(f"--variant {item!r}: write NAME=FLAGS, e.g. --variant mat=\"--method mat\"")
        spec["variants"][name.strip()] = flags
    return normalise_spec(spec)


def normalise_spec(spec: dict) -> dict:
    if not spec["variants"]:
        raise FastcollabError("a study needs at least one --variant NAME=FLAGS (or `variants:` in --spec)")
    seeds = spec["seeds"]
    if isinstance(seeds, str):
        seeds = [s for s in seeds.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in (seeds if isinstance(seeds, list) else [seeds])]
    except (TypeError, ValueError):
        raise FastcollabError(f"seeds must be whole numbers like 0,1,2, got {spec['seeds']!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FastcollabError(f"seeds must be distinct and at least one, got {spec['seeds']!r}")
    if not isinstance(spec["jobs"], int) or spec["jobs"] < 1:
        raise FastcollabError(f"jobs must be a whole number >= 1, got {spec['jobs']!r}")
    variants = {}
    for name, flags in spec["variants"].items():
        if not name or "/" in name or name.startswith("."):
            raise FastcollabError(f"variant name {name!r} is not usable as a folder name: use e.g. mat-a0")
        words = shlex.split(str(flags))
        if "--method" not in words:
            raise FastcollabError(f"variant {name!r} has no --method: write e.g. {name}=\"--method mat\"")
        variants[str(name)] = " ".join(shlex.quote(w) for w in words)
    for what, text in [("common", spec["common"]), ("evaluate", spec["evaluate"]), *variants.items()]:
        clash = [w for w in shlex.split(str(text)) if w.split("=")[0] in RESERVED]
        if clash:
            raise FastcollabError(f"{what}: {', '.join(clash)} is set by the study itself (seeds and folders): "
                                  "drop it")
    return {"common": str(spec["common"]), "seeds": seeds, "variants": variants,
            "evaluate": str(spec["evaluate"]), "jobs": spec["jobs"]}


def plan_runs(spec: dict, out: Path) -> list[Run]:
    """Seed-major order: every variant runs its first seed before any variant runs its second, so a study cut
    short still compares every variant (and variants added later are queued before repeats of earlier ones)."""
    common = shlex.split(spec["common"])
    return [Run(v, s, tuple(common + shlex.split(flags)), out / v / f"seed{s}")
            for s in spec["seeds"] for v, flags in spec["variants"].items()]


def check_or_save_spec(spec: dict, out: Path) -> None:
    """A study folder holds one study: the first call saves its spec, later calls must match it."""
    saved_path = out / SPEC
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text())
        same_budget = {k: saved.get(k) for k in ("common", "evaluate")} == {k: spec[k] for k in ("common", "evaluate")}
        changed = [v for v in spec["variants"] if v in saved.get("variants", {}) and saved["variants"][v] != spec["variants"][v]]
        if not same_budget or changed:
            what = "common/evaluate flags" if not same_budget else f"flags for {', '.join(changed)}"
            raise FastcollabError(f"{out} holds a study with different {what} ({saved_path}): resume it with the "
                                  "same settings, or start the new study in another --out")
        # new variants or seeds extend the study; nothing already run changes meaning
        merged = {**saved, "seeds": sorted(set(saved["seeds"]) | set(spec["seeds"])),
                  "variants": {**saved["variants"], **spec["variants"]}, "jobs": spec["jobs"]}
        spec.update(merged)
    elif out.exists() and any(out.iterdir()):
        raise FastcollabError(f"--out {out} exists and is not a fastcollab study (no {SPEC}): choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_state(run: Run) -> str:
    """done | diverged | resumable | new"""
    final = read_json(run.folder / "final.json")
    if final is not None:
        return "diverged" if final.get("status") == "diverged" else "done"
    return "resumable" if (run.folder / "checkpoint.pt").is_file() else "new"


def train_command(run: Run, state: str) -> list[str]:
    cmd = [sys.executable, "-m", "fastcollab.train", *run.flags, "--seed", str(run.seed), "--out", str(run.folder),
           "--no-progress"]
    if state == "resumable":
        cmd.append("--resume")
    elif run.folder.exists():  # killed before its first checkpoint: our own folder, start it again
        cmd.append("--overwrite")
    return cmd


def evaluate_command(run: Run, flags: str) -> list[str]:
    return [sys.executable, "-m", "fastcollab.evaluate", "--run", str(run.folder), *shlex.split(flags),
            "--json", str(run.folder / EVAL_JSON)]


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # several runs side by side: one thread each (README, CPU threading)
    return env


def execute(runs: list[Run], spec: dict, log=print) -> dict[Run, str]:
    """Train (and evaluate) every run that is not finished, ``spec['jobs']`` at a time. Returns each run's
    outcome: ok | diverged | failed (exit N)."""
    pending = []
    outcome: dict[Run, str] = {}
    for run in runs:
        state = run_state(run)
        needs_eval = bool(spec["evaluate"]) and not (run.folder / EVAL_JSON).is_file()
        if state == "diverged":
            outcome[run] = "diverged"
        elif state == "done" and not needs_eval:
            outcome[run] = "ok"
        else:
            pending.append((run, state))
    log(f"study: {len(runs)} runs, {len(runs) - len(pending)} already finished, {len(pending)} to run "
        f"({spec['jobs']} at a time)")
    active: list[tuple[Run, list[list[str]], subprocess.Popen, float, object]] = []
    queue = [(run, ([train_command(run, state)] if state != "done" else [])
              + ([evaluate_command(run, spec["evaluate"])] if spec["evaluate"] else [])) for run, state in pending]

    def start(run, cmds):
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        log_path = run.folder.parent / f"{run.folder.name}.{'train' if 'fastcollab.train' in cmds[0] else 'evaluate'}.log"
        fh = open(log_path, "a")
        log(f"  start {run.label}: {shlex.join(cmds[0][1:])}")
        active.append((run, cmds, subprocess.Popen(cmds[0], stdout=fh, stderr=subprocess.STDOUT, env=child_env()),
                       time.perf_counter(), fh))

    while queue or active:
        while queue and len(active) < spec["jobs"]:
            start(*queue.pop(0))
        time.sleep(0.2)
        for item in list(active):
            run, cmds, proc, t0, fh = item
            code = proc.poll()
            if code is None:
                continue
            fh.close()
            active.remove(item)
            elapsed = time.perf_counter() - t0
            if code != 0:
                outcome[run] = "diverged" if run_state(run) == "diverged" else f"failed (exit {code})"
                log(f"  {outcome[run]}: {run.label} after {elapsed:.0f} s (log: {fh.name})")
            elif len(cmds) > 1:
                log(f"  trained {run.label} in {elapsed:.0f} s")
                queue.insert(0, (run, cmds[1:]))
            else:
                outcome[run] = "ok"
                log(f"  finished {run.label} in {elapsed:.0f} s")
    return outcome


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _seconds_per_epoch(folder: Path) -> float | None:
    try:
        lines = [json.loads(t) for t in (folder / "metrics.jsonl").read_text().splitlines() if t.strip()]
    except (OSError, ValueError):
        return None
    times = [r["time_s"] for r in lines if "time_s" in r]
    return sum(times) / len(times) if times else None


def run_numbers(run: Run) -> dict | None:
    """Per-peer accuracies of one finished run: the study's evaluation if it has one, else final.json."""
    result = read_json(run.folder / EVAL_JSON) or read_json(run.folder / "final.json")
    if not result or "peers" not in result:
        return None
    checks = result.get("checks")
    per_peer = (checks.get("peers") or {}) if isinstance(checks, dict) else {}
    statuses = [c.get("status") for found in per_peer.values() for c in found if isinstance(c, dict)]
    worst = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass" if statuses else "not run"
    return {"peers": result["peers"], "checks": worst, "s_per_epoch": _seconds_per_epoch(run.folder),
            "test_images": result.get("test_images")}


def aggregate(runs: list[Run], outcome: dict[Run, str]) -> dict:
    """Per variant and peer: mean ± std over the seeds that finished, every attack of the evaluation."""
    table: dict = {}
    for run in runs:
        entry = table.setdefault(run.variant, {"seeds": [], "diverged": [], "failed": [], "unfinished": [],
                                               "peers": {}, "s_per_epoch": [], "checks": []})
        status = outcome.get(run, "not run")
        numbers = run_numbers(run) if status == "ok" else None
        if numbers is None:
            kind = status if status == "diverged" else "failed" if status.startswith("failed") else "unfinished"
            entry[kind].append(run.seed)
            continue
        entry["seeds"].append(run.seed)
        entry["checks"].append(numbers["checks"])
        if numbers["s_per_epoch"] is not None:
            entry["s_per_epoch"].append(numbers["s_per_epoch"])
        for peer, accs in numbers["peers"].items():
            for attack, acc in accs.items():
                if isinstance(acc, (int, float)):
                    entry["peers"].setdefault(peer, {}).setdefault(attack, []).append(float(acc))
    for entry in table.values():
        entry["summary"] = {peer: {a: dict(zip(("mean", "std"), _mean_std(v)), n=len(v)) for a, v in accs.items()}
                            for peer, accs in entry["peers"].items()}
    return table


def write_markdown(table: dict, spec: dict, path: Path) -> None:
    attacks: list[str] = []
    for entry in table.values():
        for accs in entry["summary"].values():
            attacks += [a for a in accs if a not in attacks]
    head = ["variant", "peer", "seeds", *attacks, "s / epoch", "checks"]
    lines = [f"Common flags: `{spec['common']}`; seeds {','.join(map(str, spec['seeds']))}"
             + (f"; evaluated with `{spec['evaluate']}`" if spec["evaluate"] else "; numbers from final.json")
             + ". Accuracy % as mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for variant, entry in table.items():
        spe = f"{_mean_std(entry['s_per_epoch'])[0]:.1f}" if entry["s_per_epoch"] else "–"
        checks = ",".join(sorted(set(entry["checks"]))) or "–"
        if not entry["summary"]:
            lines.append(f"| {variant} | – | 0 | " + " | ".join("–" for _ in attacks) + f" | {spe} | {checks} |")
        for peer, accs in entry["summary"].items():
            cells = [f"{accs[a]['mean']:.1f} ± {accs[a]['std']:.1f}" if a in accs else "–" for a in attacks]
            lines.append(f"| {variant} | {peer} | {len(entry['seeds'])} | " + " | ".join(cells) + f" | {spe} | {checks} |")
        for kind in ("diverged", "failed", "unfinished"):
            if entry[kind]:
                lines.append(f"| {variant} | ({kind}: seeds {','.join(map(str, entry[kind]))}) | | "
                             + " | ".join("" for _ in attacks) + " | | |")
    path.write_text("\n".join(lines) + "\n")


def plot_study(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{v}/{p}", accs) for v, e in table.items() for p, accs in e["summary"].items()]
    if not rows:
        return
    attacks = sorted({a for _, accs in rows for a in accs}, key=lambda a: (a != "clean", a))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * len(attacks) / 2), 4))
    width = 0.8 / len(attacks)
    for k, attack in enumerate(attacks):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [accs.get(attack, {}).get("mean", 0) for _, accs in rows], width,
               yerr=[accs.get(attack, {}).get("std", 0) for _, accs in rows], capsize=3, label=attack)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r for r, _ in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy % (mean ± std over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcollab.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="study folder (resumed when it holds the same study; alone, it "
                                                "resumes or reports the study saved there)")
    p.add_argument("--spec", help="YAML file with common, seeds, variants, evaluate, jobs")
    p.add_argument("--common", help="train flags every run shares (the equal budget)")
    p.add_argument("--variant", action="append", help="NAME=FLAGS, repeatable, e.g. mat=\"--method mat\"")
    p.add_argument("--seeds", help="comma list of seeds (default 0)")
    p.add_argument("--evaluate", help="evaluate flags for every finished run, e.g. \"--attacks clean,pgd20\"")
    p.add_argument("--jobs", type=int, help="runs at a time (default 1; each child runs one thread)")
    p.add_argument("--report-only", action="store_true", help="write the table from what has finished, run nothing")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        saved = Path(args.out) / SPEC
        if not args.spec and not args.variant and saved.is_file():  # `--out DIR` alone: the saved study
            args.spec = str(saved)
        spec = parse_spec(args)
        out = Path(args.out)
        check_or_save_spec(spec, out)
        runs = plan_runs(spec, out)
        if args.report_only:  # a trained run still waiting for the study's evaluation is not finished
            evaluated = lambda r: not spec["evaluate"] or (r.folder / EVAL_JSON).is_file()  # noqa: E731
            outcome = {r: {"done": "ok" if evaluated(r) else "not run", "diverged": "diverged"}.get(
                run_state(r), "not run") for r in runs}
        else:
            outcome = execute(runs, spec)
        table = aggregate(runs, outcome)
        (out / RESULTS_JSON).write_text(json.dumps({"spec": spec, "runs": {f"{r.variant}/seed{r.seed}": outcome.get(r)
                                                                            for r in runs}, "table": table}, indent=1))
        write_markdown(table, spec, out / RESULTS_MD)
        plot_study(table, out / RESULTS_PNG)
        print((out / RESULTS_MD).read_text())
        bad = [r.label for r in runs if outcome.get(r) not in ("ok",)]
        if bad:
            print(f"study: {len(bad)} run(s) did not finish cleanly: {', '.join(bad)}", file=sys.stderr)
            return 1
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
