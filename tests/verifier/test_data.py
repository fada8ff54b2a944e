"""Loaders: seeded splits, train-only statistics, and errors that name the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from verifier.data import DataError, augment, load_npz, load_splits


def good_arrays(n: int = 40, colour: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (n, 6, 6, 3) if colour else (n, 6, 6)
    return {
        "x_train": rng.integers(0, 256, shape, dtype=np.uint8),
        "y_train": np.arange(n) % 4,
        "x_test": rng.integers(0, 256, (10, *shape[1:]), dtype=np.uint8),
        "y_test": np.arange(10) % 4,
    }


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_roundtrip_nhw_and_nhwc(tmp_path: Path) -> None:
    for colour in (False, True):
        path = write_npz(tmp_path / f"ok{colour}.npz", **good_arrays(colour=colour))
        splits = load_splits("npz", path, seed=0, val_fraction=0.25)
        c = 3 if colour else 1
        assert splits.image_shape == (c, 6, 6)
        assert splits.num_classes == 4
        assert len(splits.train) + len(splits.val) == 40
        assert len(splits.val) == 8  # 2 of each class: stratified
        assert sorted(splits.val.y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
        assert float(splits.train.x.max()) <= 1.0
        # statistics come from the training split only
        want = splits.train.x.mean(dim=(0, 2, 3))
        np.testing.assert_allclose(splits.mean, want.numpy(), atol=1e-6)
        assert splits.mean != pytest.approx(
            torch.cat([splits.train.x, splits.val.x]).mean(dim=(0, 2, 3)).tolist(), abs=1e-7
        )


def test_splits_are_seeded(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", **good_arrays())
    a, b = load_splits("npz", path, seed=3), load_splits("npz", path, seed=3)
    c = load_splits("npz", path, seed=4)
    assert torch.equal(a.train.x, b.train.x)
    assert torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_digits_split_is_the_default_builds() -> None:
    from gateway.models.default import load_split

    splits = load_splits("digits", seed=0)
    old = load_split(seed=0)
    assert torch.equal(splits.test.x, old.x_test)
    assert torch.equal(splits.test.y, old.y_test)
    assert len(splits.train) + len(splits.val) == len(old.x_train)
    assert splits.image_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x_test": None}, r"missing key\(s\) \['x_test'\]"),
        ({"x_train": np.zeros((4, 6, 6), dtype=np.float32)}, "x_train has dtype float32"),
        ({"x_train": np.zeros((4, 6, 6, 5), dtype=np.uint8)}, r"x_train has shape \(4, 6, 6, 5\)"),
        ({"x_train": np.zeros((40, 7, 7), dtype=np.uint8)}, "x_train images are"),
        ({"y_train": np.arange(39) % 4}, "y_train has 39 labels for 40 images"),
        ({"y_train": np.full(40, 1.5)}, "y_train has dtype float64"),
        ({"y_test": -(np.arange(10) % 4)}, "y_test has a negative label"),
        ({"y_train": np.full(40, 3)}, r"y_train has no examples of class\(es\) \[0, 1, 2\]"),
        ({"classes": np.array(["a", "b"])}, "label 3 outside the 2 classes"),
    ],
)
def test_broken_npz_files_name_the_file_and_the_problem(
    tmp_path: Path, change: dict[str, np.ndarray | None], message: str
) -> None:
    arrays: dict[str, np.ndarray] = good_arrays()
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = write_npz(tmp_path / "broken.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_splits("npz", path)
    assert str(path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_npz(junk)
    with pytest.raises(DataError, match="unknown data source"):
        load_splits("csv", junk)


def png_bytes(img: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit grayscale PNG whose rows use the given filter types."""
    h, w = img.shape
    raw = b""
    prev = np.zeros(w, dtype=np.int32)
    for r in range(h):
        row = img[r].astype(np.int32)
        left = np.concatenate([[0], row[:-1]])
        f = filters[r % len(filters)]
        if f == 0:
            enc = row
        elif f == 1:
            enc = row - left
        elif f == 2:
            enc = row - prev
        else:
            enc = row - (left + prev) // 2
        raw += bytes([f]) + (enc & 0xFF).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_image_folder_png_and_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = {}
    for split in ("train", "test"):
        for label, name in enumerate(["cat", "dog"]):
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 256, (5, 5), dtype=np.uint8)
                if i % 2:
                    (d / f"{i}.png").write_bytes(png_bytes(img, [0, 1, 2, 3]))
                else:
                    np.save(d / f"{i}.npy", img)
                images[(split, label, i)] = img
    splits = load_splits("folder", tmp_path / "imgs", seed=0, val_fraction=0.2)
    assert splits.classes == ["cat", "dog"]
    assert splits.image_shape == (1, 5, 5)
    assert len(splits.test) == 12
    # every decoded test image is one of the written ones, pixel for pixel
    written = {v.tobytes() for (s, _, _), v in images.items() if s == "test"}
    decoded = {(x[0].numpy() * 255).round().astype(np.uint8).tobytes() for x in splits.test.x}
    assert decoded == written


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_splits("folder", tmp_path / "none")
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train: no \.png or \.npy images"):
        load_splits("folder", tmp_path / "a")
    np.save(tmp_path / "a" / "train" / "x" / "0.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"test: missing"):
        load_splits("folder", tmp_path / "a")
    (tmp_path / "a" / "test" / "x").mkdir(parents=True)
    bad = tmp_path / "a" / "train" / "x" / "1.png"
    bad.write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"1\.png: not a PNG"):
        load_splits("folder", tmp_path / "a")


def test_augment_is_deterministic_and_shape_preserving() -> None:
    x = torch.rand(8, 3, 6, 6)
    a = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True)
    b = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(augment(x, torch.Generator(), 0, False), x)
