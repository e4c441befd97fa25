"""Datasets and the on-device loader.

    load_dataset(spec, data_dir=None, download=True) -> Dataset
    make_synthetic(n_train=5000, n_test=1000, seed=0) -> Dataset
    DeviceLoader(x_uint8, y, batch_size, device="cpu", train=True, seed=0, augment=True, drop_last=None,
                 channels_last=False, padding=4)

Specs: ``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet``, ``synthetic`` / ``synthetic:N`` and ``npz:PATH``.
The folder datasets (``FOLDER_DATASETS``) read their official files from ``--data-dir`` (default
``default_data_dir()``) and download them where the official source allows, verified by md5. Labels are
checked to be 0..C-1 for the dataset's class count C (for npz, C is inferred and a gap is an error), before
any image is converted. Every dataset holds uint8 NCHW images and int64 labels as CPU tensors; ``mean`` / ``std`` are per-channel statistics of ``x_train`` on
the [0, 1] scale (for ``create_model(..., normalize=(ds.mean, ds.std))``).

The loader keeps the whole uint8 set on the device and does shuffling, random crop (zero padding) and
horizontal flip there, vectorised over the batch; its randomness depends only on ``(seed, epoch)``, so a
resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastcollab.distributed import shard_bounds
from fastcollab.errors import FastcollabError

__all__ = ["Dataset", "DeviceLoader", "load_dataset", "make_synthetic", "default_data_dir", "check_labels",
           "FOLDER_DATASETS"]


@dataclass
class Dataset:
    """An image classification set held in memory (CPU tensors).

    x_train / x_test: uint8 ``[N, 3, H, W]`` (NCHW, values 0-255); y_train / y_test: int64 ``[N]``;
    mean / std: per-channel statistics of x_train on the [0, 1] scale.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def channel_stats(x: torch.Tensor, chunk: int = 2048) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 NCHW images on the [0, 1] scale (float64, chunked)."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(torch.float64)
        s += xb.sum(dim=(0, 2, 3))
        s2 += xb.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    var = (s2 / n - mean.square()).clamp_min(0)
    std = var.sqrt().clamp_min(1e-6 * 255)  # a constant channel would give std 0: keep normalisation finite
    return tuple(round(v / 255.0, 6) for v in mean.tolist()), tuple(round(v / 255.0, 6) for v in std.tolist())


def _make(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
    if num_classes is None:
        num_classes = max(2, int(max(y_train.max().item(), y_test.max().item() if y_test.numel() else 0)) + 1)
    mean, std = channel_stats(x_train)
    return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes), mean, std)


# --------------------------------------------------------------------------------------------- specs

def default_data_dir() -> Path:
    """``$FASTCOLLAB_DATA`` if set, else ``~/.cache/fastcollab/data``."""
    env = os.environ.get("FASTCOLLAB_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/fastcollab/data").expanduser()


FOLDER_DATASETS = ("cifar10", "cifar100", "svhn", "tiny-imagenet")
_SPECS_HELP = "use cifar10, cifar100, svhn, tiny-imagenet, synthetic, synthetic:N or npz:PATH"


def hold_out(x: torch.Tensor, y: torch.Tensor, n: int, seed: int):
    """``(x_rest, y_rest, x_held, y_held)``: ``n`` images drawn with ``seed`` (the same on every run with that
    seed) set aside for model selection; both parts keep the original order."""
    if not 0 < n < len(x):
        raise FastcollabError(f"--val-split {n} must leave training images: the training split has {len(x)} "
                              f"images; pass a number between 1 and {len(x) - 1}")
    held = torch.zeros(len(x), dtype=torch.bool)
    held[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]] = True
    return x[~held], y[~held], x[held], y[held]


def load_dataset(spec: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load a dataset by spec (see the module docstring). Bad input raises one FastcollabError."""
    if not isinstance(spec, str) or not spec.strip():
        raise FastcollabError(f"dataset spec {spec!r} is not a non-empty string; {_SPECS_HELP}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "npz":
        if not arg:
            raise FastcollabError(f"dataset spec {spec!r} has no path; write npz:PATH, e.g. npz:data/mine.npz")
        return _load_npz(arg)
    if kind == "synthetic":
        if not sep:
            return make_synthetic(name="synthetic")
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 10:
            raise FastcollabError(
                f"dataset spec {spec!r}: N must be an integer >= 10 training images; write e.g. synthetic:5000"
            )
        return make_synthetic(n_train=n, name=f"synthetic:{n}")
    if kind in FOLDER_DATASETS and not sep:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if kind == "svhn":
            return _load_svhn(root, download)
        if kind == "tiny-imagenet":
            return _load_tiny_imagenet(root, download)
        return _load_cifar(kind, root, download)
    raise FastcollabError(f"unknown dataset spec {spec!r}; {_SPECS_HELP}")


# --------------------------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "title": "CIFAR-100",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "num_classes": 100,
    },
}

# Indirection so tests can inject a fake opener (no network in CI).
_urlopen = urllib.request.urlopen
_DOWNLOAD_TIMEOUT_S = 60


def _where(info: dict, root: Path) -> str:
    files = info["train"] + info["test"]
    return (
        f"download {info['url']} yourself and extract it into {root} so that {root / info['folder']} holds "
        f"{', '.join(files)} (or point --data-dir / FASTCOLLAB_DATA at the directory that holds {info['folder']}/)"
    )


def _load_cifar(kind: str, root: Path, download: bool) -> Dataset:
    info = _CIFAR[kind]
    folder = root / info["folder"]
    files = info["train"] + info["test"]
    if not folder.is_dir():
        if not download:
            raise FastcollabError(f"{info['title']} not found at {folder} and download=False; {_where(info, root)}")
        _download_and_extract(info, root)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FastcollabError(
            f"{info['title']} directory {folder} is incomplete (missing {', '.join(missing)}); delete it to "
            f"re-download, or {_where(info, root)}"
        )
    parts = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for f in info[split]:
            x, y = _read_batch(folder / f, info, root)
            xs.append(x)
            ys.append(y)
        parts[split] = (torch.cat(xs), torch.cat(ys))
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    return _make(kind, x_tr, y_tr, x_te, y_te, info["num_classes"])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a tampered batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        import numpy as np

        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 renamed numpy.core
        return super().find_class(module, name)


def _read_batch(path: Path, info: dict, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    bad = f"{info['title']} file {path} is unreadable or not an official python-version batch"
    try:
        with open(path, "rb") as fh:
            d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[info["label_key"]], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 -- any failure is the same user-facing problem
        reason = _one_line(e) or type(e).__name__
        raise FastcollabError(f"{bad} ({reason}); delete it and {_where(info, root)}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise FastcollabError(
            f"{bad} (data {data.dtype} {data.shape}, labels {labels.shape}; expected uint8 [N, 3072] and [N]); "
            f"delete it and {_where(info, root)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= info["num_classes"]):
        raise FastcollabError(
            f"{bad} (labels outside 0..{info['num_classes'] - 1}); delete it and {_where(info, root)}"
        )
    x = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return x, torch.from_numpy(labels)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files and directories only; refuse links, devices, absolute paths and '..'."""
    if zipfile.is_zipfile(archive):
        return _safe_extract_zip(archive, dest)
    with tarfile.open(archive, "r:*") as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"archive member {m.name!r} escapes the target directory")
            target = dest.joinpath(*parts)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                raise ValueError(f"archive member {m.name!r} is a link or special file")


def _download_verified(url: str, md5: str, name: str, out) -> None:
    """Stream ``url`` into the open binary file ``out`` (closed after) and check its md5 (ValueError if not)."""
    h = hashlib.md5()
    with out, _urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
        for block in iter(lambda: resp.read(1 << 20), b""):
            h.update(block)
            out.write(block)
    if h.hexdigest() != md5:
        raise ValueError(f"{name} failed its md5 check: got {h.hexdigest()}, expected {md5}; a truncated download "
                         "or not the official file")


def _download_and_extract(info: dict, root: Path) -> None:
    """Download the official archive, check its md5, extract it safely and move the folder in atomically."""
    step = "create the data directory"
    tmp_file = tmp_dir = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        step = f"download {info['url']}"
        fd, name = tempfile.mkstemp(prefix=f".{info['archive']}.", suffix=".part", dir=root)
        tmp_file = Path(name)
        _download_verified(info["url"], info["md5"], info["archive"], os.fdopen(fd, "wb"))
        step = f"extract {info['archive']}"
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{info['folder']}.", dir=root))
        _safe_extract(tmp_file, tmp_dir)
        got = tmp_dir / info["folder"]
        missing = [f for f in info["train"] + info["test"] if not (got / f).is_file()]
        if missing:
            raise ValueError(f"the archive lacks {info['folder']}/{', '.join(missing)}")
        step = f"move the extracted files into {root / info['folder']}"
        try:
            os.rename(got, root / info["folder"])  # atomic on one filesystem
        except OSError:
            if not (root / info["folder"]).is_dir():  # not a concurrent download that finished first
                raise
    except Exception as e:  # noqa: BLE001 -- reported as one line, with where to put the files
        reason = _one_line(e) or type(e).__name__
        raise FastcollabError(f"{info['title']}: could not {step} ({reason}); {_where(info, root)}") from None
    finally:
        if tmp_file is not None:
            tmp_file.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _safe_extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for m in z.infolist():
            parts = Path(m.filename).parts
            if m.filename.startswith(("/", "\\")) or Path(m.filename).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"archive member {m.filename!r} escapes the target directory")
            if (m.external_attr >> 16) & 0o170000 not in (0, 0o100000, 0o040000):
                raise ValueError(f"archive member {m.filename!r} is a link or special file")
            target = dest.joinpath(*parts)
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)


# --------------------------------------------------------------------------------------------- labels

def _label_list(values, limit: int = 8) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:limit])) + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def check_labels(where: str, y_train, y_test, num_classes: int | None = None, fix: str = "") -> int:
    """Labels must be 0..C-1. With ``num_classes`` C known, a label outside is an error naming how many images
    carry which labels; without it (npz) C = max label + 1 and a label value in 0..C-1 that no image carries (a
    gap, e.g. one stray 255 after 0..9) is an error too. Works on the label arrays only, before any image is
    converted or any model sized. Returns C (at least 2)."""
    import numpy as np

    labels = np.concatenate([np.asarray(y_train).reshape(-1), np.asarray(y_test).reshape(-1)]).astype(np.int64)
    fix = fix or "remap them to 0..C-1, e.g. numpy.unique(y, return_inverse=True)"
    if labels.size == 0:
        return max(2, int(num_classes or 2))
    values, counts = np.unique(labels, return_counts=True)
    if values[0] < 0:
        neg = values < 0
        raise FastcollabError(f"{where}: {int(counts[neg].sum())} labels are negative ({_label_list(values[neg])}); "
                              f"labels must be 0..C-1: {fix}")
    if num_classes is not None:
        out = values >= num_classes
        if out.any():
            raise FastcollabError(
                f"{where}: {int(counts[out].sum())} labels lie outside 0..{num_classes - 1} (values "
                f"{_label_list(values[out])}) for its {num_classes} classes: {fix}")
        return int(num_classes)
    c = int(values[-1]) + 1
    if len(values) < c:  # a gap: the first missing value ends the contiguous run 0..k-1
        k = int(np.argmax(values != np.arange(len(values))))
        above = values >= k
        raise FastcollabError(
            f"{where}: labels are not 0..C-1 without gaps: {c - len(values)} of the values 0..{c - 1} have no image "
            f"(the first is {k}), and {int(counts[above].sum())} labels lie above {k - 1} (values "
            f"{_label_list(values[above])}): {fix}")
    return max(2, c)


# --------------------------------------------------------------------------------------------- SVHN

_SVHN = {
    "title": "SVHN",
    "folder": "svhn",
    "base": "http://ufldl.stanford.edu/housenumbers/",
    "files": {"train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
              "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")},
}


def _svhn_where(root: Path) -> str:
    folder = root / _SVHN["folder"]
    files = [f for f, _ in _SVHN["files"].values()]
    return (f"download {', '.join(_SVHN['base'] + f for f in files)} (the cropped-digits format 2) into {folder}, "
            f"or point --data-dir / FASTCOLLAB_DATA at the directory that holds {_SVHN['folder']}/")


def _load_svhn(root: Path, download: bool) -> Dataset:
    """SVHN, format 2 (32x32 cropped digits): the official ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5,
    read with scipy.io.loadmat: X uint8 [32, 32, 3, N], y [N, 1] in 1..10, 10 meaning the digit 0, mapped to
    label 0). Downloaded into ``root/svhn`` if absent and verified by md5. The ``extra`` split is not used."""
    folder = root / _SVHN["folder"]
    parts = {}
    for split, (name, md5) in _SVHN["files"].items():
        path = folder / name
        if not path.is_file():
            if not download:
                raise FastcollabError(f"SVHN file {path} not found and download=False; {_svhn_where(root)}")
            _download_file(_SVHN["base"] + name, md5, path, "SVHN", _svhn_where(root))
        parts[split] = _read_svhn_mat(path, root)
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    return _make("svhn", x_tr, y_tr, x_te, y_te, 10)


def _download_file(url: str, md5: str, path: Path, title: str, where: str) -> None:
    """One official file, md5-checked, moved into ``path`` atomically (no partial file is ever left)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        tmp = Path(name)
        _download_verified(url, md5, path.name, os.fdopen(fd, "wb"))
        os.replace(tmp, path)
        tmp = None
    except Exception as e:  # noqa: BLE001 -- reported as one line, with where to put the files
        raise FastcollabError(f"{title}: could not download {url} ({_one_line(e) or type(e).__name__}); "
                              f"{where}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _read_svhn_mat(path: Path, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    bad = f"SVHN file {path} is unreadable or not the official 32x32 .mat file"
    try:
        from scipy.io import loadmat

        d = loadmat(str(path), variable_names=["X", "y"])
        x, y = np.asarray(d["X"]), np.asarray(d["y"])
    except Exception as e:  # noqa: BLE001 -- any failure is the same user-facing problem
        raise FastcollabError(f"{bad} ({_one_line(e) or type(e).__name__}); delete it and {_svhn_where(root)}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise FastcollabError(f"{bad} (X {x.dtype} {x.shape}, y {y.shape}; expected uint8 [32, 32, 3, N] and "
                              f"[N, 1]); delete it and {_svhn_where(root)}")
    y = y.reshape(-1).astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        out = np.unique(y[(y < 1) | (y > 10)])
        raise FastcollabError(f"{bad} ({int(((y < 1) | (y > 10)).sum())} labels outside 1..10: "
                              f"{_label_list(out)}); delete it and {_svhn_where(root)}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return images, torch.from_numpy(y % 10)


# --------------------------------------------------------------------------------------------- Tiny-ImageNet

_TINY = {
    "title": "Tiny-ImageNet",
    "url": "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    "archive": "tiny-imagenet-200.zip",
    "md5": "90528d7ca1a48142e341f4ef8d21d0de",
    "folder": "tiny-imagenet-200",
    "train": ["wnids.txt", "train/"],
    "test": ["val/val_annotations.txt", "val/images/"],
}
_TINY_CLASSES, _TINY_SIZE = 200, 64
_TINY_CACHE = "fastcollab-uint8.npz"


def _load_tiny_imagenet(root: Path, download: bool) -> Dataset:
    """Tiny-ImageNet-200 in its official folder layout: ``wnids.txt`` (200 WordNet ids; class k is the k-th
    id in sorted order), ``train/<wnid>/images/*.JPEG`` (500 per class), ``val/images/*.JPEG`` with
    ``val/val_annotations.txt`` (file, wnid, box) as the test split (the official test split has no labels).
    64x64 RGB (grayscale files are converted). JPEGs are decoded with Pillow once; the uint8 arrays are then
    kept in ``tiny-imagenet-200/fastcollab-uint8.npz`` for later loads."""
    import numpy as np

    info = _TINY
    folder = root / info["folder"]
    if not folder.is_dir():
        if not download:
            raise FastcollabError(f"Tiny-ImageNet not found at {folder} and download=False; {_where(info, root)}")
        _download_and_extract({**info, "train": ["wnids.txt"], "test": ["val/val_annotations.txt"]}, root)
    missing = [f for f in info["train"] + info["test"] if not (folder / f).exists()]
    if missing:
        raise FastcollabError(f"Tiny-ImageNet directory {folder} is incomplete (missing {', '.join(missing)}); "
                              f"delete it to re-download, or {_where(info, root)}")
    cache = folder / _TINY_CACHE
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as d:
                arrays = [torch.from_numpy(d[k]) for k in _NPZ_KEYS]
            return _make("tiny-imagenet", *arrays, _TINY_CLASSES)
        except Exception:  # noqa: BLE001 -- a stale or broken cache is rebuilt from the JPEGs
            pass
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()]
    if len(wnids) != _TINY_CLASSES or len(set(wnids)) != _TINY_CLASSES:
        raise FastcollabError(f"{folder / 'wnids.txt'} lists {len(set(wnids))} distinct class ids, not "
                              f"{_TINY_CLASSES}: it is not the official file; {_where(info, root)}")
    index = {w: i for i, w in enumerate(sorted(wnids))}
    train = []
    for w in sorted(wnids):
        files = sorted((folder / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise FastcollabError(f"Tiny-ImageNet: {folder / 'train' / w / 'images'} holds no .JPEG images; "
                                  f"{_where(info, root)}")
        train += [(f, index[w]) for f in files]
    test = []
    for n, line in enumerate((folder / "val" / "val_annotations.txt").read_text().splitlines(), 1):
        cols = line.split("\t")
        if not line.strip():
            continue
        if len(cols) < 2 or cols[1] not in index:
            raise FastcollabError(f"{folder / 'val' / 'val_annotations.txt'} line {n} is not 'FILE<TAB>WNID<TAB>...' "
                                  f"with a wnid of wnids.txt ({line[:60]!r}); {_where(info, root)}")
        test.append((folder / "val" / "images" / cols[0], index[cols[1]]))
    x_tr, y_tr = _decode_images(train, info, root)
    x_te, y_te = _decode_images(test, info, root)
    try:
        atomic = cache.with_name(f".{cache.name}.tmp")
        with open(atomic, "wb") as fh:
            np.savez(fh, x_train=x_tr.numpy(), y_train=y_tr.numpy(), x_test=x_te.numpy(), y_test=y_te.numpy())
        os.replace(atomic, cache)
    except OSError:
        pass  # a read-only data folder: decode again next time
    return _make("tiny-imagenet", x_tr, y_tr, x_te, y_te, _TINY_CLASSES)


def _decode_images(items: list, info: dict, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (path, label) JPEGs into uint8 [N, 3, 64, 64] with Pillow."""
    import numpy as np
    from PIL import Image

    x = np.empty((len(items), 3, _TINY_SIZE, _TINY_SIZE), np.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise FastcollabError(f"Tiny-ImageNet image {path} cannot be read ({_one_line(e) or type(e).__name__}); "
                                  f"{_where(info, root)}") from None
        if a.shape != (_TINY_SIZE, _TINY_SIZE, 3):
            raise FastcollabError(f"Tiny-ImageNet image {path} is {a.shape[1]}x{a.shape[0]}, not 64x64: not the "
                                  f"official file; {_where(info, root)}")
        x[i] = a.transpose(2, 0, 1)
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return torch.from_numpy(x), y


# --------------------------------------------------------------------------------------------- npz

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path_str: str) -> Dataset:
    """``npz:PATH``: arrays x_train, y_train, x_test, y_test.

    Images: 4-D, NCHW or NHWC (the channel axis is axis 1 if it has size 1 or 3, else axis 3); uint8, or
    floating point in [0, 1] (quantised to uint8 with round(x * 255)). Grayscale (1 channel) is repeated to
    3 channels so every model (3 input channels) accepts it. Labels: 1-D (or [N, 1]) integers 0..C-1 with
    num_classes C = max label + 1 over train and test (at least 2); every value below C must occur
    (``check_labels``: a gap such as one stray 255 is an error, checked before the images are converted).
    """
    import numpy as np

    path = Path(path_str).expanduser()
    fix = "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
    if not path.is_file():
        raise FastcollabError(f"npz file {path} does not exist; check the path after 'npz:' or create it ({fix})")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise FastcollabError(f"{path} is not a readable .npz archive ({_one_line(e)}); {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FastcollabError(f"{path} holds a single array, not an .npz archive of named arrays; {fix}")
    arrays = {}
    with archive:
        missing = [k for k in _NPZ_KEYS if k not in archive.files]
        if missing:
            raise FastcollabError(
                f"{path} lacks the arrays {', '.join(missing)} (it has: {', '.join(archive.files) or 'none'}); {fix}"
            )
        for k in _NPZ_KEYS:
            try:
                arrays[k] = archive[k]
            except Exception as e:  # noqa: BLE001 -- BadZipFile, bad CRC, zlib or header errors alike
                raise FastcollabError(f"{path}: array {k} is corrupt or unreadable ({_one_line(e)}); {fix}") from None

    ys = {k: _npz_labels(path, k, arrays[k]) for k in ("y_train", "y_test")}
    num_classes = check_labels(str(path), ys["y_train"].numpy(), ys["y_test"].numpy())
    xs = {k: _npz_images(path, k, arrays[k]) for k in ("x_train", "x_test")}
    for split in ("train", "test"):
        nx, ny = xs[f"x_{split}"].shape[0], ys[f"y_{split}"].shape[0]
        if nx != ny:
            raise FastcollabError(
                f"{path}: x_{split} has {nx} images but y_{split} has {ny} labels; give one label per image"
            )
    if xs["x_train"].shape[0] == 0:
        raise FastcollabError(f"{path}: x_train is empty; the training set needs at least one image")
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise FastcollabError(
            f"{path}: x_train images are {tuple(xs['x_train'].shape[1:])} (C, H, W) but x_test images are "
            f"{tuple(xs['x_test'].shape[1:])}; give both splits the same image size"
        )
    return _make(f"npz:{path_str}", xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"], num_classes)


def _npz_images(path: Path, key: str, a) -> torch.Tensor:
    import numpy as np

    if a.ndim != 4:
        raise FastcollabError(
            f"{path}: {key} has {a.ndim} dimensions {a.shape}; images must be 4-D, [N, C, H, W] or [N, H, W, C] "
            f"(add a channel axis to grayscale [N, H, W] arrays with x[:, None])"
        )
    if a.shape[1] in (1, 3):
        nchw = a
    elif a.shape[3] in (1, 3):
        nchw = a.transpose(0, 3, 1, 2)
    else:
        raise FastcollabError(
            f"{path}: {key} has shape {a.shape} with neither axis 1 nor axis 3 of size 1 or 3 (channels); "
            "store images as [N, 3, H, W] or [N, H, W, 3]"
        )
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise FastcollabError(
                f"{path}: {key} is {a.dtype} with values outside [0, 1] (or not finite); store uint8 images 0-255 "
                "(x.astype(numpy.uint8)) or floats in [0, 1]"
            )
        nchw = np.rint(nchw * 255.0).astype(np.uint8)
    else:
        raise FastcollabError(
            f"{path}: {key} has dtype {a.dtype}; images must be uint8 0-255 (x.astype(numpy.uint8)) or floats in [0, 1]"
        )
    x = torch.from_numpy(np.ascontiguousarray(nchw))
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    if min(x.shape[2], x.shape[3]) < 1:
        raise FastcollabError(f"{path}: {key} has empty images {tuple(a.shape)}; store real images")
    return x


def _npz_labels(path: Path, key: str, a) -> torch.Tensor:
    import numpy as np

    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise FastcollabError(
            f"{path}: {key} has shape {a.shape}; labels must be 1-D class indices [N] (for one-hot use y.argmax(1))"
        )
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise FastcollabError(
            f"{path}: {key} has non-integer dtype {a.dtype}; labels must be integer class indices "
            "(y.astype(numpy.int64))"
        )
    y = torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))
    if y.numel() and y.min().item() < 0:
        raise FastcollabError(f"{path}: {key} has negative labels (min {y.min().item()}); labels must be 0..C-1")
    return y


# --------------------------------------------------------------------------------------------- synthetic

def _render(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n labelled 32x32 RGB images from generator g (vectorised; see make_synthetic)."""
    k = 10
    size = 32
    r = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    two_pi = 2 * math.pi

    # Each cue comes from the true class, or (with some probability) from a random other class.
    def cue(p_wrong: float) -> torch.Tensor:
        other = (y + 1 + (r(n) * (k - 1)).long().clamp_max(k - 2)) % k
        return torch.where(r(n) < p_wrong, other, y).float()

    c_orient, c_tint, c_blob = cue(0.15), cue(0.3), cue(0.3)

    lin = torch.linspace(-1, 1, size)
    v, u = torch.meshgrid(lin, lin, indexing="ij")  # v: rows (down), u: columns (right)
    u, v = u.view(1, size, size), v.view(1, size, size)

    # Oriented stripes: angle 18 deg per class with +-7 deg jitter; random period and phase.
    theta = (c_orient * 18.0 + (r(n) - 0.5) * 14.0) * (math.pi / 180.0)
    freq = 2.5 + 2.0 * r(n)  # cycles per half-width
    phase = two_pi * r(n)
    proj = u * theta.cos().view(-1, 1, 1) + v * theta.sin().view(-1, 1, 1)
    stripes = torch.sin(math.pi * freq.view(-1, 1, 1) * proj + phase.view(-1, 1, 1))  # [n, H, W] in [-1, 1]
    contrast = 0.12 + 0.18 * r(n)

    # Colour tint: hue 36 deg per class with jitter; random strength.
    hue = c_tint * (two_pi / k) + (r(n) - 0.5) * 0.9
    offsets = torch.tensor([0.0, two_pi / 3, 2 * two_pi / 3])
    tint = 0.5 + 0.5 * torch.cos(hue.view(-1, 1) - offsets.view(1, 3))  # [n, 3]
    tint_strength = 0.15 + 0.25 * r(n)

    background = 0.25 + 0.3 * r(n, 1) + 0.06 * (r(n, 3) - 0.5)  # [n, 3]
    img = background.view(n, 3, 1, 1) + (tint_strength.view(-1, 1) * (tint - 0.5)).view(n, 3, 1, 1)
    img = img + (contrast.view(-1, 1, 1) * stripes).unsqueeze(1)

    # A bright blob whose centre sits on a circle, 36 deg per class, with positional jitter.
    ang = c_blob * (two_pi / k)
    bx = 0.55 * ang.cos() + (r(n) - 0.5) * 0.25
    by = 0.55 * ang.sin() + (r(n) - 0.5) * 0.25
    rad = 0.15 + 0.12 * r(n)
    d2 = (u - bx.view(-1, 1, 1)) ** 2 + (v - by.view(-1, 1, 1)) ** 2
    blob = torch.exp(-d2 / (2 * rad.view(-1, 1, 1) ** 2)).unsqueeze(1)  # [n, 1, H, W]
    blob_colour = 0.7 + 0.3 * r(n, 3)
    alpha = 0.6 + 0.3 * r(n, 1)
    img = img * (1 - alpha.view(n, 1, 1, 1) * blob) + (alpha * blob_colour).view(n, 3, 1, 1) * blob

    # Occlusion: with probability 0.5 a random flat-coloured rectangle (6-13 px sides).
    h = 6 + (r(n) * 8).long()
    w = 6 + (r(n) * 8).long()
    top = (r(n) * (size - h + 1).float()).long()
    left = (r(n) * (size - w + 1).float()).long()
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    box = (
        (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
        & (r(n) < 0.5).view(-1, 1, 1)
    ).unsqueeze(1)
    img = torch.where(box, r(n, 3).view(n, 3, 1, 1), img)

    # Pixel noise.
    sigma = 0.03 + 0.07 * r(n)
    img = img + sigma.view(-1, 1, 1, 1) * torch.randn(n, 3, size, size, generator=g)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return x, y


def make_synthetic(n_train: int = 5000, n_test: int = 1000, seed: int = 0, name: str | None = None) -> Dataset:
    """A procedural, learnable, seeded 10-class set of 32x32 RGB images (fully offline).

    Each class c fixes three cues: the orientation of a grating (18 deg * c, +-7 deg jitter, random period and
    phase), a colour tint (hue 36 deg * c, jittered, random strength) and the position of a bright blob (on a
    circle at angle 36 deg * c, jittered, random size). Each cue is replaced by another class's with
    probability 0.15 (orientation) / 0.3 (tint) / 0.3 (blob), half of the images carry a random occluding
    rectangle, and all get Gaussian pixel noise and a random background. A linear model on pixels reads
    mostly tint and blob (~50-60 %); a small CNN that also reads orientation reaches well above 60 % in a few
    epochs but not 100 %. The training split is drawn from seed ``2*seed``, the test split from
    ``2*seed + 1``, so the test set does not depend on n_train. Fast: ~6,000 images in well under a second.
    """
    if n_train < 1 or n_test < 0:
        raise FastcollabError(f"synthetic needs n_train >= 1 and n_test >= 0 (got {n_train}, {n_test})")
    g_train = torch.Generator().manual_seed(2 * seed)
    g_test = torch.Generator().manual_seed(2 * seed + 1)
    x_tr, y_tr = _render(n_train, g_train)
    x_te, y_te = _render(n_test, g_test)
    return _make(name or f"synthetic:{n_train}", x_tr, y_tr, x_te, y_te, 10)


# --------------------------------------------------------------------------------------------- loader

def _mix_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed from (seed, epoch, stream) (splitmix64 finaliser), stable across runs and platforms."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


class DeviceLoader:
    """Batches of a uint8 image set that lives on ``device``.

    Iterating yields ``(x, y)``: x float32 NCHW in [0, 1] on ``device`` (channels_last if asked), y int64.

    train=True: a fresh permutation each epoch and, if ``augment``, a random crop with ``padding`` pixels of
    zero padding and a random horizontal flip per image, all drawn from a generator seeded by
    ``(seed, epoch)`` and done on the device in one batched gather. ``set_epoch(e)`` selects the epoch; each
    ``iter()`` uses the current epoch and then advances it by one, so a plain ``for epoch: for batch in
    loader`` loop sees epochs 0, 1, 2, ... and a run resumed with ``set_epoch(start)`` sees the same batches
    as an uninterrupted one. drop_last defaults to True.

    train=False: the examples in order, no augmentation, drop_last defaults to False.
    ``len(loader)`` is the number of batches per epoch.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        device: str | torch.device = "cpu",
        train: bool = True,
        seed: int = 0,
        augment: bool = True,
        drop_last: bool | None = None,
        channels_last: bool = False,
        padding: int = 4,
    ):
        x_uint8 = torch.as_tensor(x_uint8)
        y = torch.as_tensor(y)
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
            raise FastcollabError(
                f"DeviceLoader needs uint8 images [N, C, H, W], got {x_uint8.dtype} {tuple(x_uint8.shape)}; "
                "pass Dataset.x_train / x_test"
            )
        if y.dim() != 1 or y.shape[0] != x_uint8.shape[0]:
            raise FastcollabError(
                f"DeviceLoader got {x_uint8.shape[0]} images but labels of shape {tuple(y.shape)}; "
                "pass one label per image"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FastcollabError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise FastcollabError(f"padding must be an integer >= 0, got {padding!r}")
        self.device = torch.device(device)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.channels_last = bool(channels_last)
        self.padding = padding
        self.epoch = 0
        self.shard = (0, 1)  # (index, count): set_shard
        self.n = int(x_uint8.shape[0])
        if self.drop_last and self.n < batch_size:
            raise FastcollabError(
                f"batch_size {batch_size} exceeds the {self.n} examples and drop_last=True leaves no batch; "
                "lower --batch-size or pass drop_last=False"
            )
        self.x = x_uint8.to(self.device).contiguous()  # once
        self.y = y.to(self.device, torch.int64)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def set_shard(self, index: int, count: int) -> None:
        """Yield only shard ``index`` of ``count`` of every batch (torchrun): the exact contiguous slice
        :func:`fastcollab.distributed.shard_bounds` gives, of the batch the whole plan makes, so the shards of
        all ranks together are the single-process batch (no padding, no repeated example)."""
        if not 0 <= index < count or count > self.batch_size:
            raise FastcollabError(f"shard {index} of {count} does not fit a batch of {self.batch_size}: launch at "
                                  f"most --batch-size processes, or raise --batch-size")
        self.shard = (int(index), int(count))

    def _generator(self, epoch: int) -> torch.Generator:
        try:
            g = torch.Generator(device=self.device)
        except RuntimeError:  # a backend without its own generator: draw on the CPU
            g = torch.Generator()
        return g.manual_seed(_mix_seed(self.seed, epoch))

    def _plan(self, epoch: int):
        """Order, crop offsets and flips for one epoch, on the device."""
        if not self.train:
            return torch.arange(self.n, device=self.device), None, None, None
        g = self._generator(epoch)
        dev = g.device
        perm = torch.randperm(self.n, generator=g, device=dev).to(self.device)
        if not self.augment:
            return perm, None, None, None
        span = 2 * self.padding + 1
        oy = torch.randint(0, span, (self.n,), generator=g, device=dev).to(self.device)
        ox = torch.randint(0, span, (self.n,), generator=g, device=dev).to(self.device)
        flip = (torch.rand(self.n, generator=g, device=dev) < 0.5).to(self.device)
        return perm, oy, ox, flip

    def _augmented(self, idx, oy, ox, flip) -> torch.Tensor:
        """Crop (zero padding) + flip for a batch as one advanced-indexing gather; uint8 [B, C, H, W]."""
        _, c, h, w = self.x.shape
        p = self.padding
        ar_h = torch.arange(h, device=self.device)
        ar_w = torch.arange(w, device=self.device)
        rows = oy.view(-1, 1) - p + ar_h.view(1, -1)  # [B, H] source rows in the unpadded image
        start = ox.view(-1, 1) - p
        cols = torch.where(flip.view(-1, 1), start + (w - 1 - ar_w).view(1, -1), start + ar_w.view(1, -1))
        valid = ((rows >= 0) & (rows < h)).view(-1, 1, h, 1) & ((cols >= 0) & (cols < w)).view(-1, 1, 1, w)
        chans = torch.arange(c, device=self.device).view(1, c, 1, 1)
        out = self.x[  # one gather: image, channel, source row, source column (clamped; masked below)
            idx.view(-1, 1, 1, 1),
            chans,
            rows.clamp(0, h - 1).view(-1, 1, h, 1),
            cols.clamp(0, w - 1).view(-1, 1, 1, w),
        ]
        return out * valid

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int):
        order, oy, ox, flip = self._plan(epoch)
        nb = len(self)
        bs = self.batch_size
        index, count = self.shard
        for b in range(nb):
            start = b * bs
            lo, hi = shard_bounds(min(bs, self.n - start), index, count)
            sl = slice(start + lo, start + hi)
            idx = order[sl]
            if oy is None:
                xb = self.x[sl] if not self.train else self.x[idx]
            else:
                xb = self._augmented(idx, oy[sl], ox[sl], flip[sl])
            xb = xb.float().div_(255.0)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx] if self.train else self.y[sl]
