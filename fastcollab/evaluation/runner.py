"""Evaluating a whole test set: a seeded random subset (``--n``), batches, one progress line per attack,
per-attack results saved atomically to a partial file so that a killed run continues where it stopped, and
sharding across ``torchrun`` ranks (:func:`evaluate_slice` evaluates exactly this rank's slice of the images,
:func:`fastcollab.distributed.gather_rows` concatenates the per-example flags in rank order: no padding
duplicates). Rank 0 writes the partial file and runs the checks."""
from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed as D
from ..checkpoint import atomic_write
from .core import LIBRARY_ATTACKS, EvalAttack, percent, robust_under


def pick_subset(total: int, n: int | None, seed: int) -> tuple[torch.Tensor, dict]:
    """The test images to evaluate: all of them, or ``n`` drawn at random with ``seed`` (sorted), and the
    record that identifies them (two evaluations are comparable only on the same ``indices_sha1``)."""
    if n is None or n >= total:
        idx, random = torch.arange(total), False
    else:
        gen = torch.Generator().manual_seed(seed)
        idx, random = torch.randperm(total, generator=gen)[:n].sort().values, True
    sha = hashlib.sha1(idx.numpy().astype("int64").tobytes()).hexdigest()
    return idx, {"n": len(idx), "of": total, "random_subset": random, "seed": seed if random else None,
                 "indices_sha1": sha}


def to_float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def attack_seed(seed: int, attack: EvalAttack) -> int:
    """A seed per attack (stable across runs and resumes): the same attack gives the same numbers."""
    return (seed * 1_000_003 + zlib.crc32(attack.name.encode())) % (2 ** 31)


def evaluate_slice(models: dict[str, nn.Module], x_all: torch.Tensor, y_all: torch.Tensor, attack: EvalAttack,
                   *, batch_size: int, seed: int, device, bar=None) -> dict:
    """``{"robust": {peer: bool[N] (CPU)}, "meta": {...}}`` of ``attack`` on exactly these images: the unit of
    work of a shard (a rank evaluates its slice; the per-example flags are gathered afterwards)."""
    from .library import run_library_attack

    torch.manual_seed(attack_seed(seed, attack))
    hits = {n: [] for n in models}
    meta = {}
    library = attack.kind in LIBRARY_ATTACKS
    # the standard AutoAttack batches by itself; everything else goes batch by batch
    step = len(x_all) if attack.kind in ("aa", "aa-lite") else batch_size
    for start in range(0, len(x_all), max(step, 1)):
        x = to_float(x_all[start:start + step], device)
        y = y_all[start:start + step].to(device)
        if library:
            out = run_library_attack(attack, models, x, y, seed=attack_seed(seed, attack), batch_size=batch_size)
            meta = out["meta"]
            for n in models:
                hits[n].append(out["robust"][n].cpu())
        else:
            for n, m in models.items():
                hits[n].append(robust_under(m, x, y, attack)[0].cpu())
        if bar is not None:
            bar.update(len(x) * len(models))
    return {"robust": {n: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for n, v in hits.items()},
            "meta": meta}


class Partial:
    """Per-attack, per-example results of an evaluation in progress (JSON, written atomically after every
    attack). A file written for another setup (``fingerprint``) is ignored and replaced."""

    def __init__(self, path: Path | None, fingerprint: dict):
        self.path, self.fingerprint = (Path(path) if path else None), fingerprint
        self.attacks: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.attacks = saved.get("attacks", {})
            else:
                print(f"evaluate: {self.path} belongs to another evaluation setup: starting over", file=sys.stderr)

    def done(self, name: str) -> bool:
        return name in self.attacks

    def get(self, name: str) -> dict:
        rec = self.attacks[name]
        return {"robust": {n: torch.tensor([c == "1" for c in s], dtype=torch.bool) for n, s in rec["robust"].items()},
                "meta": rec["meta"], "time_s": rec["time_s"]}

    def put(self, name: str, robust: dict[str, torch.Tensor], meta: dict, time_s: float) -> None:
        self.attacks[name] = {"robust": {n: "".join("1" if b else "0" for b in r.tolist()) for n, r in robust.items()},
                              "meta": meta, "time_s": time_s}
        if self.path and D.is_main():
            text = json.dumps({"fingerprint": self.fingerprint, "attacks": self.attacks})
            atomic_write(self.path, lambda f: f.write(text.encode()))

    def remove(self) -> None:
        if self.path and D.is_main():
            self.path.unlink(missing_ok=True)


def run_attacks(models: dict[str, nn.Module], x_all: torch.Tensor, y_all: torch.Tensor, attacks: list[EvalAttack],
                *, batch_size: int, seed: int, device, partial: Partial, progress: bool = True,
                report: bool = True) -> dict:
    """Every attack on every peer, attack by attack (finished attacks of ``partial`` are skipped). Returns
    ``{"correct": {attack: {peer: bool[N]}}, "time_s": {attack: s}, "meta": {attack: meta}}``. ``progress``:
    a bar on a terminal; ``report``: with it, one line per attack."""
    was = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    correct, times, metas = {}, {}, {}
    tty = progress and sys.stderr.isatty()
    try:
        for a in attacks:
            if partial.done(a.name):
                rec = {**partial.get(a.name), "resumed": True}
            else:
                t0 = time.perf_counter()
                with tqdm(total=len(x_all) * len(models), desc=a.name, unit="img", disable=not tty,
                          leave=False) as bar:
                    mine = D.my_shard(len(x_all))
                    out = evaluate_slice(models, x_all[mine], y_all[mine], a, batch_size=batch_size, seed=seed,
                                         device=device, bar=bar)
                robust = {n: D.gather_rows(r.to(device).to(torch.uint8)).cpu().bool() for n, r in out["robust"].items()}
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                rec = {"robust": robust, "meta": out["meta"], "time_s": round(time.perf_counter() - t0, 3)}
                partial.put(a.name, rec["robust"], rec["meta"], rec["time_s"])
            correct[a.name], times[a.name], metas[a.name] = rec["robust"], rec["time_s"], rec["meta"]
            if progress and report and D.is_main():
                accs = "  ".join(f"{n} {percent(c):.2f}%"
                                 for n, c in rec["robust"].items())
                print(f"evaluate: {a.name} on {len(x_all)} images × {len(models)} peer(s): {accs}  "
                      f"({rec['time_s']:.1f} s{', from ' + str(partial.path) if rec.get('resumed') else ''})",
                      file=sys.stderr)
    finally:
        for n, m in models.items():
            m.train(was[n])
    return {"correct": correct, "time_s": times, "meta": metas}


def evaluate_suite(models: dict[str, nn.Module], x_test: torch.Tensor, y_test: torch.Tensor,
                   attacks: list[EvalAttack], *, num_classes: int, norm: str, eps: float, batch_size: int = 256,
                   seed: int = 0, n: int | None = None, check_n: int | None = 128, partial_path: Path | None = None,
                   fingerprint: dict | None = None, progress: bool = True, device="cpu",
                   check_budget: dict | None = None) -> dict:
    """The whole evaluation of a cohort: accuracies per attack on a (seeded) subset, union metrics, transfer and
    discrepancy for cohorts, the sanity checks and ε sweeps on the first ``check_n`` images of the subset
    (``check_n=0``: no checks; ``check_budget``: :class:`~.checks.CheckBudget` fields). Bad input (classes
    too few for DLR, AutoAttack not installed) is raised before any attack runs."""
    from .checks import CheckBudget, run_checks
    from .core import attack_norm, pick_transfer_attack, prediction_discrepancy, transfer_matrix, union_metrics
    from .library import check_applicable

    library = [a for a in attacks if a.kind in LIBRARY_ATTACKS]
    if library:
        check_applicable(library, num_classes)
    idx, subset = pick_subset(len(x_test), n, seed)
    x_all, y_all = x_test[idx], y_test[idx]
    partial = Partial(partial_path, {**(fingerprint or {}), "subset": subset, "seed": seed,
                                     "attacks": [a.describe() for a in attacks]})
    res = run_attacks(models, x_all, y_all, attacks, batch_size=batch_size, seed=seed, device=device,
                      partial=partial, progress=progress)
    count = max(len(x_all), 1)
    peers = {p: {a.name: 100.0 * float(res["correct"][a.name][p].sum()) / count for a in attacks} for p in models}
    union = {}
    for p in models:
        u = union_metrics({a.name: res["correct"][a.name][p] for a in attacks}, attacks)
        if u:
            union[p] = u
    described = {a.name: {**a.describe(), **({"meta": res["meta"][a.name]} if res["meta"][a.name] else {})}
                 for a in attacks}
    report = {"threat_model": {"norm": norm, "eps": eps}, "test_set": subset, "attacks": described,
              "peers": peers, "union": union, "time_s": res["time_s"]}
    if len(models) > 1:
        # percentages are means over examples: the example-weighted mean over the shards is exact
        mine = D.my_shard(len(x_all))
        weight = len(x_all[mine])
        report["discrepancy"] = D.weighted_mean(prediction_discrepancy(models, x_all[mine], batch_size), weight)
        t = pick_transfer_attack(attacks)
        if t is not None:
            torch.manual_seed(attack_seed(seed, t) + 1)
            local = transfer_matrix(models, x_all[mine], y_all[mine], t, batch_size)
            report["transfer"] = {"attack": t.name, **t.describe(),
                                  "accuracy": {s: D.weighted_mean(row, weight) for s, row in local.items()}}
    if check_n:
        k = min(check_n, len(x_all))
        xc, yc = to_float(x_all[:k], device), y_all[:k].to(device)
        norms = tuple(dict.fromkeys(nm for a in attacks if (nm := attack_norm(a)) in ("linf", "l2", "l1")))

        def timed_checks() -> dict:
            t0 = time.perf_counter()
            out = run_checks(models, xc, yc, num_classes, CheckBudget(norm=norm, eps=eps, **(check_budget or {})),
                             seed=seed, sweep_norms=norms)
            return {**out, "time_s": round(time.perf_counter() - t0, 3)}

        checks = D.broadcast_object(timed_checks() if D.is_main() else None)   # rank 0 checks, all ranks report
        report["eps_sweep"] = checks.pop("eps_sweep")
        report["checks"] = checks
        report["meaningless"] = checks["meaningless"]
    partial.remove()
    return report


def eps_text(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths, else ``0.5``."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and 0 < round(k) < 255 else f"{eps:g}"


def report_lines(report: dict, prefix: str = "") -> list[str]:
    """The console view of an evaluation report: the threat model, one line per peer (with the checks'
    warning next to the robust numbers), transfer and discrepancy, and the checks' summary line."""
    from .checks import summary_line, warning_for

    tm, ts = report["threat_model"], report["test_set"]
    train = f" (training eps {eps_text(report['train_eps'])})" if report.get("train_eps") is not None else ""
    subset = f"random subset of {ts['n']}/{ts['of']} (seed {ts['seed']})" if ts["random_subset"] else f"all {ts['n']}"
    lines = [f"{prefix}threat model {tm['norm']} eps {eps_text(tm['eps'])}{train} · test images: {subset}"]
    checks = report.get("checks")
    for peer, accs in report["peers"].items():
        union = report["union"].get(peer, {})
        lines.append(f"{prefix}{peer}: " + "  ".join(f"{k} {v:.2f}%" for k, v in accs.items())
                     + ("  |  union " + "  ".join(f"{k} {v:.2f}%" for k, v in union.items()) if union else "")
                     + warning_for(checks, peer))
    if "transfer" in report:
        t = report["transfer"]
        lines.append(f"{prefix}transfer ({t['attack']}; rows: source, columns: target):")
        for src, row in t["accuracy"].items():
            lines.append(f"{prefix}  {src}: " + "  ".join(f"{dst} {v:.2f}%" for dst, v in row.items()))
        lines.append(f"{prefix}prediction discrepancy: "
                     + "  ".join(f"{k} {v:.2f}%" for k, v in report["discrepancy"].items()))
    if checks:
        lines.append(prefix + summary_line(checks))
    return lines


def write_report(report: dict, json_path: Path, num_classes: int, title: str) -> None:
    """Rank 0 writes the report's JSON and, beside it, the robustness curves (``NAME_eps_curves.png``);
    ``report["written"]`` lists both paths."""
    from ..plots import plot_eps_curves

    json_path = Path(json_path)
    png = json_path.with_name(json_path.stem + "_eps_curves.png")
    report["written"] = [str(json_path)] + ([str(png)] if report.get("eps_sweep") else [])

    def write():
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(json_path, lambda f: f.write(text.encode()))
        if report.get("eps_sweep"):
            plot_eps_curves(report["eps_sweep"], num_classes, png, title)

    D.on_main(write)
