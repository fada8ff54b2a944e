"""Loaders: seeded splits, train-only statistics, and errors that name the file."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from verifier.data import (
    DataError,
    _read_image,
    augment,
    load_image_folder,
    load_npz,
    load_splits,
)


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
    from fides.defaults.digits import load_split

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
        # one stray label: refused at once, not a list of 2**40 class names (a MemoryError)
        (
            {"y_train": np.r_[np.arange(39) % 4, 2**40]},
            r"no examples of class\(es\) \[4, 5, 6, 7, 8, 9, 10, 11, 12, 13\] and "
            r"1099511627762 more \(labels run to 1099511627776\)",
        ),
        ({"y_test": np.r_[np.arange(9) % 4, 2**40]}, "y_test has label 1099511627776, above"),
        ({"y_test": np.r_[np.arange(9) % 4, 7]}, r"y_test has label 7, above every y_train label"),
        (  # an unsigned label int64 would wrap to a negative one
            {"y_train": np.array([*(np.arange(39) % 4).tolist(), 2**63], dtype=np.uint64)},
            r"y_train has a label \(9223372036854775808\) beyond int64",
        ),
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


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
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return png_file(ihdr, raw)


def png_file(ihdr: bytes, raw: bytes) -> bytes:
    """Signature, IHDR, one zlib-compressed IDAT of the filtered rows ``raw``, IEND."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def interlaced_png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit RGB Adam7-interlaced PNG (PNG specification, section 8.2; Pillow only writes
    non-interlaced files): seven passes of sub-images, each row with filter type 0."""
    h, w, _ = img.shape
    raw = b""
    # (first row, first column, row step, column step) of passes 1..7
    for y0, x0, dy, dx in [
        (0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
        (1, 0, 2, 1),
    ]:  # fmt: skip
        sub = img[y0::dy, x0::dx]
        if sub.size:  # an empty pass has no rows at all
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return png_file(ihdr, raw)


def one_image_folder(root: Path, name: str, write: Callable[[Path], object]) -> np.ndarray:
    """An ImageFolder with one image, written by ``write(path)`` into train and test; the
    decoded test image as uint8 ``[C, H, W]``."""
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True)
        write(root / split / "x" / name)
    _, _, x_test, _, _ = load_image_folder(root)
    return (x_test[0] * 255).round().astype(np.uint8)


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


def test_image_folder_jpeg(tmp_path: Path) -> None:
    # solid colours survive JPEG's lossy coding to within a few levels
    colours = {"blue": (20, 40, 220), "red": (200, 30, 30)}
    for split in ("train", "test"):
        for name, colour in colours.items():
            d = tmp_path / "imgs" / split / name
            d.mkdir(parents=True)
            for i, suffix in enumerate([".jpg", ".jpeg", ".JPG"]):
                Image.new("RGB", (8, 6), colour).save(d / f"{i}{suffix}", "JPEG", quality=95)
            # CMYK JPEG: converted to RGB like every non-grayscale mode
            Image.new("RGB", (8, 6), colour).convert("CMYK").save(d / "3.jpg", "JPEG")
    splits = load_splits("folder", tmp_path / "imgs", seed=0, val_fraction=0.25)
    assert splits.classes == ["blue", "red"]
    assert splits.image_shape == (3, 6, 8)
    assert len(splits.test) == 8
    for x, y in zip(splits.test.x, splits.test.y, strict=True):
        want = torch.tensor(colours[splits.classes[int(y)]], dtype=torch.float32) / 255
        assert torch.allclose(x, want[:, None, None].expand_as(x), atol=4 / 255)


def test_grayscale_jpeg_is_one_channel(tmp_path: Path) -> None:
    img = one_image_folder(
        tmp_path, "0.jpeg", lambda p: Image.new("L", (5, 7), 90).save(p, "JPEG", quality=95)
    )
    assert img.shape == (1, 7, 5)
    assert np.abs(img.astype(int) - 90).max() <= 2


RGB = np.random.default_rng(2).integers(0, 256, (5, 4, 3), dtype=np.uint8)  # [H, W, 3]
GRAY = RGB[:, :, 0]


@pytest.mark.parametrize(
    ("image", "want"),
    [
        (Image.fromarray(GRAY, "L"), GRAY[None]),
        (Image.fromarray(RGB, "RGB"), RGB.transpose(2, 0, 1)),
        # alpha is dropped, not composited
        (
            Image.fromarray(np.dstack([RGB, np.full((5, 4), 7, dtype=np.uint8)]), "RGBA"),
            RGB.transpose(2, 0, 1),
        ),
        (Image.fromarray(np.dstack([GRAY, GRAY[::-1]]), "LA"), GRAY[None]),
        (Image.fromarray(GRAY > 127), (GRAY[None] > 127).astype(np.uint8) * 255),
    ],
    ids=["L", "RGB", "RGBA", "LA", "1"],
)
def test_png_modes(tmp_path: Path, image: Image.Image, want: np.ndarray) -> None:
    img = one_image_folder(tmp_path, "0.png", lambda p: image.save(p, "PNG"))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, want)


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_png_is_rgb(tmp_path: Path, transparency: int | None) -> None:
    palette = np.random.default_rng(3).integers(0, 256, (256, 3), dtype=np.uint8)
    index = np.random.default_rng(4).integers(0, 256, (5, 4), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    extra = {} if transparency is None else {"transparency": transparency}  # a tRNS chunk
    img = one_image_folder(tmp_path, "0.png", lambda p: image.save(p, "PNG", **extra))
    np.testing.assert_array_equal(img, palette[index].transpose(2, 0, 1))


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = np.array([[0, 128, 129, 1000], [32896, 40000, 65406, 65535]], dtype=np.uint16)
    image = Image.fromarray(wide)
    assert image.mode == "I;16"
    img = one_image_folder(tmp_path, "0.png", lambda p: image.save(p, "PNG"))
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img[0], [[0, 0, 1, 4], [128, 156, 254, 255]])  # round(v/257)


def test_interlaced_png(tmp_path: Path) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (11, 13, 3), dtype=np.uint8)
    img = one_image_folder(tmp_path, "0.png", lambda p: p.write_bytes(interlaced_png_bytes(rgb)))
    with Image.open(tmp_path / "test" / "x" / "0.png") as im:
        assert im.info.get("interlace") == 1
    np.testing.assert_array_equal(img, rgb.transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("name", "options"), [("0.bmp", {}), ("0.webp", {"lossless": True})], ids=["bmp", "webp"]
)
def test_bmp_and_lossless_webp(tmp_path: Path, name: str, options: dict[str, object]) -> None:
    img = one_image_folder(tmp_path, name, lambda p: Image.fromarray(RGB).save(p, **options))
    np.testing.assert_array_equal(img, RGB.transpose(2, 0, 1))


def test_mixed_channels_are_refused(tmp_path: Path) -> None:
    for split in ("train", "test"):
        d = tmp_path / split / "x"
        d.mkdir(parents=True)
        Image.fromarray(GRAY, "L").save(d / "0.png")
        Image.fromarray(RGB, "RGB").save(d / "1.png")
    with pytest.raises(DataError, match=r"train: images of different shapes \[\(5, 4, 1\), "):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_splits("folder", tmp_path / "none")
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    (tmp_path / "a" / "train" / "x" / "notes.txt").write_text("not an image suffix: ignored")
    with pytest.raises(DataError, match=r"train: no images \(\.png, \.jpg, .*\.npy\)"):
        load_splits("folder", tmp_path / "a")
    np.save(tmp_path / "a" / "train" / "x" / "0.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"test: missing"):
        load_splits("folder", tmp_path / "a")
    (tmp_path / "a" / "test" / "x").mkdir(parents=True)
    bad = tmp_path / "a" / "train" / "x" / "1.png"
    bad.write_bytes(b"GIF89a")  # a format Pillow reads, but not one the loader accepts
    with pytest.raises(DataError, match=r"1\.png: not an image file"):
        load_splits("folder", tmp_path / "a")


def test_broken_image_files_name_the_file(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    good = d / "good.png"
    Image.fromarray(RGB, "RGB").save(good)
    data = good.read_bytes()
    text = d / "notes.jpg"
    text.write_text("this is text, not a JPEG\n")
    truncated = d / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = d / "corrupt.png"
    at = data.index(b"IDAT") + 8
    corrupt.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :])
    for path, message in [
        (text, "not an image file"),
        (truncated, "truncated or corrupt image"),
        (corrupt, "truncated or corrupt image"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            _read_image(path)
        assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("side", [4, 5])  # Pillow warns above the limit, refuses above twice it
def test_decompression_bomb_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"big\.png: image too large"):
        _read_image(path)


def test_augment_is_deterministic_and_shape_preserving() -> None:
    x = torch.rand(8, 3, 6, 6)
    a = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True)
    b = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(augment(x, torch.Generator(), 0, False), x)


def _grouped_npz(path: Path, seed: int = 0) -> None:
    """100 objects, 8 photos each (the object plus a little noise), labels by object; a test
    split of 40 other objects. A random validation split puts photos of one object on both
    sides."""
    rng = np.random.default_rng(seed)

    def photos(objects: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        base = rng.integers(0, 256, (objects, 16, 16, 3)).astype(np.float64)
        x = np.repeat(base, 8, axis=0) + rng.normal(0, 4, (objects * 8, 16, 16, 3))
        groups = np.repeat(np.arange(objects), 8)
        return np.clip(x, 0, 255).astype(np.uint8), groups % 4, groups

    x_tr, y_tr, g_tr = photos(100)
    x_te, y_te, _ = photos(40)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, groups=g_tr)


def test_a_group_key_keeps_each_object_on_one_side(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26: a random split of grouped data leaks (measured), a group split does not."""
    path = tmp_path / "grouped.npz"
    _grouped_npz(path)
    caplog.set_level("WARNING", logger="verifier.data")
    random = load_splits("npz", path, seed=0, val_fraction=0.2)
    leak = random.checks["near_duplicates"]
    assert leak["leak_suspected"], leak
    assert leak["ratio"] < 0.5
    assert "give data.group_key" in caplog.text

    grouped = load_splits("npz", path, seed=0, val_fraction=0.2, group_key="groups")
    assert grouped.checks == {"validation_split": "by group (groups)"}
    with np.load(path) as z:
        x, g = z["x_train"], z["groups"]
    key = {x[i].tobytes(): g[i] for i in range(len(x))}

    def objects(split: Any) -> set[int]:
        imgs = (split.x.numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        return {int(key[im.tobytes()]) for im in imgs}

    assert not objects(grouped.train) & objects(grouped.val)
    assert 0.1 < len(grouped.val) / (len(grouped.train) + len(grouped.val)) < 0.3
    # measured the same way, the group split does not leak
    from verifier.data import near_duplicate_check

    check = near_duplicate_check(
        grouped.train.x.numpy(), grouped.val.x.numpy(), grouped.test.x.numpy(), 0, "grouped"
    )
    assert not check["leak_suspected"], check
    with pytest.raises(DataError, match="no key 'objects' for the groups"):
        load_splits("npz", path, group_key="objects")
