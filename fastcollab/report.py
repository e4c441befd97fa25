"""``python -m fastcollab.report RUN_DIR... [--out report/]``: compare runs fairly.

    python -m fastcollab.report runs/at runs/mat runs/trades --out report/

Reads every run's final.json (the final evaluation of training) and eval*.json (``python -m
fastcollab.evaluate``), one row per peer and source, and writes ``report.md``, ``report.html`` (method, model,
epochs, threat model, clean, PGD-20, AA, per-norm and worst-case union accuracy, time per epoch, checks) and
``scatter.png`` (clean vs robust accuracy). Numbers measured under different threat models (norm, ε) or on
different test images (dataset, subset) never share a column: each such group gets its own table, headed by
what it was measured under, and the report says which runs differ in what.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from .errors import FastcollabError
from .evaluation.runner import eps_text
from .rundir import FINAL, METRICS

COLUMNS = ("run", "source", "peer", "method", "model", "epochs", "clean", "PGD-20", "AA", "linf", "l2", "l1",
           "worst", "s/epoch", "checks")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastcollabError(f"{path} is not readable JSON ({e}): re-run the evaluation that wrote it") from None


def epoch_time(run: Path) -> float | None:
    """Mean wall time of a training epoch (metrics.jsonl), or None."""
    path = run / METRICS
    if not path.is_file():
        return None
    times = [json.loads(line).get("time_s") for line in path.read_text().splitlines() if line.strip()]
    times = [t for t in times if isinstance(t, (int, float))]
    return sum(times) / len(times) if times else None


def threat_model(report: dict) -> tuple[str, float]:
    """(norm, eps) a report was measured under (older final.json: its PGD-20's budget)."""
    if "threat_model" in report:
        return report["threat_model"]["norm"], float(report["threat_model"]["eps"])
    for a in report.get("attacks", {}).values():
        if "eps" in a and a.get("norm") in ("linf", "l2", "l1"):
            return a["norm"], float(a["eps"])
    return "none", 0.0


def budgets(report: dict) -> tuple:
    """Every (norm, eps) an attack of the report used (the MSD components included): runs whose union columns
    combine different budgets are not comparable."""
    found = set()
    for a in report.get("attacks", {}).values():
        for part in [a] + list(a.get("components", [])):
            if part.get("norm") in ("linf", "l2", "l1") and "eps" in part:
                found.add((part["norm"], round(float(part["eps"]), 8)))
    return tuple(sorted(found))


def test_set(report: dict) -> tuple[str, str]:
    """(dataset, the identity of the test images): the subset's index hash, else the image count."""
    ts = report.get("test_set") or {}
    ident = ts.get("indices_sha1") or f"first {report.get('test_images')}"
    return str(report.get("dataset")), f"{ts.get('n', report.get('test_images'))} images [{ident[:10]}]"


def checks_status(report: dict, peer: str) -> str:
    checks = (report.get("checks") or {}).get("peers", {}).get(peer)
    if checks is None:
        return "not run"
    fails = [c["name"] for c in checks if c["status"] == "fail"]
    warns = [c["name"] for c in checks if c["status"] == "warn"]
    if peer in report.get("meaningless", []):
        return "DEGENERATE: robust numbers meaningless"
    if fails:
        return "FAIL: " + ", ".join(fails)
    return ("warn: " + ", ".join(warns)) if warns else "pass"


def rows_of(run: Path) -> list[dict]:
    run = Path(run)
    if not run.is_dir():
        raise FastcollabError(f"{run} is not a directory: pass run directories written by python -m fastcollab.train")
    sources = ([run / FINAL] if (run / FINAL).is_file() else []) + sorted(run.glob("eval*.json"))
    if not sources:
        raise FastcollabError(f"{run} holds no final.json or eval*.json: finish its training, or run "
                              f"python -m fastcollab.evaluate --run {run}")
    per_epoch = epoch_time(run)
    rows = []
    for path in sources:
        rep = _read_json(path)
        if "peers" not in rep:
            continue
        norm, eps = threat_model(rep)
        for peer, accs in rep["peers"].items():
            union = rep.get("union", {}).get(peer, {})
            aa = next((k for k in ("aa", "aa-lite", "aa-fast") if k in accs), None)
            rows.append({"run": run.name, "source": path.name, "peer": peer, "method": rep.get("method"),
                         "model": rep.get("model"), "epochs": rep.get("epochs"), "clean": accs.get("clean"),
                         "PGD-20": accs.get("pgd20"), "AA": accs.get(aa) if aa else None, "_aa": aa,
                         "linf": union.get("linf"), "l2": union.get("l2"), "l1": union.get("l1"),
                         "worst": union.get("worst"), "s/epoch": per_epoch, "checks": checks_status(rep, peer),
                         "_key": (test_set(rep), norm, round(eps, 10), budgets(rep)), "_path": str(path)})
    return rows


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["_key"], []).append(r)
    return groups


def describe_key(key) -> str:
    (dataset, images), norm, eps, used = key
    others = [f"{n} {eps_text(e)}" for n, e in used if (n, e) != (norm, round(eps, 8))]
    extra = f" (union columns also use {', '.join(others)})" if others else ""
    return f"threat model {norm} ε = {eps_text(eps)}{extra} · dataset {dataset} · test set {images}"


def differences(groups: dict[tuple, list[dict]]) -> list[str]:
    """Lines saying which runs were measured under what, when there is more than one group."""
    if len(groups) < 2:
        return []
    lines = ["Runs measured under different threat models or test sets are in separate tables (their numbers are "
             "not comparable):"]
    for key, rows in groups.items():
        runs = sorted({f"{r['run']}/{r['source']}" for r in rows})
        lines.append(f"- {describe_key(key)}: {', '.join(runs)}")
    return lines


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _cell_of(row: dict, column: str) -> str:
    """A table cell; the AA column names the AutoAttack variant unless it is the standard one."""
    text = _cell(row[column])
    return f"{text} ({row['_aa']})" if column == "AA" and row["_aa"] not in (None, "aa") else text


def markdown(groups: dict[tuple, list[dict]]) -> str:
    out = ["# fastcollab report", ""]
    diff = differences(groups)
    if diff:
        out += diff + [""]
    for key, rows in groups.items():
        out += [f"## {describe_key(key)}", "", "Accuracy in % (PGD-20: best iterate per example; AA: standard "
                "AutoAttack, else the variant named; linf/l2/l1/worst: union over that norm's attacks).", "",
                "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cell_of(r, c) for c in COLUMNS) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def html_page(groups: dict[tuple, list[dict]]) -> str:
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>fastcollab report</title>",
             "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
             ".fail{background:#fdd}</style>", "<h1>fastcollab report</h1>"]
    diff = differences(groups)
    if diff:
        parts.append("<p>" + esc(diff[0]) + "</p><ul>" + "".join(f"<li>{esc(d[2:])}</li>" for d in diff[1:]) + "</ul>")
    for key, rows in groups.items():
        parts.append(f"<h2>{esc(describe_key(key))}</h2><table><tr>"
                     + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>")
        for r in rows:
            bad = " class='fail'" if not r["checks"].startswith(("pass", "warn", "not")) else ""
            parts.append(f"<tr{bad}>" + "".join(f"<td>{esc(_cell_of(r, c))}</td>" for c in COLUMNS) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def scatter(groups: dict[tuple, list[dict]], path: Path) -> None:
    """Clean vs robust accuracy (AA where measured, else PGD-20), one marker per row, one colour per table."""
    from .plots import plt, save_png

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, (key, rows) in enumerate(groups.items()):
        for r in rows:
            robust = r["AA"] if r["AA"] is not None else r["PGD-20"]
            if r["clean"] is None or robust is None:
                continue
            ax.scatter(r["clean"], robust, color=f"C{i}", marker="o" if r["AA"] is not None else "^")
            ax.annotate(f"{r['run']}:{r['peer']}", (r["clean"], robust), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.scatter([], [], color=f"C{i}", label=describe_key(key))
    ax.set(xlabel="clean accuracy (%)", ylabel="robust accuracy (%) — ● AA (any variant), ▲ PGD-20",
           title="clean vs robust accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    save_png(fig, path)


def write_report(runs: list[str | Path], out: str | Path) -> dict[str, Path]:
    rows = [r for run in runs for r in rows_of(Path(run))]
    if not rows:
        raise FastcollabError("no evaluated peers found in the given runs: pass run directories with final.json")
    groups = group_rows(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "report.md", "html": out / "report.html", "scatter": out / "scatter.png"}
    written["markdown"].write_text(markdown(groups) + "\n")
    written["html"].write_text(html_page(groups))
    scatter(groups, written["scatter"])
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcollab.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (python -m fastcollab.train --out)")
    p.add_argument("--out", default="report", help="folder for report.md, report.html, scatter.png")
    args = p.parse_args(argv)
    try:
        written = write_report(args.runs, args.out)
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(written["markdown"]).read_text().rstrip())
    print("written: " + ", ".join(str(v) for v in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
