"""Tests for stepdiff.image_data: the digits split and upsampling, and the MNIST / Fashion-MNIST
IDX and CIFAR-10 pickle loaders on small files written here in the exact on-disk layouts."""

import gzip
import math
import pickle
import struct

import numpy as np
import pytest
import torch

from stepdiff import data as D
from stepdiff import image_data as I

# --- digits -----------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, held = I.digits_split()
    assert len(train) == 1497 and len(held) == 300
    assert train.dtype == torch.int64 and torch.all(train[1:] > train[:-1]) and torch.all(held[1:] > held[:-1])
    both = torch.cat([train, held])
    assert torch.equal(torch.sort(both).values, torch.arange(1797))  # disjoint and complete
    _, labels, _ = I.load_digits()
    held_counts = torch.bincount(labels[held], minlength=10)
    train_counts = torch.bincount(labels[train], minlength=10)
    assert torch.all(held_counts == I.DIGITS_HELDOUT_PER_CLASS)
    assert torch.all(train_counts >= 140)  # every class in both parts
    # The same split every time; another seed gives another (still stratified) split.
    t2, h2 = I.digits_split()
    assert torch.equal(train, t2) and torch.equal(held, h2)
    _, h_other = I.digits_split(seed=1)
    assert not torch.equal(held, h_other)
    assert torch.all(torch.bincount(labels[h_other], minlength=10) == 30)
    with pytest.raises(ValueError, match="seed"):
        I.digits_split(seed=-1)


def test_load_digits_splits_select_the_same_images():
    all_x, all_y, classes = I.load_digits()
    train, held = I.digits_split()
    tx, ty, _ = I.load_digits("train")
    hx, hy, _ = I.load_digits("heldout")
    assert torch.equal(tx, all_x[train]) and torch.equal(ty, all_y[train])
    assert torch.equal(hx, all_x[held]) and torch.equal(hy, all_y[held])
    assert classes == [str(c) for c in range(10)]
    # data.load_digits is the same function (kept for existing imports).
    assert D.load_digits is I.load_digits and D.ImageSet is I.ImageSet


def _keys_bicubic_matrix(n_in: int, scale: int) -> np.ndarray:
    """Upsampling matrix of cubic convolution (Keys, a = -0.75), half-pixel centres, edges clamped."""
    a = -0.75

    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    m = np.zeros((n_in * scale, n_in))
    for o in range(n_in * scale):
        x = (o + 0.5) / scale - 0.5
        i0 = math.floor(x)
        for i in range(i0 - 1, i0 + 3):
            m[o, min(max(i, 0), n_in - 1)] += w(x - i)
    return m


def test_digits_16_is_clipped_bicubic_upsampling():
    x8, y8, _ = I.load_digits(size=8)
    x16, y16, _ = I.load_digits(size=16)
    assert x16.shape == (1797, 1, 16, 16) and x16.dtype == torch.float32 and torch.equal(y8, y16)
    assert float(x16.min()) == -1.0 and float(x16.max()) == 1.0
    W = _keys_bicubic_matrix(8, 2)
    p = (x8[:, 0].double().numpy() + 1) * 8  # back to 0..16
    ref = np.clip(W @ p @ W.T, 0, 16) / 8 - 1
    assert np.abs(ref - x16[:, 0].double().numpy()).max() < 1e-5
    # The split applies at 16x16 too.
    h16, _, _ = I.load_digits("heldout", size=16)
    assert torch.equal(h16, x16[I.digits_split()[1]])


def test_load_digits_errors():
    with pytest.raises(ValueError, match="split"):
        I.load_digits("test")
    with pytest.raises(ValueError, match="size"):
        I.load_digits(size=32)


# --- IDX files (MNIST, Fashion-MNIST) ---------------------------------------------------------

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX layout: 00 00 <type> <ndim>, big-endian uint32 sizes, big-endian data."""
    code = IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, gz=False):
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist(folder, split, images, labels, gz=False, dotted=False):
    prefix = "train" if split == "train" else "t10k"
    sep = "." if dotted else "-"
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}", images, gz)
    write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, gz)


def test_idx_header_layout_is_the_mnist_one():
    raw = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    assert raw[:4] == b"\x00\x00\x08\x03"  # MNIST images: magic 2051
    assert int.from_bytes(raw[:4], "big") == 2051 and int.from_bytes(raw[4:8], "big") == 3
    assert int.from_bytes(idx_bytes(np.zeros(3, dtype=np.uint8))[:4], "big") == 2049  # labels


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((5, 3, 7)) * 50).astype(dtype)
    write_idx(tmp_path / "a.idx", a, gz)
    b = I.read_idx(tmp_path / "a.idx")
    assert b.dtype == np.dtype(dtype) and b.shape == (5, 3, 7) and np.array_equal(a, b)


def test_load_mnist_reads_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    tr_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    tr_x[0, 0, :3] = [0, 51, 255]
    tr_y = rng.integers(0, 10, 7).astype(np.uint8)
    te_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    te_y = np.array([9, 0, 4], dtype=np.uint8)
    write_mnist(tmp_path, "train", tr_x, tr_y, gz=True)
    write_mnist(tmp_path, "test", te_x, te_y, gz=False)
    images, labels, classes = I.load_mnist(tmp_path, "train")
    assert images.shape == (7, 1, 28, 28) and images.dtype == torch.float32
    assert torch.allclose(images[0, 0, 0, :3], torch.tensor([-1.0, -0.6, 1.0]))
    assert torch.equal(images[:, 0], torch.from_numpy(tr_x).float() / 127.5 - 1)
    assert labels.dtype == torch.int64 and labels.tolist() == tr_y.tolist()
    assert classes == [str(c) for c in range(10)]
    images, labels, _ = I.load_mnist(tmp_path, "test", pad=2)
    assert images.shape == (3, 1, 32, 32) and labels.tolist() == [9, 0, 4]
    assert torch.all(images[:, :, :2] == -1) and torch.all(images[:, :, :, -2:] == -1)
    assert torch.equal(images[:, 0, 2:-2, 2:-2], torch.from_numpy(te_x).float() / 127.5 - 1)


def test_load_fashion_mnist_in_torchvision_layout_with_dotted_names(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    x = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    write_mnist(raw, "train", x, np.array([0, 9], dtype=np.uint8), dotted=True)
    images, labels, classes = I.load_fashion_mnist(tmp_path)
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot" and len(classes) == 10
    assert labels.tolist() == [0, 9] and torch.equal(images[:, 0], torch.from_numpy(x).float() / 127.5 - 1)


def test_mnist_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        I.load_mnist(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        I.load_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        I.load_mnist(tmp_path, "validation")
    x, y = np.zeros((4, 28, 28), dtype=np.uint8), np.zeros(4, dtype=np.uint8)
    # Mismatched counts.
    write_mnist(tmp_path, "train", x, y[:3])
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        I.load_mnist(tmp_path)
    # A wrong magic number.
    write_mnist(tmp_path, "train", x, y)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0] = 0x1F
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="wrong magic number 0x1F000803"):
        I.load_mnist(tmp_path)
    raw[0], raw[2] = 0, 0x07  # unknown type code
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="wrong magic number"):
        I.read_idx(path)
    # A truncated file, and one with trailing bytes.
    write_mnist(tmp_path, "train", x, y)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="header says shape"):
        I.load_mnist(tmp_path)
    path.write_bytes(idx_bytes(x) + b"\x00")
    with pytest.raises(ValueError, match="header says shape"):
        I.load_mnist(tmp_path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        I.read_idx(path)
    # Wrong types and shapes, out-of-range labels, corrupt gzip.
    write_mnist(tmp_path, "train", x, y.astype(np.int32))
    with pytest.raises(ValueError, match="uint8 labels"):
        I.load_mnist(tmp_path)
    write_mnist(tmp_path, "train", x.reshape(4, -1), y)
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W\]"):
        I.load_mnist(tmp_path)
    write_mnist(tmp_path, "train", x, np.array([0, 1, 2, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match="label 10 out of range"):
        I.load_mnist(tmp_path)
    write_mnist(tmp_path, "train", x, y)
    path.write_bytes(gzip.compress(idx_bytes(x))[:30])
    with pytest.raises(ValueError, match="corrupt gzip"):
        I.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError):
        I.read_idx(tmp_path / "nothing.idx")
    write_mnist(tmp_path, "train", x, y)
    with pytest.raises(ValueError, match="pad"):
        I.load_mnist(tmp_path, pad=-1)


# --- CIFAR-10 pickles -------------------------------------------------------------------------


def write_cifar_batch(path, images, labels, protocol=2, bytes_keys=True):
    """The python version's layout: a dict with uint8 data [N, 3072] (R, G, B planes) and labels."""
    d = {
        "batch_label": "testing batch",
        "labels": [int(v) for v in labels],
        "data": images.reshape(len(images), 3072),
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def test_load_cifar10_train_and_test(tmp_path):
    rng = np.random.default_rng(2)
    batches = []
    for i in range(1, 6):
        x = rng.integers(0, 256, (i + 1, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, i + 1)
        write_cifar_batch(tmp_path / f"data_batch_{i}", x, y, protocol=2 if i % 2 else 4, bytes_keys=i != 3)
        batches.append((x, y))
    test_x = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    test_x[:, 0], test_x[:, 1], test_x[:, 2] = 255, 0, 51  # one colour per plane: R, G, B
    write_cifar_batch(tmp_path / "test_batch", test_x, [3, 8], protocol=5)
    images, labels, classes = I.load_cifar10(tmp_path)
    assert images.shape == (2 + 3 + 4 + 5 + 6, 3, 32, 32) and images.dtype == torch.float32
    want = np.concatenate([b[0] for b in batches])
    assert torch.equal(images, torch.from_numpy(want).float() / 127.5 - 1)
    assert labels.tolist() == np.concatenate([b[1] for b in batches]).tolist()
    assert classes == list(I.CIFAR10_CLASSES)
    images, labels, _ = I.load_cifar10(tmp_path, "test")
    assert labels.tolist() == [3, 8]
    assert torch.all(images[:, 0] == 1) and torch.all(images[:, 1] == -1)
    assert torch.allclose(images[:, 2], torch.tensor(-0.6))


def test_load_cifar10_reads_the_extracted_folder_and_meta(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "test_batch", np.zeros((1, 3, 32, 32), dtype=np.uint8), [0])
    names = [f"class{c}".encode() for c in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    _, _, classes = I.load_cifar10(tmp_path, "test")
    assert classes == [f"class{c}" for c in range(10)]


def test_cifar10_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        I.load_cifar10(tmp_path / "absent")
    x = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    for i in (1, 2, 4, 5):
        write_cifar_batch(tmp_path / f"data_batch_{i}", x, [0, 1])
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        I.load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="split"):
        I.load_cifar10(tmp_path, "val")
    path = tmp_path / "test_batch"
    write_cifar_batch(path, x, [0, 1, 2])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        I.load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        I.load_cifar10(tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="no 'labels' entry"):
        I.load_cifar10(tmp_path, "test")
    write_cifar_batch(path, x, [0, 10])
    with pytest.raises(ValueError, match="labels must be integers 0..9"):
        I.load_cifar10(tmp_path, "test")
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python pickle"):
        I.load_cifar10(tmp_path, "test")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        I.load_cifar10(tmp_path, "test")
