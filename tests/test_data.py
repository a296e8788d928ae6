"""Tests of contrastkit.data: every on-disk layout is written by the tests themselves (small files in tmp_path)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import contrastkit.data.cache as data_cache
import contrastkit.data.imagefolder as imagefolder_module
from contrastkit.data import ImageTensors, available_datasets, dataset_options, dataset_splits, load_dataset
from contrastkit.errors import ContrastkitError, DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def raises_data_error(*fragments: str):
    """Context manager: expect a one-line DataError whose message contains every fragment."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(DataError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return handled

    return _Check()


# --------------------------------------------------------------------------------------------------------------------
# Writers for the on-disk formats.


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_fashion_mnist(root: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def write_pickle(path: Path, obj: dict) -> None:
    # Byte-string keys and protocol 2, like the original (Python 2) CIFAR files.
    with path.open("wb") as f:
        pickle.dump({k.encode(): v for k, v in obj.items()}, f, protocol=2)


def cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # N x 3072 (R plane, G plane, B plane)


def make_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = cifar_images(rng, 2), [int(v) for v in rng.integers(0, 10, 2)]
        write_pickle(folder / f"data_batch_{i}", {"data": x, "labels": y, "batch_label": b"b"})
        train_x.append(x)
        train_y += y
    test_x, test_y = cifar_images(rng, 3), [1, 2, 9]
    write_pickle(folder / "test_batch", {"data": test_x, "labels": test_y})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 2})
    return {"train": (np.concatenate(train_x), np.array(train_y)), "test": (test_x, np.array(test_y))}


def stl10_pattern(n: int) -> np.ndarray:
    """Asymmetric images: value depends differently on h and w, so a missing/extra transpose is caught."""
    n_, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    return ((n_ * 37 + c * 50 + h * 3 + w * 7) % 256).astype(np.uint8)  # N x C x H x W


def write_stl10_x(path: Path, images: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())  # column-major planes


def make_stl10(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    train, test, unlabeled = stl10_pattern(4), stl10_pattern(3)[::-1], stl10_pattern(5)[:, :, ::-1]
    write_stl10_x(folder / "train_X.bin", train)
    write_stl10_x(folder / "test_X.bin", test)
    write_stl10_x(folder / "unlabeled_X.bin", unlabeled)
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 3, 3]))
    (folder / "test_y.bin").write_bytes(bytes([2, 2, 7]))
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return {"train": train, "test": test, "unlabeled": unlabeled}


def save_image(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def random_rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # H x W x 3


# --------------------------------------------------------------------------------------------------------------------
# Registry and generic checks.


def test_registry_lists_datasets_splits_and_options():
    assert available_datasets() == ["cifar10", "cifar100", "fashion-mnist", "imagefolder", "stl10", "synthetic"]
    assert dataset_splits("stl10") == ["train", "test", "unlabeled", "train+unlabeled", "val", "train-minus-val"]
    assert dataset_splits("Fashion_MNIST") == ["train", "test", "val", "train-minus-val"]
    assert dataset_splits("imagefolder") == ["train", "val", "test", "train-minus-val"]
    assert set(dataset_options("synthetic")) == {"n", "channels", "num_classes", "seed", "nuisance"}
    assert dataset_options("cifar10") == {}


def test_generic_errors_are_one_line_data_errors(tmp_path):
    with raises_data_error("unknown dataset 'mnist'", "cifar10", "synthetic"):
        load_dataset("mnist")
    with raises_data_error("unknown dataset"):
        dataset_splits("nope")
    with raises_data_error("unknown split 'dev'", "train, test, val, train-minus-val"):
        load_dataset("synthetic", split="dev")
    with raises_data_error("unknown option data.options.shuffle", "n, channels, num_classes, seed"):
        load_dataset("synthetic", shuffle=True)
    with raises_data_error("unknown option data.options.channels", "valid options: none"):
        load_dataset("cifar10", root=tmp_path, channels=1)
    missing = tmp_path / "nowhere"
    for name in ("fashion-mnist", "cifar10", "cifar100", "stl10", "imagefolder"):
        with raises_data_error(f"dataset path {missing} does not exist", "data.root"):
            load_dataset(name, root=missing)
    with raises_data_error("image_size must be an integer"):
        load_dataset("synthetic", image_size=0)
    with raises_data_error("option n must be"):
        load_dataset("synthetic", n=0)
    with raises_data_error("option channels must be 1"):
        load_dataset("synthetic", channels=2)
    assert issubclass(DataError, ContrastkitError)


# --------------------------------------------------------------------------------------------------------------------
# ImageTensors.


def test_image_tensors_properties_subset_and_stats():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    data = ImageTensors(images, labels, ["a", "b", "c"], "toy")
    assert len(data) == 7 and data.channels == 3 and data.image_size == (5, 4) and data.num_classes == 3
    assert "n=7" in repr(data) and "3x5x4" in repr(data)

    sub = data.subset([4, 0, -1])
    assert torch.equal(sub.images, images[[4, 0, 6]]) and sub.labels.tolist() == [1, 0, 0]
    assert sub.classes == ["a", "b", "c"] and sub.images.is_contiguous()
    assert torch.equal(data.subset(labels == 2).images, images[[2, 5]])
    assert torch.equal(data.subset(range(1, 7, 2)).labels, labels[1:7:2])
    assert len(data.subset([])) == 0
    with pytest.raises(IndexError):
        data.subset([7])

    mean, std = data.channel_stats()
    x = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    # Chunked accumulation gives the same result as one chunk.
    chunks = list(data.iter_chunks(max_elements=100))
    assert sum(len(c) for c in chunks) == 7 and len(chunks) == 7

    with pytest.raises(ValueError):
        ImageTensors(images.float(), None, None, "bad")
    with pytest.raises(ValueError):
        ImageTensors(images, labels[:3], ["a", "b", "c"], "bad")


# --------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX).


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_idx_round_trip(tmp_path, gz):
    written = make_fashion_mnist(tmp_path, gz)
    for split, (images, labels) in written.items():
        data = load_dataset("fashion-mnist", root=tmp_path, split=split)
        assert data.images.shape == (len(images), 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)
        assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot" and len(data.classes) == 10
        assert data.name == f"fashion-mnist/{split}" and data.images.is_contiguous()
    resized = load_dataset("fashion-mnist", root=tmp_path, split="test", image_size=32)
    assert resized.images.shape == (3, 1, 32, 32) and resized.images.dtype == torch.uint8


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    make_fashion_mnist(raw, gz=False)
    assert len(load_dataset("fashion-mnist", root=tmp_path)) == 5


def test_fashion_mnist_bad_files(tmp_path):
    make_fashion_mnist(tmp_path, gz=True)
    images_gz = tmp_path / "train-images-idx3-ubyte.gz"
    good = images_gz.read_bytes()

    images_gz.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with raises_data_error(str(images_gz), "replace it"):
        load_dataset("fashion-mnist", root=tmp_path)

    raw = gzip.decompress(good)
    images_gz.write_bytes(gzip.compress(raw[:-100]))  # valid gzip, truncated IDX payload
    with raises_data_error(str(images_gz), "truncated", "replace the file"):
        load_dataset("fashion-mnist", root=tmp_path)

    images_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # wrong magic (1 dimension)
    with raises_data_error(str(images_gz), "magic number"):
        load_dataset("fashion-mnist", root=tmp_path)

    images_gz.write_bytes(b"not gzip at all")
    with raises_data_error(str(images_gz)):
        load_dataset("fashion-mnist", root=tmp_path)

    images_gz.write_bytes(good)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)  # 4 labels for 5 images
    with raises_data_error("5 images", "4 labels"):
        load_dataset("fashion-mnist", root=tmp_path)
    labels.unlink()
    with raises_data_error("train split incomplete", "train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    with raises_data_error(f"Fashion-MNIST not found at {empty}", "apt-get install dataset-fashion-mnist", "data.root"):
        load_dataset("fashion-mnist", root=empty)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package():
    start = time.perf_counter()
    train = load_dataset("fashion-mnist")  # default root
    test = load_dataset("fashion-mnist", split="test")
    elapsed = time.perf_counter() - start
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert elapsed < 5.0, f"loading Fashion-MNIST took {elapsed:.1f} s"


# --------------------------------------------------------------------------------------------------------------------
# CIFAR.


def test_cifar10_round_trip_from_parent_and_folder(tmp_path):
    written = make_cifar10(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        for split, (x, y) in written.items():
            data = load_dataset("cifar10", root=root, split=split)
            assert data.images.shape == (len(x), 3, 32, 32) and data.images.dtype == torch.uint8
            assert data.labels.tolist() == y.tolist() and data.classes[1] == "automobile"
            np.testing.assert_array_equal(data.images.numpy().reshape(len(x), -1), x)
    data = load_dataset("cifar10", root=tmp_path, split="test")
    # Pixel (row 0, column 1) of image 0: red at data[1], green at data[1024 + 1], blue at data[2048 + 1].
    x = written["test"][0]
    assert data.images[0, :, 0, 1].tolist() == [x[0, 1], x[0, 1025], x[0, 2049]]
    assert load_dataset("cifar10", root=tmp_path, image_size=16).images.shape == (10, 3, 16, 16)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    x_train, x_test = cifar_images(rng, 4), cifar_images(rng, 2)
    write_pickle(folder / "train", {"data": x_train, "fine_labels": [0, 99, 5, 42], "coarse_labels": [0, 19, 1, 2]})
    write_pickle(folder / "test", {"data": x_test, "fine_labels": [7, 8], "coarse_labels": [3, 4]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    train = load_dataset("cifar100", root=tmp_path)
    assert train.labels.tolist() == [0, 99, 5, 42] and len(train.classes) == 100 and train.classes[99] == "f99"
    np.testing.assert_array_equal(train.images.numpy().reshape(4, -1), x_train)
    assert load_dataset("CIFAR-100", root=folder, split="test").labels.tolist() == [7, 8]


def test_cifar_errors(tmp_path):
    with raises_data_error(f"CIFAR-10 not found at {tmp_path}", "cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with raises_data_error("train split incomplete", "data_batch_3"):
        load_dataset("cifar10", root=tmp_path)

    class Evil:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with raises_data_error(str(folder / "test_batch"), "refusing to load global"):
        load_dataset("cifar10", root=tmp_path, split="test")
    (folder / "test_batch").write_bytes(b"\x80\x02}q")  # truncated pickle
    with raises_data_error(str(folder / "test_batch"), "corrupt"):
        load_dataset("cifar10", root=tmp_path, split="test")


# --------------------------------------------------------------------------------------------------------------------
# STL-10.


def test_stl10_column_major_transpose_and_splits(tmp_path):
    written = make_stl10(tmp_path / "stl10_binary")
    # The file stores each channel column by column: its second byte is pixel (h=1, w=0) of channel 0.
    raw = (tmp_path / "stl10_binary" / "train_X.bin").read_bytes()
    assert raw[1] == written["train"][0, 0, 1, 0] != written["train"][0, 0, 0, 1]

    train = load_dataset("stl10", root=tmp_path)
    assert train.images.shape == (4, 3, 96, 96) and train.images.is_contiguous() and not train.memory_mapped
    np.testing.assert_array_equal(train.images.numpy(), written["train"])
    assert train.labels.tolist() == [0, 9, 2, 2] and train.classes == [f"class{i}" for i in range(10)]

    test = load_dataset("stl10", root=tmp_path / "stl10_binary", split="test")
    np.testing.assert_array_equal(test.images.numpy(), written["test"])
    assert test.labels.tolist() == [1, 1, 6]

    # Default: train + unlabeled converted once into a cached .npy; both splits are contiguous memory-mapped views.
    unlabeled = load_dataset("stl10", root=tmp_path, split="unlabelled")
    assert unlabeled.labels is None and unlabeled.classes is None and unlabeled.memory_mapped
    assert unlabeled.images.shape == (5, 3, 96, 96) and unlabeled.images.is_contiguous()
    np.testing.assert_array_equal(unlabeled.images.numpy(), written["unlabeled"])
    cached = sorted((tmp_path / ".contrastkit-cache").glob("stl10-*.images.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    both = load_dataset("stl10", root=tmp_path, split="train+unlabeled")
    assert both.labels is None and both.images.shape == (9, 3, 96, 96) and both.images.is_contiguous()
    assert both.memory_mapped and cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(both.images.numpy(), np.concatenate([written["train"], written["unlabeled"]]))
    mean, _ = unlabeled.channel_stats()
    np.testing.assert_allclose(mean, written["unlabeled"].mean(axis=(0, 2, 3)) / 255, rtol=1e-12)
    small = load_dataset("stl10", root=tmp_path, split="unlabeled", image_size=32)
    assert small.images.shape == (5, 3, 32, 32) and not small.memory_mapped

    # Replacing a source file makes a new cache and deletes the old one.
    write_stl10_x(tmp_path / "stl10_binary" / "unlabeled_X.bin", written["unlabeled"][:2])
    assert len(load_dataset("stl10", root=tmp_path, split="unlabeled")) == 2
    assert len(list((tmp_path / ".contrastkit-cache").glob("stl10-*.images.npy"))) == 1

    # cache=False: a strided view of unlabeled_X.bin itself; train+unlabeled copied into memory.
    view = load_dataset("stl10", root=tmp_path, split="unlabeled", cache=False)
    assert view.memory_mapped and not view.images.is_contiguous()
    np.testing.assert_array_equal(view.images.numpy(), written["unlabeled"][:2])
    copied = load_dataset("stl10", root=tmp_path, split="train+unlabeled", cache=False)
    assert copied.images.is_contiguous() and not copied.memory_mapped
    np.testing.assert_array_equal(copied.images.numpy(), np.concatenate([written["train"], written["unlabeled"][:2]]))
    with raises_data_error("option cache must be true or false"):
        load_dataset("stl10", root=tmp_path, split="unlabeled", cache="yes")


def test_stl10_errors(tmp_path):
    folder = tmp_path / "stl10_binary"
    make_stl10(folder)
    with open(folder / "test_X.bin", "r+b") as f:
        f.truncate(3 * 96 * 96 * 2 + 100)
    with raises_data_error(str(folder / "test_X.bin"), "truncated"):
        load_dataset("stl10", root=tmp_path, split="test")
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with raises_data_error(str(folder / "train_y.bin"), "3 labels for 4 images"):
        load_dataset("stl10", root=tmp_path)
    (folder / "unlabeled_X.bin").unlink()
    with raises_data_error("unlabeled split incomplete", "unlabeled_X.bin"):
        load_dataset("stl10", root=tmp_path, split="unlabeled")
    with raises_data_error(f"STL-10 not found at {folder / 'train_X.bin'}"):
        load_dataset("stl10", root=folder / "train_X.bin")


# --------------------------------------------------------------------------------------------------------------------
# Image folders.


def cache_files(root: Path) -> list[str]:
    cache = root / ".contrastkit-cache"
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_imagefolder_labelled_round_trip_and_cache(tmp_path, monkeypatch):
    a0, a1, b0 = random_rgb(0), random_rgb(1), random_rgb(2)
    save_image(tmp_path / "cat" / "0.png", a0)
    save_image(tmp_path / "cat" / "nested" / "1.PNG", a1)
    save_image(tmp_path / "dog" / "0.png", b0)
    save_image(tmp_path / "dog" / "1.jpg", random_rgb(3, 16, 24), quality=95)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "dog" / ".hidden.png", random_rgb(4))  # ignored
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")  # a symlink loop is walked once

    data = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8 and data.memory_mapped
    # PNG at the target size is stored exactly (order: sorted paths, cat/0.png before cat/nested/1.PNG).
    np.testing.assert_array_equal(data.images[0].permute(1, 2, 0).numpy(), a0)
    np.testing.assert_array_equal(data.images[1].permute(1, 2, 0).numpy(), a1)
    np.testing.assert_array_equal(data.images[2].permute(1, 2, 0).numpy(), b0)
    files = cache_files(tmp_path)
    assert len([f for f in files if f.endswith(".images.npy")]) == 1
    assert len([f for f in files if f.endswith(".labels.npy")]) == 1 and not [f for f in files if f.endswith(".tmp")]

    # Second load reads the cache and decodes nothing.
    def no_decode(*args, **kwargs):
        raise AssertionError("image decoded although cached")

    monkeypatch.setattr(Image, "open", no_decode)
    again = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert again.classes == data.classes
    # A different size or channel count is a different cache entry (and so needs decoding).
    with pytest.raises(DataError, match="cannot decode image"):
        load_dataset("imagefolder", root=tmp_path, image_size=9)
    monkeypatch.undo()

    # Adding a file invalidates the cache; the stale entry is removed.
    save_image(tmp_path / "dog" / "2.png", random_rgb(5))
    grown = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert len(grown) == 5 and grown.labels.tolist() == [0, 0, 1, 1, 1]
    assert cache_files(tmp_path) != files and len([f for f in cache_files(tmp_path) if f.endswith(".images.npy")]) == 1

    grey = load_dataset("imagefolder", root=tmp_path, image_size=8, channels=1, workers=0)
    assert grey.images.shape == (5, 1, 8, 8)
    expected = np.asarray(Image.fromarray(a0).convert("L"))
    np.testing.assert_array_equal(grey.images[0, 0].numpy(), expected)


def test_imagefolder_flat_splits_resize_and_cache_dir(tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    # 50 x 10 image: red | green (30 px) | blue -> shorter side 10, the center crop (and the support of the
    # resampling filter around it) lies in the green part.
    wide = np.zeros((10, 50, 3), np.uint8)
    wide[:, :10, 0] = wide[:, 10:40, 1] = wide[:, 40:, 2] = 255
    save_image(flat / "wide.png", wide)
    save_image(flat / "small.bmp", random_rgb(0, 5, 5))
    data = load_dataset("imagefolder", root=flat, image_size=4)
    assert data.labels is None and data.classes is None and data.images.shape == (2, 3, 4, 4)
    assert data.images[1].permute(1, 2, 0).reshape(-1, 3).tolist() == [[0, 255, 0]] * 16
    with raises_data_error("no class folders and no val/ sub-folder", "split=train"):
        load_dataset("imagefolder", root=flat, split="val")
    with raises_data_error("no train/val/test sub-folders", "split=train"):
        load_dataset("imagefolder", root=flat, split="test")

    split_root = tmp_path / "splits"
    save_image(split_root / "train" / "x" / "0.png", random_rgb(1))
    save_image(split_root / "train" / "y" / "0.png", random_rgb(2))
    save_image(split_root / "val" / "y" / "0.png", random_rgb(3))
    save_image(split_root / "val" / "z" / "0.png", random_rgb(4))
    train = load_dataset("imagefolder", root=split_root, split="train", image_size=8)
    assert train.labels.tolist() == [0, 1] and train.classes == ["x", "y", "z"]
    val = load_dataset("imagefolder", root=split_root, split="validation", image_size=8)
    assert val.labels.tolist() == [1, 2] and val.classes == ["x", "y", "z"] and val.name == "imagefolder/val"
    with raises_data_error("split 'test' not found", "train, val"):
        load_dataset("imagefolder", root=split_root, split="test")

    elsewhere = tmp_path / "cache"
    load_dataset("imagefolder", root=flat, image_size=6, cache_dir=elsewhere)
    assert [p.name for p in elsewhere.iterdir() if p.name.endswith(".images.npy")]

    # An unwritable root falls back to $XDG_CACHE_HOME/contrastkit.
    real = data_cache.writable_dir
    monkeypatch.setattr(data_cache, "writable_dir", lambda p: False if ".contrastkit-cache" in str(p) else real(p))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset("imagefolder", root=flat, image_size=7)
    assert list((tmp_path / "xdg" / "contrastkit" / "imagefolder").glob("*.images.npy"))


def test_imagefolder_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with raises_data_error(f"no images found in {empty}", ".jpg"):
        load_dataset("imagefolder", root=empty)
    with raises_data_error("needs a folder", "data.root"):
        load_dataset("imagefolder")

    root = tmp_path / "bad"
    save_image(root / "a" / "0.png", random_rgb(0))
    bad = root / "a" / "1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with raises_data_error(f"cannot decode image {bad}", "remove or replace the file"):
        load_dataset("imagefolder", root=root, image_size=8)
    good_jpeg = save_image(root / "a" / "1.jpg", random_rgb(1, 64, 64), quality=90).read_bytes()
    bad.write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated JPEG
    with raises_data_error(f"cannot decode image {bad}"):
        load_dataset("imagefolder", root=root, image_size=8)
    assert not [f for f in cache_files(root) if f.endswith((".npy", ".json", ".tmp"))]

    bad.unlink()
    save_image(root / "loose.png", random_rgb(2))
    with raises_data_error("both class folders and loose images", "loose.png"):
        load_dataset("imagefolder", root=root)
    (root / "loose.png").unlink()
    with raises_data_error("option channels must be 1"):
        load_dataset("imagefolder", root=root, channels=2)

    # An interrupted decode (Ctrl-C) leaves no cache and no temporary file behind.
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefolder_module, "_decode", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("imagefolder", root=root, image_size=8, workers=0)
    assert cache_files(root) == []


def png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (``array`` H x W x C uint16, C = 1, 2, 3 or 4): Pillow cannot write 16-bit RGB."""
    h, w, c = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_imagefolder_every_pillow_mode_converts_or_is_refused(tmp_path):
    # Each file is one uniform colour, so resizing keeps it; the decoded pixel must be the colour in 8 bits.
    rgb = Image.new("RGB", (8, 8), (200, 100, 50))
    grey = 124  # what Pillow's RGB -> L gives for (200, 100, 50)
    root = tmp_path / "modes"
    root.mkdir()
    expected: dict[str, tuple[list[int], int]] = {}  # file -> (RGB value, tolerance)

    def add(name: str, image: Image.Image, value: list[int], tol: int = 0, **kwargs) -> None:
        image.save(root / name, **kwargs)
        expected[name] = (value, tol)

    add("01-mode1.png", Image.new("1", (8, 8), 1), [255] * 3)
    add("02-L.png", rgb.convert("L"), [grey] * 3)
    add("03-P.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), [200, 100, 50])
    add("04-P-transparency.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE), [200, 100, 50], transparency=0)
    add("05-RGBA.png", Image.new("RGBA", (8, 8), (200, 100, 50, 10)), [200, 100, 50])
    add("06-LA.png", Image.new("LA", (8, 8), (grey, 10)), [grey] * 3)
    add("07-PA.tif", rgb.convert("P", palette=Image.Palette.ADAPTIVE).convert("PA"), [200, 100, 50])
    add("08-CMYK.tif", rgb.convert("CMYK"), [200, 100, 50])
    add("09-CMYK.jpg", rgb.convert("CMYK"), [200, 100, 50], tol=2, quality=100)
    add("10-YCbCr.tif", rgb.convert("YCbCr"), [200, 100, 50], tol=2)
    add("11-LAB.tif", rgb.convert("LAB"), [200, 100, 50], tol=2)
    # 16-bit greyscale: Pillow modes I;16 (PNG), I;16B (TIFF) and I (PGM with maxval 65535): v / 257, not clipped
    sixteen = np.full((8, 8), 40000, np.uint16)
    add("12-I16.png", Image.fromarray(sixteen), [round(40000 / 257)] * 3)
    add("13-I16B.tif", Image.frombytes("I;16B", (8, 8), sixteen.astype(">u2").tobytes()), [round(40000 / 257)] * 3)
    (root / "14-16bit.pgm").write_bytes(b"P5 8 8 65535\n" + sixteen.astype(">u2").tobytes())
    expected["14-16bit.pgm"] = ([round(40000 / 257)] * 3, 0)
    # 16-bit RGB / grey+alpha PNGs: Pillow keeps the high byte (v >> 8), within 1 of v / 257
    png16(root / "15-RGB16.png", np.full((8, 8, 3), [1000, 30000, 65535], np.uint16))
    expected["15-RGB16.png"] = ([round(1000 / 257), round(30000 / 257), 255], 1)
    png16(root / "16-LA16.png", np.full((8, 8, 2), [30000, 5000], np.uint16))
    expected["16-LA16.png"] = ([round(30000 / 257)] * 3, 1)

    for name, _ in expected.items():
        assert Image.open(root / name).mode  # every file opens
    modes = {n: Image.open(root / n).mode for n in expected}
    assert {modes["12-I16.png"], modes["13-I16B.tif"], modes["14-16bit.pgm"]} == {"I;16", "I;16B", "I"}, modes
    data = load_dataset("imagefolder", root=root, image_size=4, workers=0)
    assert data.images.shape == (len(expected), 3, 4, 4)
    for i, (name, (value, tol)) in enumerate(sorted(expected.items())):
        pixels = data.images[i].reshape(3, -1).int()  # 3 x 16
        assert (pixels - torch.tensor(value)[:, None]).abs().max() <= tol, (name, modes[name], pixels[:, 0].tolist())
    grey_data = load_dataset("imagefolder", root=root, image_size=4, channels=1, workers=0)
    assert grey_data.images[sorted(expected).index("12-I16.png")].unique().tolist() == [round(40000 / 257)]

    # 32-bit integer (I) and float (F) images have no known range: refused, naming the file and the mode.
    for mode, array in (("I", np.full((8, 8), 70000, np.int32)), ("F", np.full((8, 8), 0.5, np.float32))):
        folder = tmp_path / f"mode-{mode}"
        save_image(folder / "ok.png", random_rgb(0))
        bad = save_image(folder / "deep.tif", array)
        assert Image.open(bad).mode == mode
        with raises_data_error(f"image {bad} has Pillow mode {mode}", "8- or 16-bit"):
            load_dataset("imagefolder", root=folder, image_size=4, workers=0)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic.


def cosine_knn_accuracy(train: ImageTensors, test: ImageTensors, k: int = 1) -> float:
    a = train.images.flatten(1).float()
    b = test.images.flatten(1).float()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    neighbours = (b @ a.T).topk(k, dim=1).indices  # N_test x k
    votes = torch.nn.functional.one_hot(train.labels[neighbours], len(train.classes)).sum(dim=1)
    return float((votes.argmax(dim=1) == test.labels).float().mean())


@pytest.fixture
def one_torch_thread():
    """Run single-threaded: on a small shared CPU, torch's thread pool contends with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_deterministic_balanced_and_hard_for_raw_pixels(one_torch_thread):
    start = time.perf_counter()
    train = load_dataset("synthetic")
    elapsed = time.perf_counter() - start
    test = load_dataset("synthetic", split="test")
    assert train.images.shape == (2048, 3, 32, 32) and test.images.shape == (512, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert len(train.classes) == 10 and len(set(train.classes)) == 10
    assert torch.bincount(train.labels).tolist() == [205] * 8 + [204] * 2  # 2048 = 10 * 204 + 8
    assert torch.bincount(test.labels, minlength=10).max() - torch.bincount(test.labels).min() <= 1
    assert elapsed < 5.0  # typically ~0.2 s; generous for a shared CPU

    small = load_dataset("synthetic", n=256)
    again = load_dataset("synthetic", n=256)
    assert torch.equal(again.images, small.images) and torch.equal(again.labels, small.labels)
    other = load_dataset("synthetic", n=256, seed=1)
    assert not torch.equal(other.images, small.images) and not torch.equal(other.labels, small.labels)
    small_test = load_dataset("synthetic", split="test", n=256)
    assert not torch.equal(small_test.images, small.images)

    # Raw pixels are a poor representation (nuisance position/colour/background), yet better than chance.
    accuracy = cosine_knn_accuracy(train, test, k=1)
    assert 0.1 < accuracy < 0.6, accuracy
    assert cosine_knn_accuracy(train, test, k=10) < 0.6


def test_synthetic_options(one_torch_thread):
    grey = load_dataset("synthetic", n=40, channels=1, image_size=20, num_classes=20, seed=3)
    assert grey.images.shape == (40, 1, 20, 20) and grey.labels.tolist().count(19) == 2
    assert grey.classes[19] == "6-lobe/rings"
    with raises_data_error("option num_classes must be an integer in 1..20"):
        load_dataset("synthetic", num_classes=21)
