"""Runs that cannot lie or lose data (issue 8): divergence stops a run with ``"status": "diverged"``, every
setting is checked before the first step, run folders are protected (new/empty/--resume/--overwrite, a lock,
no leftover temporaries, normal file permissions, absolute paths), YAML is read like the command line, flags
that do not apply are errors, ``--help`` shows the method's paper defaults, and Ctrl-C / a full disk end in
one line. Tiny synthetic runs: seconds each."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastcollab.train as train_mod
from fastcollab import load_cohort
from fastcollab.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fastcollab.config import resolve_config
from fastcollab.errors import FastcollabError
from fastcollab.evaluate import main as evaluate_main
from fastcollab.rundir import LOCK
from fastcollab.train import build_parser, parse_command_line
from fastcollab.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "smallcnn", "--dataset", "synthetic:64", "--epochs", "1", "--batch-size", "32",
        "--attack-steps", "1", "--eval-subset", "8", "--final-eval-size", "8", "--final-attacks", "clean,pgd2"]


def train(capsys, *args):
    rc = train_main(["--no-progress", *args])
    captured = capsys.readouterr()
    return rc, captured.err.strip(), captured.out


def assert_one_line(err: str):
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err


def final_json(out: Path) -> dict:
    return json.loads((out / "final.json").read_text())


# ---------------------------------------------------------------------------------------------- divergence
def test_nan_run_exits_non_zero_with_status_diverged(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err, _ = train(capsys, *TINY, "--method", "trades", "--lr", "1e30", "--out", str(out))
    assert rc == train_mod.EXIT_DIVERGED != 0
    assert_one_line(err)
    assert "diverged at epoch 1" in err and "lower --lr" in err and "no checkpoint was written" in err
    final = final_json(out)
    assert final["status"] == "diverged" and final["epoch"] == 1 and "loss" in final["terms"]
    assert "peers" not in final  # no accuracy is reported for a diverged model
    assert not (out / CHECKPOINT_NAME).exists() and not (out / LOCK).exists()


def test_divergence_keeps_the_last_good_checkpoint_and_syncs_once_per_epoch(tmp_path, capsys, monkeypatch):
    """Epoch 1 is healthy; from epoch 2 every loss counts as exploded (the limit is lowered to 0 after the
    first save). The run stops at epoch 2 step 1, the epoch-1 checkpoint stays, the diverged weights are not
    saved; without a progress bar the flags are read once per epoch, never per step."""
    save, reads = train_mod.Trainer.save, []

    def save_then_lower_the_limit(self, epoch):
        save(self, epoch)
        monkeypatch.setattr(train_mod, "LOSS_LIMIT", 0.0)

    def counted(self, _orig=train_mod.DivergenceWatch.first_bad):
        reads.append(1)
        return _orig(self)

    monkeypatch.setattr(train_mod.Trainer, "save", save_then_lower_the_limit)
    monkeypatch.setattr(train_mod.DivergenceWatch, "first_bad", counted)
    out = tmp_path / "run"
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--epochs", "2", "--out", str(out))
    assert rc == train_mod.EXIT_DIVERGED
    assert_one_line(err)
    assert "epoch 2, step 1/2" in err and "last good checkpoint" in err and "epoch 1" in err
    assert load_checkpoint(out / CHECKPOINT_NAME)["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert final_json(out)["status"] == "diverged"
    assert len(reads) == 2  # one read at the end of each epoch


# ------------------------------------------------------------------------------------- a healthy run
def test_successful_run_files_resume_and_re_evaluate(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x_train=rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
             y_train=np.arange(64) % 10, x_test=rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8),
             y_test=np.arange(16) % 10)
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        rc, err, stdout = train(capsys, *TINY, "--dataset", "npz:tiny.npz", "--method", "at", "--out", "run")
    finally:
        os.umask(old_umask)
    out = tmp_path / "run"
    assert rc == 0, err
    assert final_json(out)["status"] == "ok"
    banner = stdout.splitlines()[0]
    assert banner.startswith("fastcollab: at · peers p0") and " · ops " in banner
    assert "requested" not in stdout  # the per-op backend detail only with --verbose
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f  # like any new file, not mkstemp's 0600
    assert not (out / LOCK).exists()
    config = (out / "config.yaml").read_text()
    assert f"dataset: npz:{tmp_path / 'tiny.npz'}" in config  # absolute: evaluate works from any folder

    before = (out / "final.json").stat().st_mtime_ns
    rc, err, stdout = train(capsys, "--resume", "--out", "run")
    assert rc == 0 and "finished run" in stdout and "--re-evaluate" in stdout
    assert (out / "final.json").stat().st_mtime_ns == before  # did nothing

    rc, err, _ = train(capsys, "--re-evaluate", "--out", "run")
    assert rc == 2 and "add --resume" in err
    # a finished run may be evaluated again, with corrected final attacks
    rc, err, stdout = train(capsys, "--resume", "--re-evaluate", "--verbose", "--out", "run",
                            "--final-attacks", "clean")
    assert rc == 0, err
    assert "resuming" in stdout and "after epoch 1/1" in stdout and "requested" in stdout
    assert list(final_json(out)["attacks"]) == ["clean"]


# ----------------------------------------------------------------------- everything checked up front
EARLY = [
    (["--method", "at", "--eps", "8"], "--eps 8 is implausible"),
    (["--method", "at", "--step-size", "2"], "--step-size 2 is implausible"),
    (["--method", "at", "--final-attacks", "clean,pgd-20"], "--final-attacks: unknown evaluation attack 'pgd-20'"),
    (["--method", "at", "--eval-batch-size", "0"], "--eval-batch-size must be a whole number >= 1"),
    (["--method", "at", "--final-eval-size", "-1"], "--final-eval-size must be a whole number >= 1"),
    (["--method", "at", "--final-eval-size", "0"], "--final-eval-size must be a whole number >= 1"),
    (["--method", "at", "--eval-subset", "0"], "--eval-subset must be a whole number >= 1"),
    (["--method", "nat", "--attack-steps", "7"], "--attack-steps does not apply: method nat trains without"),
    (["--method", "nat", "--attack-bn", "train"], "--attack-steps, --attack-bn do not apply"),
    (["--method", "at", "--amp-dtype", "fp16"], "--amp-dtype does not apply: mixed precision is off"),
    (["--method", "at", "--schedule", "cosine", "--lr-drops", "1"], "--lr-drops does not apply"),
    (["--method", "at", "--data-dir", "somewhere"], "--data-dir does not apply"),
    (["--method", "at", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--method", "at", "--lr-drop", "3"], "did you mean --lr-drops?"),
    (["--method", "at", "--device", "gpu"], "--device must be auto, cpu or cuda[:N]"),
    (["--method", "at", "--re-evaluate"], "add --resume"),
]


@pytest.mark.parametrize("args,message", EARLY, ids=[m for _, m in EARLY])
def test_bad_setting_fails_before_anything_is_written(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err, _ = train(capsys, *TINY, *args, "--out", str(out))
    assert rc == 2
    assert_one_line(err)
    assert message in err, err
    assert not out.exists()  # refused before the run folder was made


def test_large_budgets_need_an_explicit_opt_in():
    assert resolve_config({"method": "at", "eps": 8.0, "step": 2.0, "allow_large_eps": True})["eps"] == 8.0
    with pytest.raises(FastcollabError, match="implausible for an l2 budget.*--allow-large-eps"):
        resolve_config({"method": "mat-mp", "specialist_eps": [0.03, 127.0, 12.0]})
    assert resolve_config({"method": "mat-mp"})["specialist_eps"]  # the paper's budgets pass


def test_evaluate_checks_its_arguments_before_loading_the_run(tmp_path, capsys):
    missing = str(tmp_path / "no-run")
    for args, message in [(["--n", "-5"], "--n must be a whole number >= 1"),
                          (["--n", "0"], "--n must be a whole number >= 1"),
                          (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
                          (["--eps", "8"], "did you mean 8/255"),
                          (["--json", str(tmp_path / "absent" / "e.json")], "does not exist"),
                          (["--bogus"], "unrecognized arguments: --bogus")]:
        assert evaluate_main(["--run", missing, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert_one_line(err)
        assert message in err, err


def test_load_cohort_device_is_checked():
    for device in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(FastcollabError, match="is not a device: use auto, cpu or cuda"):
            load_cohort("anywhere", device=device)


# ------------------------------------------------------------------------------------------- YAML
def resolved_from_yaml(tmp_path, text: str, *flags: str) -> dict:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    given = parse_command_line(["--config", str(f), *flags])
    return resolve_config(given, given.pop("file_values"), str(f))


def test_yaml_values_go_through_the_command_line_parser(tmp_path):
    c = resolved_from_yaml(tmp_path, "method: cat\nmodel: smallcnn\nlr: 1e-2\neps: 8/255\nlr_drops: 2,3\n"
                                     "peer_methods: trades,alp\nepochs: 4\nnormalize: true\n")
    assert c["lr"] == 0.01 and c["eps"] == pytest.approx(8 / 255) and c["lr_drops"] == [2.0, 3.0]
    assert c["peer_methods"] == ["trades", "alp"] and c["normalize"] is True
    # YAML's own numbers and lists, and the flag spelling of a key, work too
    c = resolved_from_yaml(tmp_path, "method: cat\nlr: 0.05\nlr-drops: [2, 3]\npeer_methods: [at, alp]\n"
                                     "step-size: 1/255\nepochs: 4\n")
    assert c["lr"] == 0.05 and c["lr_drops"] == [2.0, 3.0] and c["peer_methods"] == ["at", "alp"]
    assert c["step"] == pytest.approx(1 / 255)
    assert resolved_from_yaml(tmp_path, "method: at\nlr: 0.5\n", "--lr", "0.2")["lr"] == 0.2  # flag wins


@pytest.mark.parametrize("text,message", [
    ("method: at\nlr: abc\n", "key lr: argument --lr: invalid float value: 'abc'"),
    ("method: at\nlr_drop: [2]\n", "unknown key 'lr_drop' (did you mean lr_drops?)"),
    ("method: at\neps: 8\n", "key eps: --eps 8 is implausible"),
    ("method: at\namp: 3\n", "key amp: expected true or false"),
    ("method: nat\nattack_steps: 3\n", "key attack_steps: --attack-steps does not apply"),
    ("method: at\npeers: 3\n", "key peers: method at does not take --peers (mat uses it)"),
    ("method: at\nfinal_attacks: clean,pgd-20\n", "key final_attacks: --final-attacks: unknown"),
])
def test_yaml_errors_name_the_file_and_key(text, message, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    rc, err, _ = train(capsys, "--config", str(f), "--out", str(tmp_path / "run"))
    assert rc == 2
    assert_one_line(err)
    assert f"config file {f}" in err and message in err, err


# ------------------------------------------------------------------------------------- run folders
def test_out_folder_must_be_new_empty_or_the_same_run(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(a_file))
    assert rc == 2 and "is a file, not a folder" in err
    assert_one_line(err)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(mine))
    assert rc == 2 and "is not empty (1 entries: notes.txt)" in err and "--overwrite" in err
    assert_one_line(err)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(mine), "--overwrite")
    assert rc == 0, err
    assert (mine / "notes.txt").read_text() == "precious" and final_json(mine)["status"] == "ok"
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(mine))
    assert rc == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(LOCK):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(tmp_path / "ro"))
    assert rc == 2 and "Read-only file system" in err and "writable" in err
    assert_one_line(err)


def test_disk_full_at_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def full_for_checkpoints(fd):
        if f".{CHECKPOINT_NAME}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_checkpoints)
    out = tmp_path / "run"
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(out))
    assert rc == 2
    assert_one_line(err)
    assert f"cannot write {out / CHECKPOINT_NAME} (No space left on device)" in err
    assert not list(out.glob(".*.tmp")) and not (out / CHECKPOINT_NAME).exists()


def python(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, **kw)


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path, capsys):
    out = tmp_path / "run"
    holder = python("-c", "import sys, time; from fastcollab.rundir import RunLock; RunLock(sys.argv[1]).acquire();"
                          " print('locked', flush=True); time.sleep(120)", str(out), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(out))
        assert rc == 2 and f"in use by a live run (pid {holder.pid})" in err
        assert_one_line(err)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).exists()  # killed: its lock is stale now
    (out / f".{CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"half a checkpoint")  # a write killed mid-way
    rc, err, _ = train(capsys, *TINY, "--method", "at", "--out", str(out))
    assert rc == 0, err
    assert not (out / LOCK).exists() and not list(out.glob(".*.tmp"))


def test_ctrl_c_ends_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = python("-m", "fastcollab.train", "--no-progress", *TINY, "--method", "at", "--dataset", "synthetic:512",
                  "--epochs", "100", "--out", str(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read().decode().strip()
    assert rc == 130
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("interrupted: the last checkpoint is") and str(out / CHECKPOINT_NAME) in err
    assert err.endswith(f"continue with: python -m fastcollab.train --resume --out {out}")
    assert not (out / LOCK).exists()


# ----------------------------------------------------------------------------------------- console
def test_help_shows_the_methods_resolved_paper_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["--method", "mat", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "paper defaults of --method mat for --model resnet18" in text
    for shown in ("lr=0.01", "weight-decay=0.0035", "epochs=120", "lr-drops=75,90,100", "eps=8/255",
                  "step-size=0.007", "attack-steps=10", "alpha=0.6"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        train_main(["--method", "mat", "--model", "wrn-34-10", "--help"])
    assert "lr=0.1," in capsys.readouterr().out
    undocumented = [a.option_strings for a in build_parser()._actions if not a.help]
    assert not undocumented


def test_final_attacks_that_do_not_fit_the_dataset_fail_before_training(tmp_path, capsys):
    """aa-fast (targeted DLR) on a 3-class dataset: refused at start-up, not after the whole run."""
    import numpy as np

    from fastcollab import train

    rng = np.random.default_rng(0)
    npz = tmp_path / "three.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (48, 3, 8, 8), dtype=np.uint8), y_train=np.arange(48) % 3,
             x_test=rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 3)
    out = tmp_path / "run"
    code = train.main(["--method", "nat", "--model", "smallcnn", "--dataset", f"npz:{npz}", "--epochs", "1",
                       "--final-attacks", "clean,aa-fast", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "at least 4 classes" in err and err.count("\n") == 1
    assert not (out / "checkpoint.pt").exists()
