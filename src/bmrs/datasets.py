"""Image classification data sets used in the experiments.

Four data sets are available, by function or by name through
:func:`load_dataset`: ``digits`` (scikit-learn's bundled 8x8 digits),
``fashion-mnist``, ``mnist`` and ``cifar10``.

Files are searched for, in this order, in the ``data_dir`` argument, in
``$BMRS_DATA``, in the user cache directory (``$XDG_CACHE_HOME/bmrs`` or
``~/.cache/bmrs``) and in the location used by the Debian packages (for
Fashion-MNIST, ``apt-get install dataset-fashion-mnist`` puts the files in
``/usr/share/datasets/fashion-mnist``).  Inside each of these directories the
files may lie directly in it or in a sub-folder named after the data set.  If
nothing is found, the files are downloaded from the official source into the
first writable of those directories and checked against their published MD5
sums.

The official training set is split into training and validation parts with
a seeded permutation, and the official test set is kept as the test split.
Pixels are scaled to [0, 1] and then standardised per channel with the mean
and standard deviation of the training split.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

from ._io import write_bytes
from .errors import BMRSError

__all__ = [
    "DATASETS",
    "available",
    "ChecksumError",
    "DataNotFoundError",
    "DataSplits",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10")


class DataNotFoundError(FileNotFoundError):
    """A data set could not be found locally nor downloaded."""


class ChecksumError(RuntimeError):
    """A downloaded file does not have the expected MD5 sum."""


@dataclass
class DataSplits:
    """Training, validation and test splits of one data set.

    Attributes
    ----------
    name : str
        Canonical data set name (one of :data:`DATASETS`).
    train, val, test : TensorDataset
        Pairs of standardised float32 images ``(N, C, H, W)`` and int64
        labels ``(N,)``.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image, after any resizing.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]


# --------------------------------------------------------------------------
# Where the files come from

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch")


@dataclass(frozen=True)
class _Source:
    """How to find, and how to fetch, the files of one data set."""

    files: tuple[str, ...]  # names that must all lie in one folder
    gz_ok: bool  # whether ``name.gz`` may stand in for ``name``
    folders: tuple[str, ...]  # sub-folders of a search root to look in
    downloads: tuple[tuple[str, str], ...]  # (url, md5) pairs
    download_folder: str  # sub-folder of a root that downloads go to
    archive: str | None = None  # archive that unpacks to _CIFAR10_FOLDER
    how_to: str = ""  # extra advice for the error message


# MD5 sums of the files as served by the official sources.  Only downloads
# are checked: the Debian package recompresses the Fashion-MNIST files, so its
# .gz files differ from these although the decompressed data are the same.
_SOURCES: dict[str, _Source] = {
    "fashion-mnist": _Source(
        files=_IDX_FILES,
        gz_ok=True,
        folders=("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        downloads=(
            (_FASHION_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            (_FASHION_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            (_FASHION_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            (_FASHION_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        download_folder="fashion-mnist",
        how_to="on Debian or Ubuntu: sudo apt-get install dataset-fashion-mnist",
    ),
    "mnist": _Source(
        files=_IDX_FILES,
        gz_ok=True,
        folders=("", "mnist", "MNIST/raw"),
        downloads=(
            (_MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            (_MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            (_MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            (_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        download_folder="mnist",
    ),
    "cifar10": _Source(
        files=_CIFAR10_FILES,
        gz_ok=False,
        folders=("", _CIFAR10_FOLDER, "cifar10", f"cifar10/{_CIFAR10_FOLDER}"),
        downloads=((_CIFAR10_URL, "c58f30108f718f92721af3b95e74349a"),),
        download_folder="",
        archive="cifar-10-python.tar.gz",
    ),
}

# Directories filled by distribution packages, searched after the user's.
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bmrs"


def _user_roots(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """Search roots that the user controls, in priority order, with labels."""
    roots = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir / --data-dir"))
    env = os.environ.get("BMRS_DATA")
    if env:
        roots.append((Path(env).expanduser(), "$BMRS_DATA"))
    roots.append((_cache_dir(), "user cache"))
    return roots


def _find_files(folder: Path, source: _Source) -> list[Path] | None:
    """Paths of all of ``source.files`` in ``folder``, or None if any is missing."""
    found = []
    for name in source.files:
        options = [folder / name, folder / f"{name}.gz"] if source.gz_ok else [folder / name]
        path = next((p for p in options if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


def _find_in_root(root: Path, source: _Source) -> list[Path] | None:
    """Look for the files in ``root`` and its sub-folders, unpacking an archive if needed."""
    for sub in source.folders:
        found = _find_files(root / sub, source)
        if found is not None:
            return found
    if source.archive is not None:
        for sub in source.folders:
            archive = root / sub / source.archive
            if archive.is_file():
                return _find_files(_extract_cifar10(archive, root / sub), source)
    return None


def _extract_cifar10(archive: Path, dest: Path) -> Path:
    """Unpack the CIFAR-10 batches from ``archive`` into ``dest/cifar-10-batches-py``.

    Only the expected batch files are written, under names we choose, so a
    hostile archive cannot write elsewhere.  Each file is written to a
    temporary name first and renamed, so an interrupted run leaves no
    half-written batch behind.
    """
    out = dest / _CIFAR10_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    wanted = {f"{_CIFAR10_FOLDER}/{name}": name for name in (*_CIFAR10_FILES, "batches.meta")}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():
                    continue
                write_bytes(out / name, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BMRSError(f"{archive}: not a readable CIFAR-10 archive ({exc})") from exc
    return out


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` with a progress bar, checking its MD5 sum.

    The data go to a temporary file next to ``dest`` that is renamed only
    once the checksum matches; on any failure it is deleted.

    Raises
    ------
    ChecksumError
        If the downloaded bytes do not have the expected MD5 sum.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            size = response.headers.get("Content-Length")
            with tqdm(
                total=int(size) if size else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
            ) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"checksum mismatch for {url}: expected MD5 {md5}, got {digest.hexdigest()}; "
                "the download was deleted (a corrupted transfer or a changed file on the server)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _writable_root(roots: list[tuple[Path, str]]) -> Path | None:
    """The first root that exists or can be created and that we may write to."""
    for root, _ in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK | os.X_OK):
            return root
    return None


def _fetch(source: _Source, root: Path) -> list[Path]:
    """Download (and unpack) a data set into ``root``; return the file paths."""
    folder = root / source.download_folder
    for url, md5 in source.downloads:
        dest = folder / url.rsplit("/", 1)[-1]
        if not (dest.is_file() and _md5(dest) == md5):
            _download(url, dest, md5)
    found = _find_in_root(root, source)
    if found is None:
        raise BMRSError(f"the files downloaded into {folder} do not hold {', '.join(source.files)}")
    return found


def _locate(name: str, data_dir: str | os.PathLike | None, download: bool) -> list[Path]:
    """Paths of the files of data set ``name``, searching, then downloading.

    Raises
    ------
    DataNotFoundError
        If the files are nowhere to be found and could not be downloaded.
    """
    source = _SOURCES[name]
    user_roots = _user_roots(data_dir)
    system_roots = [(path, "system package") for path in _SYSTEM_DIRS.get(name, ())]
    for root, _ in user_roots + system_roots:
        found = _find_in_root(root, source)
        if found is not None:
            return found

    if download:
        target = _writable_root(user_roots)
        if target is None:
            download_note = "Download not possible: none of the directories above is writable."
        else:
            try:
                return _fetch(source, target)
            except (OSError, http.client.HTTPException, ChecksumError, ValueError) as exc:
                download_note = f"Download into {target} failed: {exc}"
    else:
        download_note = "Download was not attempted (download=False)."

    raise DataNotFoundError(_not_found_message(name, source, user_roots + system_roots, download_note))


def available(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether data set ``name`` can be loaded without a download (``digits`` always can:
    it ships with scikit-learn)."""
    name = name.lower().replace("_", "-")
    if name not in _SOURCES:
        return name in DATASETS
    try:
        _locate(name, data_dir, download=False)
    except DataNotFoundError:
        return False
    return True


def _not_found_message(name: str, source: _Source, roots: list[tuple[Path, str]], download_note: str) -> str:
    names = ", ".join(f"{f}[.gz]" if source.gz_ok else f for f in source.files)
    if source.archive is not None:
        names += f" (or the archive {source.archive})"
    subs = ", ".join(f"{s}/" for s in source.folders if s)
    lines = [f"Could not find the {name} data set.", f"Looked for {names} in:"]
    lines += [f"  - {root} ({label}), also in its sub-folders {subs}" for root, label in roots]
    lines += [download_note, "To get the data, any one of:"]
    if source.how_to:
        lines.append(f"  - {source.how_to}")
    lines.append("  - download these files into a directory DIR:")
    lines += [f"      {url}" for url, _ in source.downloads]
    lines += [
        "    then pass --data-dir DIR (data_dir=DIR in Python) or set the environment variable BMRS_DATA=DIR",
        "  - let this program download them (download=True) into the first writable of",
        f"    data_dir, $BMRS_DATA and {_cache_dir()}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# File formats

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST file format), gzipped or plain.

    Parameters
    ----------
    path : str or path-like
        The file; gzip compression is recognised from its content.

    Returns
    -------
    numpy.ndarray
        The array, with the shape and element type stored in the file, in
        native byte order.

    Raises
    ------
    ValueError
        If the file is not a well-formed IDX file (bad magic number, unknown
        element type, or a size that does not match the header).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise BMRSError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise BMRSError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise BMRSError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BMRSError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python integers: no overflow
    if len(raw) - header != expected:
        raise BMRSError(
            f"{path}: the header announces shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or 0 in x.shape[1:]:
        raise BMRSError(
            f"{images} and {labels}: expected images (N, H, W) and labels (N,), "
            f"got shapes {x.shape} and {y.shape}"
        )
    for path, array in ((images, x), (labels, y)):
        if array.dtype != np.uint8:
            raise BMRSError(f"{path}: expected unsigned bytes (IDX type 0x08), got {array.dtype}")
    return x[:, None], y


# What a CIFAR-10 python batch needs besides dicts, lists, bytes, str and numbers: NumPy
# arrays and scalars (rebuilt from a dtype and raw bytes) and, in protocol 2 pickles written
# by Python 3, bytes spelled as _codecs.encode(text, "latin1"). Nothing else is looked up.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only: any other class or function is refused
    before it is looked up, so no code from the file runs."""

    def find_class(self, module, name):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:  # a crafted or corrupt file: any failure of the unpickler
        detail = " ".join(str(exc).split())[:200]
        raise BMRSError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {detail})") from None
    try:
        if not isinstance(batch[b"data"], np.ndarray) or batch[b"data"].dtype != np.uint8:
            raise TypeError("data is not a uint8 array")
        x = batch[b"data"]
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise BMRSError(f"{path}: not a CIFAR-10 batch (needs b'data', uint8 images, and b'labels': {exc})") from None
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise BMRSError(f"{path}: expected data (N, 3072) and N labels, got {x.shape} and {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


# --------------------------------------------------------------------------
# Splitting and preprocessing


def _check_options(val_fraction: float, image_size: int | None) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise BMRSError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size < 1:
        raise BMRSError(f"image_size must be a positive integer, got {image_size}")


def _to_images(x: np.ndarray, scale: float, image_size: int | None) -> torch.Tensor:
    """Scale an (N, C, H, W) array to [0, 1] float32 and resize it if asked."""
    images = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(scale)
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return images


def _make_splits(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    scale: float,
    num_classes: int,
    seed: int,
    val_fraction: float,
    image_size: int | None,
) -> DataSplits:
    """Split off a validation set, scale, resize and standardise."""
    for labels in (train_y, test_y):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise BMRSError(f"{name}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    n = len(train_x)
    n_val = round(n * val_fraction)
    if n - n_val < 1:
        raise BMRSError(f"{name}: {n} training images leave none for training with val_fraction={val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    val_idx, train_idx = order[:n_val], order[n_val:]

    parts = [
        (_to_images(train_x[train_idx], scale, image_size), train_y[train_idx]),
        (_to_images(train_x[val_idx], scale, image_size), train_y[val_idx]),
        (_to_images(test_x, scale, image_size), test_y),
    ]
    mean = parts[0][0].mean(dim=(0, 2, 3), keepdim=True)
    std = parts[0][0].std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    train, val, test = (
        TensorDataset(images.sub_(mean).div_(std), torch.from_numpy(labels.astype(np.int64)))
        for images, labels in parts
    )
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(train.tensors[0].shape[1:]),
    )


# --------------------------------------------------------------------------
# Public loaders


def load_digits(
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = True,
) -> DataSplits:
    """Load scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

    There is no official test set, so a stratified 25 % is held out with a
    fixed seed (0, whatever ``seed`` is) and the rest is split into training
    and validation parts with ``seed``.

    Parameters
    ----------
    data_dir, download
        Ignored (the data ship with scikit-learn); accepted for a uniform
        signature.
    seed, val_fraction, image_size
        As in :func:`load_dataset`.

    Returns
    -------
    DataSplits
    """
    _check_options(val_fraction, image_size)
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images, labels = bunch.images[:, None], bunch.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    return _make_splits(
        "digits",
        images[rest],
        labels[rest],
        images[test],
        labels[test],
        scale=16.0,
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        image_size=image_size,
    )


def _load_idx_dataset(name, data_dir, seed, val_fraction, image_size, download) -> DataSplits:
    _check_options(val_fraction, image_size)
    train_images, train_labels, test_images, test_labels = _locate(name, data_dir, download)
    train_x, train_y = _read_idx_pair(train_images, train_labels)
    test_x, test_y = _read_idx_pair(test_images, test_labels)
    for images, x in ((train_images, train_x), (test_images, test_x)):
        if len(x) == 0:
            raise BMRSError(f"{images}: holds no images")
    return _make_splits(
        name,
        train_x,
        train_y,
        test_x,
        test_y,
        scale=255.0,
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        image_size=image_size,
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = True,
) -> DataSplits:
    """Load Fashion-MNIST (60,000 + 10,000 grey 28x28 images, 10 classes).

    Parameters
    ----------
    data_dir, seed, val_fraction, image_size, download
        As in :func:`load_dataset`.

    Returns
    -------
    DataSplits
    """
    return _load_idx_dataset("fashion-mnist", data_dir, seed, val_fraction, image_size, download)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = True,
) -> DataSplits:
    """Load MNIST (60,000 + 10,000 grey 28x28 handwritten digits, 10 classes).

    Parameters
    ----------
    data_dir, seed, val_fraction, image_size, download
        As in :func:`load_dataset`.

    Returns
    -------
    DataSplits
    """
    return _load_idx_dataset("mnist", data_dir, seed, val_fraction, image_size, download)


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = True,
) -> DataSplits:
    """Load CIFAR-10 (50,000 + 10,000 colour 32x32 images, 10 classes).

    Reads the python pickle batches of ``cifar-10-batches-py``; a
    ``cifar-10-python.tar.gz`` archive found instead is unpacked next to it.

    Parameters
    ----------
    data_dir, seed, val_fraction, image_size, download
        As in :func:`load_dataset`.

    Returns
    -------
    DataSplits
    """
    _check_options(val_fraction, image_size)
    *train_files, test_file = _locate("cifar10", data_dir, download)
    batches = [_read_cifar_batch(path) for path in train_files]
    test_x, test_y = _read_cifar_batch(test_file)
    return _make_splits(
        "cifar10",
        np.concatenate([x for x, _ in batches]),
        np.concatenate([y for _, y in batches]),
        test_x,
        test_y,
        scale=255.0,
        num_classes=10,
        seed=seed,
        val_fraction=val_fraction,
        image_size=image_size,
    )


_LOADERS = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = True,
) -> DataSplits:
    """Load a data set by name, split into training, validation and test sets.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (case and ``_`` versus ``-`` do not matter).
    data_dir : str or path-like, optional
        Directory searched first for the files (see the module docstring for
        the full search order).
    seed : int
        Seed of the permutation that splits the official training set into
        training and validation parts.
    val_fraction : float
        Share of the official training set used for validation, in [0, 1).
    image_size : int, optional
        If given, images are resized to ``image_size x image_size`` (bilinear,
        antialiased); by default they keep their native size.
    download : bool
        Whether to download missing files from the official source.

    Returns
    -------
    DataSplits

    Raises
    ------
    ValueError
        For an unknown name or invalid options.
    DataNotFoundError
        If the files are not found and cannot be downloaded.
    """
    key = name.lower().replace("_", "-")
    if key not in _LOADERS:
        raise BMRSError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _LOADERS[key](
        data_dir, seed=seed, val_fraction=val_fraction, image_size=image_size, download=download
    )
