"""A catalogue of bad inputs: each ends in ONE clear message (exit status 2), never a traceback."""
from __future__ import annotations

import numpy as np
import pytest

from fastcollab.evaluate import main as evaluate_main
from fastcollab.train import main as train_main


def run_train(capsys, *args):
    rc = train_main(["--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def base(small_npz, tmp_path):
    return ["--model", "smallcnn", "--dataset", f"npz:{small_npz}", "--epochs", "1", "--batch-size", "64",
            "--attack-steps", "1", "--eval-subset", "8", "--final-eval-size", "8", "--out", str(tmp_path / "run")]


CASES = [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "at", "--model", "resnet9000"], "unknown model"),
    (["--method", "at", "--eps", "-0.1"], "--eps must be >= 0"),
    (["--method", "at", "--step-size", "0"], "--step-size must be > 0"),
    (["--method", "at", "--eps", "eight"], "fraction like 8/255"),
    (["--method", "at", "--attack-steps", "0"], "--attack-steps must be"),
    (["--method", "at", "--epochs", "0"], "--epochs must be"),
    (["--method", "at", "--lr", "-1"], "--lr must be > 0"),
    (["--method", "at", "--peers", "3"], "method at does not take --peers"),
    (["--method", "mat", "--peers", "1"], "mat needs at least 2 peers"),
    (["--method", "mat", "--peer-methods", "at,alp"], "method mat does not take --peer-methods"),
    (["--method", "cat", "--peer-methods", "at,sgd"], "cat cannot use base method(s) sgd"),
    (["--method", "cat", "--peer-methods", "trades"], "cat needs at least 2 peers"),
    (["--method", "at", "--amp", "--amp-dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--method", "at", "--model", "smallcnn,smallcnn"], "2 architectures for 1 trainable peers"),
    (["--method", "at", "--batch-size", "100000"], "larger than the training set"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[c[1] for c in CASES])
def test_bad_train_input(args, message, base, capsys):
    rc, err = run_train(capsys, *base, *args)
    assert rc == 2
    assert message in err, err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_missing_and_corrupt_datasets(tmp_path, capsys):
    rc, err = run_train(capsys, "--method", "at", "--dataset", f"npz:{tmp_path / 'absent.npz'}")
    assert rc == 2 and "absent.npz" in err and len(err.splitlines()) == 1
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"this is not a zip file")
    rc, err = run_train(capsys, "--method", "at", "--dataset", f"npz:{broken}")
    assert rc == 2 and "broken.npz" in err and len(err.splitlines()) == 1
    wrong_keys = tmp_path / "keys.npz"
    np.savez(wrong_keys, images=np.zeros((4, 3, 32, 32), np.uint8))
    rc, err = run_train(capsys, "--method", "at", "--dataset", f"npz:{wrong_keys}")
    assert rc == 2 and "x_train" in err
    rc, err = run_train(capsys, "--method", "at", "--dataset", "imagenet-22k")
    assert rc == 2 and "imagenet-22k" in err


def test_resume_and_run_directory_errors(base, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_train(capsys, "--resume", "--out", str(tmp_path / "nothing"))
    assert rc == 2 and "holds no run" in err
    assert train_main(["--no-progress", "--method", "at", *base]) == 0
    capsys.readouterr()
    rc, err = run_train(capsys, "--method", "at", *base)
    assert rc == 2 and "already holds a run" in err and "--resume" in err
    rc, err = run_train(capsys, "--resume", "--out", str(out), "--method", "trades")
    assert rc == 2 and "was started with method='at'" in err
    # a corrupt checkpoint: one clear message, for resume and for evaluation
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    rc, err = run_train(capsys, "--resume", "--re-evaluate", "--out", str(out))
    assert rc == 2 and "corrupt" in err and len(err.splitlines()) == 1
    assert evaluate_main(["--run", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_evaluate_errors(nat_run, tmp_path, capsys):
    assert evaluate_main(["--run", str(tmp_path)]) == 2
    assert "not a fastcollab run directory" in capsys.readouterr().err
    assert evaluate_main(["--run", str(nat_run), "--attacks", "pgd20,deepfool"]) == 2
    assert "unknown evaluation attack 'deepfool'" in capsys.readouterr().err
