r"""Image data that needs no download, and loaders for image data a user already has on disk.

Every loader returns an {class}`ImageSet`: ``images [N, C, H, W]`` float32 in $[-1, 1]$
(an 8-bit pixel $u$ becomes $u/127.5 - 1$), ``labels [N]`` int64, and the class names.

- {func}`load_digits`: scikit-learn's 8x8 handwritten digits (installed with scikit-learn),
  at 8x8 or upsampled to 16x16, all 1797 images or a fixed stratified split into
  training (1497) and held-out (300) images ({func}`digits_split`).
- {func}`load_mnist`, {func}`load_fashion_mnist`: the IDX files of MNIST / Fashion-MNIST
  (gzipped or not), read by {func}`read_idx`.
- {func}`load_cifar10`: the CIFAR-10 "python version" pickles (``data_batch_1`` ...
  ``data_batch_5``, ``test_batch``), read without executing anything they might contain.
- {func}`load_image_folder`: any folder of image files, read with Pillow.

Nothing here is downloaded and nothing is written to disk.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageSet",
    "load_digits",
    "digits_split",
    "DIGITS_SPLIT_SEED",
    "DIGITS_HELDOUT_PER_CLASS",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "MNIST_CLASSES",
    "FASHION_MNIST_CLASSES",
    "load_cifar10",
    "CIFAR10_CLASSES",
    "load_image_folder",
    "IMAGE_EXTENSIONS",
]

f32 = torch.float32


class ImageSet(NamedTuple):
    """Images ``[N, C, H, W]`` (float32 in $[-1, 1]$), labels ``[N]`` (int64), class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]


def _uint8_images(pixels: np.ndarray) -> Tensor:
    """uint8 ``[N, C, H, W]`` to float32 $u/127.5 - 1$."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(f32) / 127.5 - 1.0


def _check_split(split: str, options: tuple[str, ...]) -> str:
    if split not in options:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(options)}")
    return split


# --- digits -----------------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0
DIGITS_HELDOUT_PER_CLASS = 30


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images, target = bunch.images.astype(np.float64), bunch.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def digits_split(seed: int = DIGITS_SPLIT_SEED) -> tuple[Tensor, Tensor]:
    r"""The fixed stratified split of the 1797 digits: ``(train, heldout)`` index tensors.

    Within each class the images are ordered by $\mathrm{SHA256}(\text{seed}:\text{index})$ and
    the first {data}`DIGITS_HELDOUT_PER_CLASS` (30) are held out: 300 held-out images (30 per
    digit) and 1497 training images (148 to 153 per digit), disjoint, each index tensor sorted
    (scikit-learn's order). A hash, not a random generator, so the split is the same on every
    machine and library version.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    _, target = _sklearn_digits()
    held = []
    for c in range(10):
        members = np.flatnonzero(target == c)
        keys = [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in members]
        order = sorted(range(len(members)), key=keys.__getitem__)
        held.extend(int(members[j]) for j in order[:DIGITS_HELDOUT_PER_CLASS])
    is_held = np.zeros(len(target), dtype=bool)
    is_held[held] = True
    return torch.from_numpy(np.flatnonzero(~is_held)), torch.from_numpy(np.flatnonzero(is_held))


def load_digits(split: str = "all", size: int = 8) -> ImageSet:
    r"""scikit-learn's 8x8 handwritten digits (10 classes, labels $0..9$), no download needed.

    The pixels are integers $p \in 0..16$ and become $x = p/8 - 1 \in [-1, 1]$, one channel.

    - ``split``: ``"all"`` (1797 images, scikit-learn's order), ``"train"`` (1497) or
      ``"heldout"`` (300, 30 per class): the fixed split of {func}`digits_split`.
    - ``size``: 8, or 16: the 17-level intensities upsampled by 2 with bicubic interpolation
      (PyTorch's ``interpolate``, half-pixel centres, $a = -0.75$), clipped back to $[0, 16]$
      (bicubic overshoots at strokes), then scaled the same way.

    Shape ``[N, 1, size, size]``, float32.
    """
    _check_split(split, ("all", "train", "heldout"))
    if size not in (8, 16) or isinstance(size, bool):
        raise ValueError(f"size must be 8 or 16; got {size!r}")
    images, target = _sklearn_digits()
    p = torch.from_numpy(images.copy())[:, None]  # float64 [1797, 1, 8, 8]
    labels = torch.from_numpy(target.copy())
    if size == 16:
        p = F.interpolate(p, scale_factor=2, mode="bicubic", align_corners=False).clamp(0.0, 16.0)
    x = (p / 8.0 - 1.0).to(f32)
    if split != "all":
        train, held = digits_split()
        keep = train if split == "train" else held
        x, labels = x[keep], labels[keep]
    return ImageSet(x.contiguous(), labels, [str(c) for c in range(10)])


# --- MNIST and Fashion-MNIST (IDX files) ------------------------------------------------------

MNIST_CLASSES = tuple(str(c) for c in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX type codes (the third byte of the magic number) and their big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it starts with the gzip signature."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    r"""Read one IDX file (the format of MNIST and Fashion-MNIST), gzipped or raw.

    Layout: a 4-byte magic number ``00 00 TT DD`` (``TT`` the type code: ``08`` uint8, ``09``
    int8, ``0B`` int16, ``0C`` int32, ``0D`` float32, ``0E`` float64; ``DD`` the number of
    dimensions), then ``DD`` sizes as big-endian uint32, then the data, big-endian, row-major.
    Raises ``ValueError`` naming the file for a wrong magic number or a data size that does not
    match the header, ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: wrong magic number 0x{magic:08X}; an IDX file starts with 00 00, a type code, ndim")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: header of {ndim} dimensions is cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    """``stem`` in ``root`` or ``root/raw``, with ``-idx`` or ``.idx`` and an optional ``.gz``."""
    alt = stem.replace("-idx", ".idx")
    candidates = [d / f"{s}{gz}" for d in (root, root / "raw") for s in (stem, alt) for gz in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no {stem} (or {stem}.gz) in {root} or {root / 'raw'}")


def _load_idx_pair(root: str | Path, split: str, classes: tuple[str, ...], pad: int) -> ImageSet:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    prefix = {"train": "train", "test": "t10k"}[_check_split(split, ("train", "test"))]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer; got {pad!r}")
    image_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images [N, H, W]; got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_path}: expected uint8 labels [N]; got {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(classes):
        raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0..{len(classes) - 1}")
    x = _uint8_images(images[:, None])
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), list(classes))


def load_mnist(root: str | Path, split: str = "train", *, pad: int = 0) -> ImageSet:
    r"""MNIST from its IDX files in ``root`` (or ``root/raw``, torchvision's layout).

    Files: ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``split="train"``,
    60 000 images) or ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (``"test"``,
    10 000), each optionally gzipped (``.gz``). Shape ``[N, 1, 28 + 2 pad, 28 + 2 pad]``: ``pad``
    adds background ($-1$) on every side (``pad=2`` gives 32x32). Labels $0..9$.
    """
    return _load_idx_pair(root, split, MNIST_CLASSES, pad)


def load_fashion_mnist(root: str | Path, split: str = "train", *, pad: int = 0) -> ImageSet:
    """Fashion-MNIST: the same files and layout as {func}`load_mnist`; classes
    {data}`FASHION_MNIST_CLASSES`."""
    return _load_idx_pair(root, split, FASHION_MNIST_CLASSES, pad)


# --- CIFAR-10 (python pickles) ----------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The only globals a CIFAR-10 pickle (written by Python 2 or 3, NumPy 1 or 2) refers to.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and NumPy arrays, and refuses anything else, so a
    tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python pickle ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict; got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(d)})")
    data, labels = d["data"], np.asarray(d["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072] (3 x 32 x 32); got {got}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be integers 0..9")
    return data, labels.astype(np.int64)


def load_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    r"""CIFAR-10 from its python pickles in ``root`` (or ``root/cifar-10-batches-py``).

    ``split="train"`` reads ``data_batch_1`` ... ``data_batch_5`` (50 000 images, all five
    needed), ``"test"`` reads ``test_batch`` (10 000). Each is a pickled dict whose ``data`` is
    uint8 ``[N, 3072]``: per image 1024 red, then 1024 green, then 1024 blue values, each a
    row-major 32x32 plane; ``labels`` a list of $0..9$. Class names come from ``batches.meta``
    when present, else {data}`CIFAR10_CLASSES`. Shape ``[N, 3, 32, 32]``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = (
        [f"data_batch_{i}" for i in range(1, 6)]
        if _check_split(split, ("train", "test")) == "train"
        else ["test_batch"]
    )
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing CIFAR-10 file(s) {', '.join(missing)} in {root}")
    batches = [_cifar_batch(root / n) for n in names]
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    classes = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        meta = _load_pickle(root / "batches.meta").get("label_names")
        if meta is None or len(meta) != 10:
            raise ValueError(f"{root / 'batches.meta'}: expected 10 'label_names'")
        classes = [m.decode() if isinstance(m, bytes) else str(m) for m in meta]
    return ImageSet(_uint8_images(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels), classes)


# --- image folder -----------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_files(folder: Path) -> list[Path]:
    files = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(files)


def _read_image(path: Path, size: int, mode: str) -> Tensor:
    """One file as ``[C, size, size]`` in $[-1, 1]$: centre-cropped to a square, then resized."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(mode)
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.reshape(size, size, len(mode)).permute(2, 0, 1).to(f32) / 127.5 - 1.0


def load_image_folder(path: str | Path, size: int, channels: int = 3) -> ImageSet:
    r"""Every image file in a folder, as ``[N, C, size, size]`` float32 in $[-1, 1]$.

    Layout: either image files directly in ``path`` (one class, named ``""``), or one
    sub-folder per class (the layout of torchvision's ``ImageFolder``), classes sorted by
    name and numbered from 0. Files are read in sorted order with Pillow, converted to
    grayscale (``channels=1``) or RGB (``channels=3``), centre-cropped to a square, resized
    to ``size`` $\times$ ``size`` (bicubic, antialiased), and scaled by $x = p/127.5 - 1$.
    Extensions: {data}`IMAGE_EXTENSIONS`. Everything is loaded into memory at once.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer; got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels!r}")
    top_files = _image_files(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top_files and subdirs:
        raise ValueError(f"{root} holds both image files and sub-folders; use one sub-folder per class, or only files")
    groups = [("", top_files)] if top_files else [(d.name, _image_files(d)) for d in subdirs]
    files = [(label, f) for label, (_, fs) in enumerate(groups) for f in fs]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    mode = "L" if channels == 1 else "RGB"
    images = torch.stack([_read_image(f, size, mode) for _, f in files])
    labels = torch.tensor([label for label, _ in files], dtype=torch.int64)
    return ImageSet(images, labels, [name for name, _ in groups])
