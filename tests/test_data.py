"""Tests for the data-set layer (bmrs.datasets).

All tests use small files written to temporary directories, except one that
reads the Debian Fashion-MNIST package when it is installed.  Downloads are
served from local ``file://`` URLs, so no test needs the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmrs import datasets as data

DEBIAN_FASHION = data._SYSTEM_DIRS["fashion-mnist"][0]
IDX_NAMES = data._IDX_FILES
FIRST_URL = {name: source.downloads[0][0] for name, source in data._SOURCES.items()}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from real user data: empty cache, no BMRS_DATA, no system dirs."""
    monkeypatch.delenv("BMRS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setitem(data._SYSTEM_DIRS, "fashion-mnist", (tmp_path / "no-such-system-dir",))


# --------------------------------------------------------------------------
# helpers that write files in the original formats

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def coded_images(n: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Random images whose index can be recovered after any increasing affine map.

    Pixel (0, 0) is 0, pixel (0, 1) is 255 and pixel (0, 2) is the image index.
    """
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    images[:, 0, 0] = 0
    images[:, 0, 1] = 255
    images[:, 0, 2] = np.arange(n)
    return images


def decode_index(images: torch.Tensor) -> np.ndarray:
    lo, hi, code = images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2]
    return torch.round((code - lo) / (hi - lo) * 255).long().numpy()


def make_idx_set(folder: Path, n_train=50, n_test=20, gz=(True, False, True, False), seed=0):
    """Write the four IDX files; ``gz`` says, per file, whether it is gzipped."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": coded_images(n_train, rng),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": coded_images(n_test, rng),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for (name, array), zipped in zip(arrays.items(), gz):
        write_idx(folder / name, array, zipped)
    return arrays


def make_cifar_batches(folder: Path, n_per_batch=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [*((f"data_batch_{i}", n_per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        x[:, :1024] //= 4  # give the channels clearly different statistics
        y = list(rng.integers(0, 10, size=n))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        written[name] = (x, np.array(y))
    return written


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = write_idx(tmp_path / "a-idx", array, gz)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 4)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "element type"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abc", "3 bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "3 bytes"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header"),
        (b"\x00\x00", "magic"),
        (gzip.compress(idx_bytes(np.zeros((5, 2), np.uint8)), mtime=0)[:-12], "gzip"),
    ],
    ids=["bad-magic", "bad-type", "short-data", "long-data", "short-header", "short-magic", "cut-gzip"],
)
def test_read_idx_rejects_malformed_files(tmp_path, raw, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        data.read_idx(path)


def test_mismatched_image_and_label_counts_raise(tmp_path):
    make_idx_set(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(49, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"\(49,\)"):
        data.load_dataset("mnist", tmp_path, download=False)


# --------------------------------------------------------------------------
# IDX data sets


def test_mnist_from_idx_files_splits_and_standardises(tmp_path):
    arrays = make_idx_set(tmp_path / "mnist")
    splits = data.load_dataset("mnist", data_dir=tmp_path, download=False)

    assert splits.name == "mnist"
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [40, 10, 20]
    for part in (splits.train, splits.val, splits.test):
        images, labels = part.tensors
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28)
        assert labels.dtype == torch.int64 and labels.ndim == 1

    # every training image lands in exactly one of train / val, with its own label
    train_idx = decode_index(splits.train.tensors[0])
    val_idx = decode_index(splits.val.tensors[0])
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(50))
    np.testing.assert_array_equal(splits.train.tensors[1].numpy(), train_idx % 10)
    np.testing.assert_array_equal(splits.val.tensors[1].numpy(), val_idx % 10)
    # the test set is the official one, in file order
    np.testing.assert_array_equal(decode_index(splits.test.tensors[0]), np.arange(20))
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])

    # standardised with the statistics of the training split only
    raw_train = arrays["train-images-idx3-ubyte"][np.sort(train_idx)].astype(np.float64) / 255
    mean, std = raw_train.mean(), raw_train.std(ddof=1)
    expected_test = (arrays["t10k-images-idx3-ubyte"] / 255 - mean) / std
    np.testing.assert_allclose(splits.test.tensors[0][:, 0].numpy(), expected_test, atol=1e-5)
    assert abs(float(splits.train.tensors[0].mean())) < 1e-5
    assert float(splits.train.tensors[0].std()) == pytest.approx(1.0, abs=1e-5)


def test_split_is_deterministic_per_seed(tmp_path):
    make_idx_set(tmp_path)
    a = data.load_dataset("mnist", tmp_path, seed=3, download=False)
    b = data.load_dataset("mnist", tmp_path, seed=3, download=False)
    c = data.load_dataset("mnist", tmp_path, seed=4, download=False)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert set(decode_index(a.val.tensors[0])) != set(decode_index(c.val.tensors[0]))


def test_val_fraction_sets_split_sizes(tmp_path):
    make_idx_set(tmp_path)
    splits = data.load_dataset("mnist", tmp_path, val_fraction=0.3, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (35, 15, 20)
    splits = data.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False)
    assert (len(splits.train), len(splits.val)) == (50, 0)


@pytest.mark.parametrize("size", [32, 14])
def test_image_size_resizes_bilinearly(tmp_path, size):
    arrays = make_idx_set(tmp_path / "fashion-mnist")
    splits = data.load_dataset("fashion-mnist", tmp_path, image_size=size, val_fraction=0.0, download=False)
    assert splits.input_shape == (1, size, size)
    assert splits.train.tensors[0].shape == (50, 1, size, size)
    assert splits.test.tensors[0].shape == (20, 1, size, size)

    def resize(x):
        x = torch.from_numpy(x[:, None].astype(np.float32) / 255)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    train = resize(arrays["train-images-idx3-ubyte"])
    expected = (resize(arrays["t10k-images-idx3-ubyte"]) - train.mean()) / train.std()
    torch.testing.assert_close(splits.test.tensors[0], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sub", ["", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw"])
def test_fashion_mnist_folder_layouts(tmp_path, sub):
    make_idx_set(tmp_path / sub, n_train=30, gz=(False, True, False, True))
    splits = data.load_fashion_mnist(tmp_path, download=False)
    assert splits.name == "fashion-mnist"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 20)


def test_lookup_order_data_dir_then_env_then_cache_then_system(tmp_path, monkeypatch):
    # a different training-set size in each place tells them apart
    sizes = {"arg": 10, "env": 15, "cache": 20, "system": 25}
    for place, n in sizes.items():
        make_idx_set(tmp_path / place / "fashion-mnist", n_train=n)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    (tmp_path / "cache-home").mkdir()
    (tmp_path / "cache" / "fashion-mnist").rename(tmp_path / "cache-home" / "bmrs")
    monkeypatch.setitem(data._SYSTEM_DIRS, "fashion-mnist", (tmp_path / "system" / "fashion-mnist",))
    monkeypatch.setenv("BMRS_DATA", str(tmp_path / "env"))

    def n_train(**kwargs):
        splits = data.load_fashion_mnist(download=False, val_fraction=0.0, **kwargs)
        return len(splits.train)

    assert n_train(data_dir=tmp_path / "arg") == 10
    assert n_train() == 15
    monkeypatch.delenv("BMRS_DATA")
    assert n_train() == 20
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert n_train() == 25


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="digits, fashion-mnist, mnist, cifar10"):
        data.load_dataset("imagenet")


def test_name_is_normalised(tmp_path):
    make_idx_set(tmp_path / "fashion-mnist")
    assert data.load_dataset("Fashion_MNIST", tmp_path, download=False).name == "fashion-mnist"


@pytest.mark.parametrize("kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"image_size": 0}])
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError):
        data.load_dataset("digits", **kwargs)


# --------------------------------------------------------------------------
# CIFAR-10


def _check_cifar(splits, written):
    assert splits.name == "cifar10" and splits.num_classes == 10
    assert splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 0, 4)
    assert splits.test.tensors[1].dtype == torch.int64
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), written["test_batch"][1])
    train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train = train.reshape(-1, 3, 32, 32) / 255
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    expected = (written["test_batch"][0].reshape(-1, 3, 32, 32) / 255 - mean) / std
    np.testing.assert_allclose(splits.test.tensors[0].numpy(), expected, atol=1e-5)


def test_cifar10_from_pickled_batches(tmp_path):
    written = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    splits = data.load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    _check_cifar(splits, written)
    default = data.load_cifar10(tmp_path, download=False)
    assert (len(default.train), len(default.val)) == (24, 6)


def test_cifar10_from_archive_is_extracted(tmp_path):
    written = make_cifar_batches(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    splits = data.load_dataset("cifar10", tmp_path / "data", val_fraction=0.0, download=False)
    _check_cifar(splits, written)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_archive_members_outside_the_batch_folder_are_ignored(tmp_path):
    written = make_cifar_batches(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    _check_cifar(data.load_cifar10(tmp_path / "data", val_fraction=0.0, download=False), written)
    assert not (tmp_path / "escaped").exists()


def test_malformed_cifar_batch_raises(tmp_path):
    make_cifar_batches(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        data.load_cifar10(tmp_path, download=False)


# --------------------------------------------------------------------------
# missing data and downloads


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10"])
def test_missing_data_raises_one_clear_error(tmp_path, monkeypatch, name):
    env_dir = tmp_path / "env"
    monkeypatch.setenv("BMRS_DATA", str(env_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset(name, data_dir=empty, download=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for place in (empty, env_dir, tmp_path / "xdg-cache" / "bmrs"):
        assert str(place) in message
    assert "download=False" in message
    assert "--data-dir" in message and "BMRS_DATA" in message
    assert FIRST_URL[name] in message
    if name == "fashion-mnist":
        assert str(tmp_path / "no-such-system-dir") in message
        assert "apt-get install dataset-fashion-mnist" in message


def _serve_locally(monkeypatch, name, files: list[Path], md5s: list[str]):
    """Point the downloads of ``name`` at local files."""
    downloads = tuple((path.as_uri(), md5) for path, md5 in zip(files, md5s))
    monkeypatch.setitem(data._SOURCES, name, dataclasses.replace(data._SOURCES[name], downloads=downloads))


def test_download_with_wrong_checksum_fails_and_leaves_no_file(tmp_path, monkeypatch):
    served = tmp_path / "server"
    make_idx_set(served, gz=(True,) * 4)
    files = [served / f"{name}.gz" for name in IDX_NAMES]
    _serve_locally(monkeypatch, "mnist", files, ["0" * 32] * 4)
    target = tmp_path / "target"
    with pytest.raises(data.DataNotFoundError, match="(?i)checksum") as info:
        data.load_dataset("mnist", target)
    assert "0" * 32 in str(info.value) and md5_of(files[0]) in str(info.value)
    assert not (target / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert list((target / "mnist").iterdir()) == []


def test_download_with_right_checksum_loads_and_is_reused(tmp_path, monkeypatch):
    served = tmp_path / "server"
    make_idx_set(served, gz=(True,) * 4)
    files = [served / f"{name}.gz" for name in IDX_NAMES]
    _serve_locally(monkeypatch, "mnist", files, [md5_of(f) for f in files])
    monkeypatch.setenv("BMRS_DATA", str(tmp_path / "env"))
    splits = data.load_dataset("mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    stored = tmp_path / "env" / "mnist"
    assert sorted(p.name for p in stored.iterdir()) == sorted(f.name for f in files)
    for f in files:
        f.unlink()  # the next load must not touch the "server"
    assert torch.equal(data.load_dataset("mnist", download=False).test.tensors[0], splits.test.tensors[0])


def test_cifar10_download_is_verified_and_extracted(tmp_path, monkeypatch):
    written = make_cifar_batches(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _serve_locally(monkeypatch, "cifar10", [archive], [md5_of(archive)])
    splits = data.load_dataset("cifar10", tmp_path / "target", val_fraction=0.0)
    _check_cifar(splits, written)
    assert (tmp_path / "target" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_unreachable_download_is_reported(tmp_path, monkeypatch):
    _serve_locally(monkeypatch, "fashion-mnist", [tmp_path / "nowhere.gz"] * 4, ["0" * 32] * 4)
    with pytest.raises(data.DataNotFoundError, match="failed") as info:
        data.load_fashion_mnist(tmp_path / "target")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


# --------------------------------------------------------------------------
# scikit-learn digits and the real Fashion-MNIST


def test_digits_sizes_and_fixed_test_split():
    a = data.load_dataset("digits", seed=0)
    b = data.load_digits(seed=1)
    assert a.name == "digits" and a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert (len(a.train), len(a.val), len(a.test)) == (1078, 269, 450)
    assert a.train.tensors[0].dtype == torch.float32 and a.train.tensors[1].dtype == torch.int64
    # the test split does not depend on ``seed``; the validation split does
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.val.tensors[1], b.val.tensors[1])
    # stratified: each class keeps its share of a quarter of all images
    everything = torch.cat([a.train.tensors[1], a.val.tensors[1], a.test.tensors[1]])
    share = torch.bincount(everything, minlength=10) * 0.25
    assert torch.all((torch.bincount(a.test.tensors[1], minlength=10) - share).abs() <= 1)
    assert abs(float(a.train.tensors[0].mean())) < 1e-5


def test_real_fashion_mnist_from_debian_package(monkeypatch):
    if not DEBIAN_FASHION.is_dir():
        pytest.skip(f"{DEBIAN_FASHION} is absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.setitem(data._SYSTEM_DIRS, "fashion-mnist", (DEBIAN_FASHION,))
    splits = data.load_dataset("fashion-mnist", download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48_000, 12_000, 10_000)
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28)
    assert torch.equal(torch.bincount(splits.test.tensors[1]), torch.full((10,), 1000))
    assert torch.equal(torch.bincount(torch.cat([splits.train.tensors[1], splits.val.tensors[1]])),
                       torch.full((10,), 6000))
