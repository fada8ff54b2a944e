"""Data sets for the verifier pipeline: loaders, seeded splits, normalisation, augmentation.

Images are held in memory as float32 ``[n, channels, height, width]`` tensors with pixel
values in ``[0, 1]`` (uint8 / 255; scikit-learn digits / 16). Normalisation is not applied
to the tensors: its statistics (computed on the training split only) are baked into the
first layer of every network (:class:`verifier.nets.Normalize`), so the exported models take
``[0, 1]`` pixels and the gateway needs no preprocessing.

Three sources: scikit-learn's bundled ``digits`` (no download), ``.npz`` files with
``x_train`` / ``y_train`` / ``x_test`` / ``y_test`` (uint8, NHW or NHWC, as in
``../shared/data``) and ImageFolder-style directories (``<root>/{train,test}/<class>/<file>``
with ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.webp`` images, decoded by Pillow, or
uint8 ``.npy`` arrays). Every problem raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "Dataset",
    "Splits",
    "absent_classes",
    "augment",
    "data_fingerprint",
    "load_digits_arrays",
    "load_image_folder",
    "load_npz_inputs",
    "load_splits",
]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or directory is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # [n, C, H, W] float32 in [0, 1]
    y: torch.Tensor  # [n] int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> Dataset:
        return Dataset(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: list[str]
    mean: list[float]  # per channel, computed on train only
    std: list[float]
    source: str  # a description for model cards
    # how the validation split was made and whether it leaks (see near_duplicate_check)
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


# ---------------------------------------------------------------- raw arrays per source


def _check_images(where: str, key: str, x: np.ndarray) -> np.ndarray:
    """uint8 NHW or NHWC -> float32 NCHW in [0, 1]."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: {key} has dtype {x.dtype}, expected uint8")
    if x.ndim == 3:
        x = x[:, None, :, :]  # [n, 1, H, W]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    else:
        raise DataError(
            f"{where}: {key} has shape {tuple(x.shape)}, expected [n, H, W] or [n, H, W, 1|3]"
        )
    if x.shape[0] == 0:
        raise DataError(f"{where}: {key} is empty")
    return np.ascontiguousarray(x, dtype=np.float32) / 255.0


def _check_labels(where: str, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: {key} has shape {tuple(y.shape)}, expected [n]")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {key} has dtype {y.dtype}, expected integer class indices")
    if len(y) != n:
        raise DataError(f"{where}: {key} has {len(y)} labels for {n} images")
    if y.min() < 0:
        raise DataError(f"{where}: {key} has a negative label ({int(y.min())})")
    if int(y.max()) > np.iinfo(np.int64).max:  # an unsigned label that int64 would wrap
        raise DataError(f"{where}: {key} has a label ({int(y.max())}) beyond int64")
    return y.astype(np.int64)


def _class_names(where: str, files: list[str], z: Any, key: str) -> list[str] | None:
    """The class names under ``key`` (a configured key that is missing is an error)."""
    if key in files:
        return [str(c) for c in z[key]]
    if key != "classes":
        raise DataError(f"{where}: no key {key!r} for the class names (found {sorted(files)})")
    return None


def load_npz(
    path: Path, classes_key: str = "classes"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """``x_train, y_train, x_test, y_test`` (images NCHW float32 in [0, 1]) and class names
    (under ``classes_key``)."""
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"{where}: missing key(s) {missing}; found {sorted(z.files)} "
                    f"(need {list(NPZ_KEYS)})"
                )
            arrays = {k: z[k] for k in NPZ_KEYS}
            classes = _class_names(where, z.files, z, classes_key)
    except DataError:
        raise
    except Exception as exc:  # zipfile / pickle / format errors from numpy
        raise DataError(f"{where}: not a readable .npz file ({exc})") from exc
    x_train = _check_images(where, "x_train", arrays["x_train"])
    x_test = _check_images(where, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{where}: x_train images are {x_train.shape[1:]} but x_test are {x_test.shape[1:]}"
        )
    y_train = _check_labels(where, "y_train", arrays["y_train"], len(x_train))
    y_test = _check_labels(where, "y_test", arrays["y_test"], len(x_test))
    return x_train, y_train, x_test, y_test, classes


def load_npz_inputs(
    path: Path, classes_key: str = "classes"
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, list[str] | None]:
    """Images a user has, labels optional: ``x_train`` (required), ``y_train``, ``x_test``,
    ``y_test`` (each optional; a label array needs its images). Images NCHW float32 in [0, 1].
    """
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x_train" not in z.files:
                raise DataError(f"{where}: no x_train (found {sorted(z.files)})")
            arrays = {k: z[k] for k in NPZ_KEYS if k in z.files}
            classes = _class_names(where, z.files, z, classes_key)
    except DataError:
        raise
    except Exception as exc:  # zipfile / pickle / format errors from numpy
        raise DataError(f"{where}: not a readable .npz file ({exc})") from exc
    if "y_test" in arrays and "x_test" not in arrays:
        raise DataError(f"{where}: y_test without x_test")
    x_train = _check_images(where, "x_train", arrays["x_train"])
    x_test = _check_images(where, "x_test", arrays["x_test"]) if "x_test" in arrays else None
    if x_test is not None and x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{where}: x_train images are {x_train.shape[1:]} but x_test are {x_test.shape[1:]}"
        )
    y_train = (
        _check_labels(where, "y_train", arrays["y_train"], len(x_train))
        if "y_train" in arrays
        else None
    )
    y_test = None
    if x_test is not None and "y_test" in arrays:
        y_test = _check_labels(where, "y_test", arrays["y_test"], len(x_test))
    return x_train, y_train, x_test, y_test, classes


def load_digits_arrays(
    seed: int, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits (0..16 pixels scaled to [0, 1]), stratified seeded test split.

    The same split as :func:`fides.defaults.digits.load_split` with the same seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = (np.asarray(images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(labels, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)]


# Image files Pillow decodes, by suffix, and the Pillow format names ``Image.open`` may try on
# them: a file is opened by its content, so a JPEG saved as ``.png`` still loads, but no other
# Pillow plugin is ever tried (a file of another format is "not an image").
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
IMAGE_SUFFIXES = (*PIL_SUFFIXES, ".npy")

# Pillow modes that come out as one grayscale channel; every other mode comes out as RGB
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_GRAY_16BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _read_pil_image(path: Path) -> np.ndarray:
    """Decode a PNG / JPEG / BMP / WebP file with Pillow -> uint8 ``[H, W]`` or ``[H, W, 3]``.

    Channels follow the file's Pillow mode: ``1``, ``L`` and ``LA`` give 1 grayscale channel
    (alpha dropped); 16-bit grayscale (``I;16*``, and ``I`` with values in 0..65535) gives 1
    channel scaled to 8 bits (``round(v / 257)``, not clipped); every other mode (``RGB``,
    ``RGBA``, palette ``P`` / ``PA``, ``CMYK``, ``YCbCr``, ...) gives RGB, alpha dropped (not
    composited). 32-bit float images (``F``) have no defined range and are refused. Pixels are
    as stored (EXIF orientation is not applied, as in torchvision's loader); an animated file
    gives its first frame. Not an image, truncated or corrupt data, an unsupported mode and
    more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a decompression bomb) raise
    :class:`DataError` naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                im.load()
                mode = im.mode
                if mode in _GRAY_16BIT_MODES:
                    raw = np.asarray(im)
                elif mode in _GRAY_MODES:
                    raw = np.asarray(im.convert("L"))
                elif mode == "F":
                    raise DataError(
                        f"{path}: 32-bit float image (mode F) has no defined pixel range; "
                        "save it as 8-bit or as a uint8 .npy"
                    )
                else:
                    try:  # palette transparency (tRNS) goes via RGBA, then alpha is dropped
                        rgb = im.convert("RGBA") if "transparency" in im.info else im
                        raw = np.asarray(rgb.convert("RGB"))
                    except ValueError as exc:  # a mode Pillow cannot convert to RGB
                        raise DataError(f"{path}: unsupported image mode {mode} ({exc})") from exc
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise DataError(
            f"{path}: not an image file ({', '.join(PIL_FORMATS)} are read; or use .npy)"
        ) from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: image too large, possibly a decompression bomb ({exc})") from exc
    except Exception as exc:  # OSError (truncated), SyntaxError / ValueError (corrupt), ...
        raise DataError(
            f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc})"
        ) from exc
    if mode in _GRAY_16BIT_MODES:
        wide = raw.astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise DataError(
                f"{path}: mode {mode} values {int(wide.min())}..{int(wide.max())} are outside "
                "the 16-bit range 0..65535"
            )
        raw = ((wide + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
    return raw  # [H, W] (grayscale) or [H, W, 3]; _read_image adds the channel axis


def _read_image(path: Path) -> np.ndarray:
    """One ImageFolder file -> uint8 ``[H, W, 1|3]``: ``.npy`` (uint8 ``[H, W]`` or
    ``[H, W, 1|3]``) or an image file Pillow decodes (:func:`_read_pil_image`)."""
    if path.suffix.lower() == ".npy":
        try:
            img = np.asarray(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
    else:
        img = _read_pil_image(path)
    if img.dtype != np.uint8:
        raise DataError(f"{path}: dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise DataError(f"{path}: shape {img.shape}, expected [H, W] or [H, W, 1|3]")
    return img


def load_image_folder(
    root: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``<root>/train/<class>/*.{png,jpg,jpeg,bmp,webp,npy}`` and ``<root>/test/<class>/...``.

    Classes are the sorted subdirectory names (the same in both splits); files with other
    suffixes are ignored. Every image of a split must have the same ``[H, W, C]``: a set that
    mixes grayscale and colour files (1 and 3 channels, see :func:`_read_pil_image`) or sizes
    is refused with the shapes found.
    """
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    parts = {}
    classes: list[str] | None = None
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d}: missing (ImageFolder layout: {root}/{{train,test}}/<class>/)")
        names = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not names:
            raise DataError(f"{d}: no class directories")
        if classes is None:
            classes = names
        elif names != classes:
            raise DataError(f"{d}: classes {names} differ from train's {classes}")
        images, labels = [], []
        for label, name in enumerate(names):
            for f in sorted((d / name).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(_read_image(f))
                    labels.append(label)
        if not images:
            raise DataError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)})")
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DataError(f"{d}: images of different shapes {sorted(shapes)}")
        x = np.stack(images)  # [n, H, W, C]
        parts[split] = (_check_images(str(d), "images", x), np.asarray(labels, dtype=np.int64))
    assert classes is not None
    return parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1], classes


def data_fingerprint(source: str, path: Path | None) -> str:
    """What a trained stage depends on in the data, beyond its config: the SHA-256 of an npz
    file's bytes; of an image folder's file list with sizes and modification times (reading
    every image would cost as much as loading them); ``digits`` for the bundled set."""
    if source == "digits" or path is None:
        return "digits"
    h = hashlib.sha256()
    try:
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return "files:" + h.hexdigest()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- splits


def load_splits(
    source: str,
    path: Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    test_fraction: float | None = None,
    classes_key: str = "classes",
    group_key: str | None = None,
) -> Splits:
    """Load a source and split train into train / validation (seeded, stratified).

    ``source``: ``digits`` | ``npz`` | ``folder``. ``train_limit`` / ``test_limit`` keep the
    first images after shuffling (for quick runs and tests). ``test_fraction``: the test share
    of ``digits`` (the other sources bring their own test split).
    """
    classes: list[str] | None
    if source == "digits":
        x_tr, y_tr, x_te, y_te, classes = load_digits_arrays(seed, test_fraction or 0.2)
        desc = "sklearn.datasets.load_digits"
    elif source in ("npz", "folder"):
        if path is None:
            raise DataError(f"data source {source!r} needs a path")
        if source == "npz":
            x_tr, y_tr, x_te, y_te, classes = load_npz(path, classes_key)
        else:
            x_tr, y_tr, x_te, y_te, classes = load_image_folder(path)
        desc = f"{source}:{path.name}"
    else:
        raise DataError(f"unknown data source {source!r}; one of digits, npz, folder")
    where = str(path) if path is not None else source
    top_train, top_test = int(y_tr.max()), int(y_te.max())
    if classes is not None and len(classes) <= max(top_train, top_test):
        top = max(top_train, top_test)
        raise DataError(f"{where}: label {top} outside the {len(classes)} classes")
    if classes is None and top_test > top_train:
        raise DataError(
            f"{where}: y_test has label {top_test}, above every y_train label (at most "
            f"{top_train}): a class the training data has no examples of"
        )
    num_classes = len(classes) if classes is not None else top_train + 1
    # the labels' range is checked before anything is made per class: a stray label such as
    # 2**40 is an error, not a list of 2**40 class names
    missing, absent = absent_classes(np.unique(y_tr), num_classes)
    if absent:
        more = f" and {absent - len(missing)} more" if absent > len(missing) else ""
        raise DataError(
            f"{where}: y_train has no examples of class(es) {missing}{more} (labels run to "
            f"{num_classes - 1})"
        )
    if classes is None:
        classes = [str(i) for i in range(num_classes)]

    groups = None
    if group_key is not None:
        if source != "npz" or path is None:
            raise DataError(f"data.group_key is for npz data, not {source!r}")
        groups = load_npz_groups(path, group_key, len(y_tr))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_tr))  # the stored order may be grouped by class
    x_tr, y_tr = x_tr[order], y_tr[order]
    if groups is not None:
        groups = groups[order]
        is_val = group_split(groups, val_fraction, seed)
    else:
        val_idx: list[int] = []
        for c in range(num_classes):  # stratified: the same fraction of every class
            idx = np.flatnonzero(y_tr == c)
            val_idx.extend(idx[: max(1, round(len(idx) * val_fraction))].tolist())
        is_val = np.zeros(len(y_tr), dtype=bool)
        is_val[val_idx] = True
    x_val, y_val = x_tr[is_val], y_tr[is_val]
    x_tr, y_tr = x_tr[~is_val], y_tr[~is_val]
    if train_limit is not None:
        x_tr, y_tr = x_tr[:train_limit], y_tr[:train_limit]
        x_val, y_val = x_val[: max(1, train_limit // 4)], y_val[: max(1, train_limit // 4)]
    if test_limit is not None:
        test_order = rng.permutation(len(y_te))[:test_limit]
        x_te, y_te = x_te[test_order], y_te[test_order]

    train = Dataset(torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr))
    if groups is not None:
        checks: dict[str, Any] = {"validation_split": f"by group ({group_key})"}
    else:
        checks = {"validation_split": "random, stratified by class"}
        checks["near_duplicates"] = near_duplicate_check(x_tr, x_val, x_te, seed, where)
    mean = train.x.mean(dim=(0, 2, 3))  # [C]
    std = train.x.std(dim=(0, 2, 3)).clamp_min(1e-3)  # [C]
    return Splits(
        train=train,
        val=Dataset(torch.from_numpy(np.ascontiguousarray(x_val)), torch.from_numpy(y_val)),
        test=Dataset(torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te)),
        num_classes=num_classes,
        classes=classes,
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        source=desc,
        checks=checks,
    )


def absent_classes(present: np.ndarray, num_classes: int, most: int = 10) -> tuple[list[int], int]:
    """The first ``most`` of the classes ``0 .. num_classes - 1`` missing from ``present``
    (sorted unique non-negative labels), and how many are missing; in time linear in
    ``present``, however large ``num_classes`` is."""
    inside = present[present < num_classes].tolist()
    first: list[int] = []
    expected = 0
    for label in [*inside, num_classes]:
        first.extend(range(expected, min(label, expected + most - len(first))))
        expected = label + 1
        if len(first) >= most:
            break
    return first, num_classes - len(inside)


def load_npz_groups(path: Path, key: str, n: int) -> np.ndarray:
    """The group id of each training image (``key`` in the npz, one per ``x_train`` row)."""
    with np.load(path, allow_pickle=False) as z:
        if key not in z.files:
            raise DataError(f"{path}: no key {key!r} for the groups (found {sorted(z.files)})")
        groups = np.asarray(z[key])
    if groups.shape != (n,):
        raise DataError(f"{path}: {key} has shape {list(groups.shape)}, expected [{n}]")
    return groups


def group_split(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """``[n]`` bool, True for validation: whole groups (scikit-learn's GroupShuffleSplit, a
    ``val_fraction`` share of the groups), so no object is on both sides."""
    from sklearn.model_selection import GroupShuffleSplit

    if len(np.unique(groups)) < 2:
        raise DataError("data.group_key: every image is in one group; nothing to split")
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    _, val = next(splitter.split(np.zeros(len(groups)), groups=groups))
    is_val = np.zeros(len(groups), dtype=bool)
    is_val[val] = True
    return is_val


#: Validation images this much closer to their nearest training image than test images are
#: (median distance ratio) mean the validation split leaks: near-duplicates across it.
LEAK_RATIO = 0.5


def near_duplicate_check(
    x_train: np.ndarray, x_val: np.ndarray, x_test: np.ndarray, seed: int, where: str, n: int = 300
) -> dict[str, Any]:
    """Does the random validation split leak? The median distance from a validation image to
    its nearest training image, against the same for test images (a split made apart from
    training). Near-duplicates (several photos of one object) put validation images much
    closer: validation figures are then optimistic and GDTL stops on them. Logs a warning."""
    rng = np.random.default_rng(seed + 11)

    def small(x: np.ndarray) -> np.ndarray:  # [n, C, H, W] -> [n, C * 8 * 8] (average pooled)
        t = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(x)), 8)
        return t.flatten(1).numpy()

    def nearest(x: np.ndarray) -> float:
        pick = x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
        a, b = torch.from_numpy(small(pick)), torch.from_numpy(small(x_train))
        d = torch.cat([torch.cdist(a[i : i + 64], b).min(1).values for i in range(0, len(a), 64)])
        return float(d.median())

    val_d, test_d = nearest(x_val), nearest(x_test)
    ratio = val_d / max(test_d, 1e-12)
    leaks = ratio < LEAK_RATIO
    if leaks:
        log.warning(
            "%s: validation images are much closer to training images than test images are "
            "(median nearest distance %.4g against %.4g): the data likely holds near-"
            "duplicates (several images of one object), so validation figures are optimistic; "
            "give data.group_key to split by object",
            where,
            val_d,
            test_d,
        )
    return {
        "val_to_train_median": round(val_d, 5),
        "test_to_train_median": round(test_d, 5),
        "ratio": round(ratio, 4),
        "leak_suspected": bool(leaks),
    }


# ---------------------------------------------------------------- augmentation


def augment(
    x: torch.Tensor, generator: torch.Generator, crop_padding: int = 0, hflip: bool = False
) -> torch.Tensor:
    """Random translation by up to ``crop_padding`` pixels (zero padding, as a padded random
    crop) and random horizontal flips; deterministic given ``generator``."""
    # x: [b, C, H, W]
    if hflip:
        flip = torch.rand(len(x), generator=generator) < 0.5  # [b]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if crop_padding > 0:
        p = crop_padding
        b, _, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))  # [b, C, H+2p, W+2p]
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # [b, 1, H, 1]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # [b, 1, 1, W]
        bidx = torch.arange(b)[:, None, None, None]
        cidx = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]  # [b, C, H, W]
    return x
