"""Datasets for the ticket search, as tensors in memory (docs/contract.md section 3, `--data`).

    mnist1d    the default: generated here by the `mnist1d` package (no network), 40 features
    PATH.npz   x_train, y_train, x_test, y_test; images uint8 or float in (N, C, H, W), (N, H, W)
               or (N, D); labels integers from 0, every class with a training sample unless an
               integer num_classes in the file says how many there are. Read with allow_pickle=False.
    cifar10    the binary CIFAR-10 files (cifar-10-batches-bin/*.bin) under --data-dir
    mnist      the MNIST idx files (train-images-idx3-ubyte[.gz], ...) under --data-dir

Both file readers are the project's own (no torchvision, no pickles). Nothing is downloaded
unless asked (`download=True`, `--download`): files are then fetched from the datasets' sites,
checked against their published MD5, and renamed into place only once whole.
"""

import dataclasses
import gzip
import hashlib
import io
import random
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import torch

from .files import write_atomic

NAMES = ("mnist1d", "cifar10", "mnist")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DataError(ValueError):
    """Data that cannot be used, with a message that says why."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (N, *input_shape)
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop (padding 4) and horizontal flip, as the paper's CIFAR runs
    x_val: torch.Tensor | None = None  # held out of the training set by with_validation
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


def with_validation(data: Dataset, fraction: float) -> Dataset:
    """`data` with `fraction` of its training samples moved to a validation set, for choosing
    settings (s0, lam) without the test set. The draw is fixed (a generator seeded 0), so every
    run on the same data, whatever its seed, holds out the same samples."""
    n = len(data.y_train)
    count = round(fraction * n)
    if not 0 < count < n:
        raise DataError(f"--val-fraction {fraction:g} of {data.name}'s {n} training samples leaves "
                        f"{count} for validation and {n - count} for training: both need at least one")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, val = order[count:].sort().values, order[:count].sort().values  # in their first order
    return dataclasses.replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                               x_val=data.x_train[val], y_val=data.y_train[val])


def load(data: str, data_dir: str | None = None, download: bool = False) -> Dataset:
    """The dataset `data` names: mnist1d, cifar10, mnist, or a path to an .npz file. With
    `download`, missing cifar10 / mnist files are fetched into `data_dir` first."""
    if data == "mnist1d":
        return _mnist1d()
    if data in ("cifar10", "mnist"):
        root = _data_dir(data_dir, data, create=download)
        if download:
            (download_cifar10 if data == "cifar10" else download_mnist)(root)
        return _cifar10(root) if data == "cifar10" else _mnist(root)
    if data.endswith(".npz"):
        return _npz(Path(data))
    raise DataError(f"--data must be one of {', '.join(NAMES)} or a path ending in .npz, got {data!r}")


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip of a batch of images, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator).tolist()
    dx = torch.randint(0, 9, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def _data_dir(data_dir, name: str, create: bool = False) -> Path:
    if data_dir is None:
        raise DataError(f"--data {name} reads its files from --data-dir, which was not given")
    path = Path(data_dir)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    return path


def _fetch(url: str, md5: str) -> bytes:
    """The bytes at `url`, which must have the published MD5 `md5`."""
    try:
        with urlopen(url, timeout=60) as response:
            payload = response.read()
    except OSError as error:
        raise DataError(f"download of {url} failed: {error}") from None
    got = hashlib.md5(payload).hexdigest()
    if got != md5:
        raise DataError(f"download of {url}: MD5 {got} is not the published {md5}; nothing was written")
    return payload


def download_cifar10(root: Path) -> None:
    """Fetch the binary CIFAR-10 archive into root/cifar-10-batches-bin, unless already there.
    Only the six expected batch files are taken from the archive, by name."""
    folder = root / "cifar-10-batches-bin"
    if all((folder / name).is_file() for name in CIFAR10_FILES):
        return
    archive = tarfile.open(fileobj=io.BytesIO(_fetch(CIFAR10_URL, CIFAR10_MD5)), mode="r:gz")
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        try:
            member = archive.extractfile(f"cifar-10-batches-bin/{name}")
        except KeyError:
            member = None
        if member is None:
            raise DataError(f"download of {CIFAR10_URL}: the archive lacks cifar-10-batches-bin/{name}")
        write_atomic(folder / name, member.read())


def download_mnist(root: Path) -> None:
    """Fetch the four MNIST idx files (gzipped) into root, unless already there."""
    for name, md5 in MNIST_MD5.items():
        stem = name[: -len(".gz")]
        if not ((root / name).is_file() or (root / stem).is_file()):
            write_atomic(root / name, _fetch(MNIST_URL + name, md5))


def _mnist1d() -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise DataError(f"--data mnist1d needs the mnist1d package (pip install mnist1d): {error}") from None
    # make_dataset seeds numpy's and Python's global generators: keep the caller's streams.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return _from_arrays("mnist1d", made["x"], made["y"], made["x_test"], made["y_test"])


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    if not zipfile.is_zipfile(path):  # else numpy's error speaks of pickled data
        raise DataError(f"--data {path}: not an .npz file (np.savez writes a zip archive of arrays; this is not one)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"--data {path}: missing arrays {missing} (it has {sorted(f.files)})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            num_classes = f["num_classes"] if "num_classes" in f.files else None
    except DataError:
        raise
    except (OSError, ValueError) as error:  # not an npz, truncated, or holding pickled objects
        raise DataError(f"--data {path}: not a readable .npz file ({error})") from None
    if num_classes is not None:
        if num_classes.ndim != 0 or not np.issubdtype(num_classes.dtype, np.integer):
            raise DataError(f"--data {path}: num_classes must be one integer, got an array of shape "
                            f"{num_classes.shape} and dtype {num_classes.dtype}")
        num_classes = int(num_classes)
    return _from_arrays(path.name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                        num_classes=num_classes)


def _from_arrays(name: str, x_train, y_train, x_test, y_test, augment: bool = False,
                 num_classes: int | None = None) -> Dataset:
    """The dataset of these arrays, checked. The class count is y_train's highest label + 1, where
    every class below it has a training sample, or `num_classes` where the data gives it."""
    xs = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{name}: x_{split} must be (N, D), (N, H, W) or (N, C, H, W), got shape {x.shape}")
        if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] == x.shape[2] > 4:
            # square images with 1, 3 or 4 trailing values: NHWC (numpy, TensorFlow), which a
            # convolution would read as H channels of H x C pixels
            raise DataError(f"{name}: x_{split} has shape {x.shape}, images in (N, H, W, C); they must be "
                            f"(N, C, H, W): np.transpose(x_{split}, (0, 3, 1, 2))")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name}: y_{split} must hold one label per row of x_{split}: "
                            f"x_{split} has {len(x)} rows, y_{split} has shape {y.shape}")
        if len(x) == 0:
            raise DataError(f"{name}: x_{split} is empty")
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
            raise DataError(f"{name}: y_{split} must hold integer labels, got dtype {y.dtype}")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{name}: x_{split} must be numeric, got dtype {x.dtype}")
        xs[split] = _to_float(x)
        bad = int((~torch.isfinite(xs[split])).sum())
        if bad:  # NaN would train to a NaN loss, and inf overflows it: refuse them here, by name
            raise DataError(f"{name}: x_{split} holds {bad} NaN or infinite values (as float32)")
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DataError(f"{name}: x_train and x_test must have one sample shape, got "
                        f"{tuple(xs['train'].shape[1:])} and {tuple(xs['test'].shape[1:])}")
    given = num_classes is not None
    if not given:
        num_classes = int(y_train.max()) + 1
        empty = sorted(set(range(num_classes)) - set(np.unique(y_train).astype(np.int64).tolist()))
        if empty and int(y_train.min()) >= 0:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            raise DataError(f"{name}: y_train has no sample of {len(empty)} of the classes 0..{num_classes - 1} "
                            f"(labels {shown}); if that is meant, give the class count as num_classes in the .npz")
    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= num_classes:
            where = "the num_classes given" if given else "from y_train"
            raise DataError(f"{name}: y_{split} labels must lie in 0..{num_classes - 1} ({where}), "
                            f"got {int(y.min())}..{int(y.max())}")
    if num_classes < 2:
        raise DataError(f"{name}: y_train holds a single class")
    return Dataset(name, xs["train"], torch.as_tensor(y_train, dtype=torch.int64), xs["test"],
                   torch.as_tensor(y_test, dtype=torch.int64), num_classes, augment)


def _to_float(x: np.ndarray) -> torch.Tensor:
    t = torch.tensor(x)  # a copy: idx and .bin arrays are read-only views of the file's bytes
    t = t.float() / 255.0 if x.dtype == np.uint8 else t.float()
    return t.unsqueeze(1) if t.dim() == 3 else t  # (N, H, W) -> (N, 1, H, W)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _cifar10(root: Path) -> Dataset:
    folder = root / "cifar-10-batches-bin"
    names = list(CIFAR10_FILES)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"--data cifar10: {folder} lacks {missing}; pass --download, or unpack "
                        f"{CIFAR10_URL} into --data-dir")
    record = 1 + 3 * 32 * 32

    def read(name):
        raw = np.fromfile(folder / name, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(f"--data cifar10: {folder / name} is not a whole number of {record}-byte records")
        raw = raw.reshape(-1, record)
        return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)

    train = [read(n) for n in names[:5]]
    x_test, y_test = read(names[5])
    data = _from_arrays("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                        x_test, y_test, augment=True, num_classes=10)
    data.x_train = _normalise(data.x_train, CIFAR10_MEAN, CIFAR10_STD)
    data.x_test = _normalise(data.x_test, CIFAR10_MEAN, CIFAR10_STD)
    return data


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"--data mnist: {path} is not an idx file (magic {magic:#x})")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"--data mnist: {path} is truncated ({body.size} of {int(np.prod(shape))} bytes)")
    return body.reshape(shape)


def _mnist(root: Path) -> Dataset:
    def find(stem):
        for candidate in (root / stem, root / f"{stem}.gz", root / "MNIST" / "raw" / stem, root / "MNIST" / "raw" / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        raise DataError(f"--data mnist: {stem}[.gz] not found in {root}; pass --download, or put the idx files there")

    x_train = _read_idx(find("train-images-idx3-ubyte"), 0x803)
    y_train = _read_idx(find("train-labels-idx1-ubyte"), 0x801).astype(np.int64)
    x_test = _read_idx(find("t10k-images-idx3-ubyte"), 0x803)
    y_test = _read_idx(find("t10k-labels-idx1-ubyte"), 0x801).astype(np.int64)
    data = _from_arrays("mnist", x_train, y_train, x_test, y_test, num_classes=10)
    data.x_train = (data.x_train - MNIST_MEAN) / MNIST_STD
    data.x_test = (data.x_test - MNIST_MEAN) / MNIST_STD
    return data
