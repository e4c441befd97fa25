"""Datasets (npz, CIFAR python batches, download, synthetic) and the on-device loader."""

import hashlib
import io
import os
import pickle
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastcollab.data as data
from fastcollab.data import Dataset, DeviceLoader, load_dataset, make_synthetic
from fastcollab.errors import FastcollabError



def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ------------------------------------------------------------------------------------------------ npz

def _arrays(n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 3, 8, 8), dtype=np.uint8),
        "y_train": rng.integers(0, 4, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, 3, 8, 8), dtype=np.uint8),
        "y_test": rng.integers(0, 4, n_test).astype(np.int64),
    }


def _save(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_nchw_and_nhwc_load_identically(tmp_path):
    a = _arrays()
    a["y_train"][:7] = np.arange(7)[::-1]  # num_classes = max label + 1 over both splits (no gap: check_labels)
    nchw = load_dataset(f"npz:{_save(tmp_path, 'a.npz', **a)}")
    b = dict(a, x_train=a["x_train"].transpose(0, 2, 3, 1), x_test=a["x_test"].transpose(0, 2, 3, 1))
    nhwc = load_dataset(f"npz:{_save(tmp_path, 'b.npz', **b)}")
    assert isinstance(nchw, Dataset)
    for ds in (nchw, nhwc):
        assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (12, 3, 8, 8)
        assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
        assert ds.num_classes == 7
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(nchw, key), getattr(nhwc, key))
    assert nchw.mean == nhwc.mean and nchw.std == nhwc.std
    x = torch.from_numpy(a["x_train"]).double() / 255
    assert np.allclose(nchw.mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(nchw.std, x.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-5)


def test_npz_grayscale_repeated_and_float_converted(tmp_path):
    a = _arrays()
    gray = dict(a, x_train=a["x_train"][:, :1], x_test=a["x_test"][:, :1])
    ds = load_dataset(f"npz:{_save(tmp_path, 'g.npz', **gray)}")
    assert ds.x_train.shape == (12, 3, 8, 8)
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])
    floats = dict(a, x_train=a["x_train"] / 255.0, x_test=a["x_test"].astype(np.float32) / 255)
    dsf = load_dataset(f"npz:{_save(tmp_path, 'f.npz', **floats)}")
    assert torch.equal(dsf.x_train, torch.from_numpy(a["x_train"]))
    # uint8 labels (as in cifar10_mini.npz) and binary tasks: at least 2 classes
    small = dict(a, y_train=np.zeros(12, np.uint8), y_test=np.zeros(5, np.uint8))
    assert load_dataset(f"npz:{_save(tmp_path, 's.npz', **small)}").num_classes == 2


def _case(name):
    a = _arrays()
    if name == "missing_keys":
        del a["y_test"], a["x_test"]
    elif name == "ndim":
        a["x_train"] = a["x_train"][:, 0, 0]
    elif name == "dtype":
        a["x_train"] = a["x_train"].astype(np.int32)
    elif name == "float_range":
        a["x_train"] = a["x_train"].astype(np.float32)
    elif name == "channels":
        a["x_train"] = np.zeros((12, 5, 8, 7), np.uint8)
    elif name == "length":
        a["y_train"] = a["y_train"][:-1]
    elif name == "negative":
        a["y_test"][2] = -1
    elif name == "float_labels":
        a["y_train"] = a["y_train"].astype(np.float32)
    elif name == "label_shape":
        a["y_train"] = np.eye(4, dtype=np.int64)[a["y_train"]]
    elif name == "sizes":
        a["x_test"] = np.zeros((5, 3, 9, 9), np.uint8)
    return a


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing_keys", ["lacks", "x_test", "y_test"]),
        ("ndim", ["x_train", "dimensions", "4-D"]),
        ("dtype", ["x_train", "int32", "uint8"]),
        ("float_range", ["x_train", "outside [0, 1]"]),
        ("channels", ["x_train", "channels"]),
        ("length", ["x_train has 12 images", "y_train has 11 labels"]),
        ("negative", ["y_test", "negative"]),
        ("float_labels", ["y_train", "non-integer"]),
        ("label_shape", ["y_train", "1-D"]),
        ("sizes", ["x_test", "same image size"]),
    ],
)
def test_npz_errors_name_the_problem(tmp_path, case, words):
    path = _save(tmp_path, **_case(case))
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{path}")
    msg = one_line(e)
    for w in words:
        assert w in msg, (w, msg)


def test_npz_missing_file_not_npz_and_corrupt(tmp_path):
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    assert "does not exist" in one_line(e) and "nope.npz" in str(e.value)

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{junk}")
    assert "not a readable .npz" in one_line(e)

    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{single}")
    assert "single array" in one_line(e)

    good = _save(tmp_path, "good.npz", **_arrays(n_train=200))
    blob = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(blob[: len(blob) // 2])  # truncated: central directory gone
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{cut}")
    one_line(e)

    flipped = bytearray(blob)  # intact zip index, damaged member data
    flipped[200:260] = b"\xff" * 60
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{bad}")
    one_line(e)


def test_real_cifar10_mini(mini_npz):
    ds = load_dataset(f"npz:{mini_npz}")
    assert ds.x_train.shape == (2500, 3, 32, 32) and ds.x_test.shape == (846, 3, 32, 32)
    assert ds.num_classes == 10 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).min() > 150
    # close to the well-known CIFAR-10 training statistics
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=0.03)
    assert np.allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=0.03)


# ------------------------------------------------------------------------------------------------ CIFAR

def _batch(n, classes, label_key, seed):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        label_key: rng.integers(0, classes, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _write_cifar10(folder: Path, n=4):
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _batch(n, 10, b"labels", i)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return batches


def test_cifar10_reads_official_pickle_layout(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    assert torch.equal(ds.x_train[0, 0].flatten(), torch.from_numpy(first[:1024]))  # R plane first
    assert torch.equal(ds.x_train[0, 2].flatten(), torch.from_numpy(first[2048:]))
    assert ds.y_train[4:8].tolist() == batches["data_batch_2"][b"labels"]
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]


def test_cifar100_fine_labels_and_env_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    tr, te = _batch(6, 100, b"fine_labels", 0), _batch(3, 100, b"fine_labels", 1)
    tr[b"coarse_labels"] = [0] * 6
    (folder / "train").write_bytes(pickle.dumps(tr))
    (folder / "test").write_bytes(pickle.dumps(te))
    monkeypatch.setenv("FASTCOLLAB_DATA", str(tmp_path))
    ds = load_dataset("cifar100", download=False)
    assert ds.num_classes == 100 and ds.y_train.tolist() == tr[b"fine_labels"]


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batch_cannot_execute_code(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Boom()}))
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = one_line(e)
    assert "test_batch" in msg and "refusing" in msg


def test_cifar_absent_without_download(tmp_path):
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    msg = one_line(e)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "test_batch" in msg


def test_cifar_incomplete_directory(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "incomplete" in one_line(e) and "data_batch_3" in str(e.value)


def _tar_gz(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _fake_archive(tmp_path) -> bytes:
    src = tmp_path / "src"
    _write_cifar10(src / "cifar-10-batches-py")
    files = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted((src / "cifar-10-batches-py").iterdir())}
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"a"] * 10})
    return _tar_gz(files)


def _serve(monkeypatch, blob, md5=None):
    calls = []

    def opener(url, timeout=None):
        calls.append(url)
        return io.BytesIO(blob)

    monkeypatch.setattr(data, "_urlopen", opener)
    if md5 is not None:
        monkeypatch.setitem(data._CIFAR["cifar10"], "md5", md5)
    return calls


def _leftovers(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_download_verifies_md5_and_extracts(tmp_path, monkeypatch):
    blob = _fake_archive(tmp_path)
    root = tmp_path / "data"
    calls = _serve(monkeypatch, blob, hashlib.md5(blob).hexdigest())
    ds = load_dataset("cifar10", data_dir=root)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.num_classes == 10
    assert (root / "cifar-10-batches-py" / "batches.meta").is_file()
    assert _leftovers(root) == []
    # a second load reads the extracted files without downloading
    load_dataset("cifar10", data_dir=root)
    assert len(calls) == 1


def test_official_checksums():
    assert data._CIFAR["cifar10"]["md5"] == "c58f30108f718f92721af3b95e74349a"
    assert data._CIFAR["cifar100"]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"


def test_download_bad_md5_is_one_line_error(tmp_path, monkeypatch):
    _serve(monkeypatch, _fake_archive(tmp_path))  # the real md5 stays expected: mismatch
    root = tmp_path / "data"
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar10", data_dir=root)
    msg = one_line(e)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "failed its md5 check" in msg and str(root) in msg and "data_batch_1" in msg and "test_batch" in msg
    assert not (root / "cifar-10-batches-py").exists() and _leftovers(root) == []


def test_download_network_failure_is_one_line_error(tmp_path, monkeypatch):
    def opener(url, timeout=None):
        raise urllib.error.URLError("Name or service not known\n(second line)")

    monkeypatch.setattr(data, "_urlopen", opener)
    root = tmp_path / "data"
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar100", data_dir=root)
    msg = one_line(e)
    assert "could not download" in msg and "Name or service not known" in msg
    assert str(root / "cifar-100-python") in msg and "train, test" in msg
    assert _leftovers(root) == []


@pytest.mark.parametrize("evil", ["../escaped", "/tmp/abs_escape", "link"])
def test_download_refuses_unsafe_archive(tmp_path, monkeypatch, evil):
    files = {"cifar-10-batches-py/data_batch_1": b"x", evil: None if evil == "link" else b"owned"}
    blob = _tar_gz(files)
    _serve(monkeypatch, blob, hashlib.md5(blob).hexdigest())
    root = tmp_path / "data"
    with pytest.raises(FastcollabError) as e:
        load_dataset("cifar10", data_dir=root)
    msg = one_line(e)
    assert "could not extract" in msg and ("escapes the target" in msg or "link or special file" in msg)
    assert not (tmp_path / "escaped").exists() and not (root / "cifar-10-batches-py").exists()
    assert _leftovers(root) == []


def test_unknown_spec():
    for spec in ["imagenet", "cifar10:x", "", "npz:", "synthetic:abc", "synthetic:3"]:
        with pytest.raises(FastcollabError):
            load_dataset(spec)


# ------------------------------------------------------------------------------------------------ synthetic

def test_synthetic_deterministic_and_shaped():
    t = time.process_time()  # CPU time (all threads): immune to other jobs on the machine
    a = make_synthetic(5000, 1000, seed=0)
    cpu = time.process_time() - t
    assert cpu < 4.0, cpu  # ~0.7 s wall / ~1.2 s CPU on 2 cores; the budget is < 2 s wall
    b = load_dataset("synthetic")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (5000, 3, 32, 32) and a.x_test.shape == (1000, 3, 32, 32)
    assert a.x_train.dtype == torch.uint8 and a.num_classes == 10
    assert torch.bincount(a.y_train).tolist() == [500] * 10
    c = make_synthetic(200, 1000, seed=1)
    assert not torch.equal(c.x_train, a.x_train[:200])
    d = load_dataset("synthetic:300")
    assert d.x_train.shape[0] == 300 and d.name == "synthetic:300"
    assert torch.equal(d.x_test, a.x_test)  # the test split does not depend on N


@pytest.fixture
def one_thread():
    """Tiny ops: one intra-op thread is faster and immune to a loaded machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_synthetic_is_learnable_but_not_trivial(one_thread):
    torch.manual_seed(0)
    ds = make_synthetic(3000, 1000, seed=0)

    def feats(x):
        return F.avg_pool2d(x.float() / 255, 4).flatten(1)

    xtr, xte = feats(ds.x_train), feats(ds.x_test)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(300):
        loss = F.cross_entropy(lin(xtr), ds.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (lin(xte).argmax(1) == ds.y_test).float().mean().item()
    assert 0.4 < acc < 0.9, acc


# ------------------------------------------------------------------------------------------------ loader

def _images(n=16, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, h, w), generator=g, dtype=torch.uint8), torch.arange(n)


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_loader_shapes_and_len():
    x, y = _images(20)
    tr = DeviceLoader(x, y, 8, "cpu", train=True, seed=0)
    ev = DeviceLoader(x, y, 8, "cpu", train=False, seed=0)
    assert len(tr) == 2 and len(ev) == 3
    assert len(DeviceLoader(x, y, 8, "cpu", train=True, seed=0, drop_last=False)) == 3
    for xb, yb in tr:
        assert xb.shape == (8, 3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert 0 <= xb.min() and xb.max() <= 1
    assert [b[0].shape[0] for b in ev] == [8, 8, 4]
    xb, _ = next(iter(DeviceLoader(x, y, 8, "cpu", train=True, seed=0, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)


def _candidates(img: torch.Tensor, pad: int):
    padded = F.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[1:]
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, oy : oy + h, ox : ox + w]
            yield (oy, ox, False), crop
            yield (oy, ox, True), crop.flip(-1)


def test_loader_crop_and_flip_are_real():
    x, y = _images(16)
    loader = DeviceLoader(x, y, 16, "cpu", train=True, seed=3)
    seen_offsets, flips, zero_border = set(), set(), 0
    for epoch in range(3):
        xb, yb = _epoch(loader, epoch)
        for img, label in zip(xb, yb):
            src = x[label].float() / 255
            match = [key for key, cand in _candidates(src, 4) if torch.equal(cand, img)]
            assert match, "every output must be a 4-pixel-padded crop of its source, maybe flipped"
            oy, ox, flip = match[0]
            seen_offsets.add((oy, ox))
            flips.add(flip)
            zero_border += int((img == 0).any())
    assert flips == {True, False}
    assert len(seen_offsets) > 10 and zero_border > 0  # padded (zero) borders do show up


def test_loader_flip_only_when_no_padding():
    x, y = _images(32)
    xb, yb = _epoch(DeviceLoader(x, y, 32, "cpu", train=True, seed=0, padding=0), 0)
    src = x[yb].float() / 255
    same = [torch.equal(a, b) for a, b in zip(xb, src)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(xb, src)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    xb, yb = _epoch(DeviceLoader(x, y, 32, "cpu", train=True, seed=0, augment=False), 0)
    assert torch.equal(xb, x[yb].float() / 255) and not torch.equal(yb, y)  # shuffled, not augmented


def test_loader_reproducible_per_seed_and_epoch():
    x, y = _images(64)
    a = DeviceLoader(x, y, 16, "cpu", train=True, seed=7)
    b = DeviceLoader(x, y, 16, "cpu", train=True, seed=7)
    xa, ya = _epoch(a, 5)
    xb, yb = _epoch(b, 5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x6, y6 = _epoch(a, 6)
    assert not torch.equal(y6, ya)
    _, yc = _epoch(DeviceLoader(x, y, 16, "cpu", train=True, seed=8), 5)
    assert not torch.equal(yc, ya)
    # Iterating advances the epoch; a resumed loader (set_epoch) reproduces an uninterrupted run.
    run = DeviceLoader(x, y, 16, "cpu", train=True, seed=1)
    uninterrupted = [_epoch(run) for _ in range(3)]
    resumed = DeviceLoader(x, y, 16, "cpu", train=True, seed=1)
    resumed.set_epoch(2)
    xr, yr = _epoch(resumed)
    assert torch.equal(xr, uninterrupted[2][0]) and torch.equal(yr, uninterrupted[2][1])
    assert not torch.equal(uninterrupted[0][1], uninterrupted[1][1])


def test_loader_each_example_at_most_once_per_epoch():
    x, y = _images(50)
    loader = DeviceLoader(x, y, 16, "cpu", train=True, seed=0)
    for epoch in range(3):
        _, ys = _epoch(loader, epoch)
        assert ys.numel() == 48 and ys.unique().numel() == 48


def test_eval_loader_in_order_unaugmented():
    x, y = _images(21)
    xs, ys = _epoch(DeviceLoader(x, y, 8, "cpu", train=False, seed=0))
    assert torch.equal(ys, y) and torch.equal(xs, x.float() / 255)


def test_loader_bad_input():
    x, y = _images(8)
    with pytest.raises(FastcollabError, match="batch_size 16 exceeds"):
        DeviceLoader(x, y, 16, "cpu", train=True, seed=0)
    with pytest.raises(FastcollabError, match="uint8"):
        DeviceLoader(x.float(), y, 4, "cpu", train=True, seed=0)
    with pytest.raises(FastcollabError, match="one label per image"):
        DeviceLoader(x, y[:5], 4, "cpu", train=True, seed=0)
    with pytest.raises(FastcollabError, match="batch_size"):
        DeviceLoader(x, y, 0, "cpu", train=False, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda():
    x, y = _images(64, 32, 32)
    loader = DeviceLoader(x, y, 16, "cuda", train=True, seed=0)
    assert loader.x.is_cuda
    xa, ya = _epoch(loader, 1)
    xb, yb = _epoch(DeviceLoader(x, y, 16, "cuda", train=True, seed=0), 1)
    assert xa.is_cuda and ya.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert ya.unique().numel() == 64
