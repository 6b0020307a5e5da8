"""Data pipeline (issue 2, item 4): folder formats, mode conversion, bad-file corpus, builtin set.

The corpus of bad and odd files is built by the tests themselves in ``tmp_path``.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prepdefense import data
from prepdefense.data import SkippedFileWarning
from prepdefense.data.builtin import BUILTIN_IMAGES
from prepdefense.errors import DataError

SIZE = 48


# ---------------------------------------------------------------- corpus builders


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels (a cheap decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b"")
    )
    return path


def _good_files(d: Path) -> dict:
    """One readable file of every mode the pipeline must convert; name -> expected note."""
    files = {}
    files["rgb.jpg"] = _save(Image.fromarray(_noise(60, 80)), d / "rgb.jpg", "JPEG", quality=90)
    files["gray.png"] = _save(Image.fromarray(np.full((50, 70), 100, np.uint8), "L"), d / "gray.png", "PNG")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255  # fully transparent red: must come out white
    files["rgba.png"] = _save(Image.fromarray(rgba, "RGBA"), d / "rgba.png", "PNG")
    files["cmyk.jpg"] = _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), d / "cmyk.jpg", "JPEG")
    files["gray16.png"] = _save(Image.fromarray(np.full((40, 40), 65535, np.uint16)), d / "gray16.png", "PNG")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.paste(0, (0, 0, 20, 40))  # left half index 0 (transparent), right half index 1 (green)
    files["palette.png"] = _save(pal, d / "palette.png", "PNG", transparency=0)
    files["la.png"] = _save(Image.new("LA", (40, 40), (0, 255)), d / "la.png", "PNG")
    return files


def _bad_files(d: Path) -> list:
    """Files that must be skipped, each with one warning."""
    buf = io.BytesIO()
    Image.fromarray(_noise(128, 128, 1)).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    _save(Image.fromarray(_noise(8, 8)), d / "tiny.png", "PNG")
    _png_header_only(d / "bomb.png", 20000, 20000)  # 4e8 px: over twice Pillow's limit
    _png_header_only(d / "bomb_warn.png", 10000, 10000)  # 1e8 px: Pillow only warns
    return ["truncated.jpg", "empty.jpg", "text.jpg", "tiny.png", "bomb.png", "bomb_warn.png"]


def _write_labels(d: Path, rows) -> None:
    lines = ["file,label,wnid,name"] + [",".join(str(c) for c in r) for r in rows]
    (d / "labels.csv").write_text("\n".join(lines) + "\n")


def _skip_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, SkippedFileWarning)]


# ---------------------------------------------------------------- conversion


def test_every_mode_is_converted_to_rgb(tmp_path):
    files = _good_files(tmp_path)
    _write_labels(tmp_path, [(name, i, "", "") for i, name in enumerate(files)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)
        x, labels, ids, skipped = data.load_images(tmp_path, size=SIZE)
    assert skipped == 0 and ids == list(files) and labels.tolist() == list(range(len(files)))
    assert x.shape == (len(files), 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    img = dict(zip(ids, x))
    gray = img["gray.png"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    assert gray.mean().item() == pytest.approx(100 / 255, abs=1e-3)
    assert torch.allclose(img["rgba.png"], torch.ones(3, SIZE, SIZE))  # transparent -> white
    cmyk = img["cmyk.jpg"].mean(dim=(1, 2))
    assert cmyk[0] > 0.9 and cmyk[1] < 0.1 and cmyk[2] < 0.1  # CMYK (0,255,255,0) is red
    assert torch.allclose(img["gray16.png"], torch.ones(3, SIZE, SIZE))  # 16-bit max -> 1.0
    pal = img["palette.png"]
    assert torch.allclose(pal[:, :, : SIZE // 2 - 2], torch.ones(3, SIZE, SIZE // 2 - 2))  # transparent half white
    right = pal[:, :, SIZE // 2 + 2 :].mean(dim=(1, 2))
    assert right[1] > 0.99 and right[0] < 0.01 and right[2] < 0.01  # opaque half green
    assert torch.allclose(img["la.png"], torch.zeros(3, SIZE, SIZE))  # opaque black


def test_sixteen_bit_values_are_scaled():
    img = Image.fromarray(np.full((40, 40), 32768, np.uint16))
    assert np.asarray(data.to_rgb(img)).mean() == pytest.approx(128, abs=1)


def test_resize_shorter_side_then_centre_crop():
    # 100 x 300 (H x W): a red centre column block between blue sides.
    a = np.zeros((100, 300, 3), np.uint8)
    a[..., 2] = 255
    a[:, 100:200] = (255, 0, 0)
    out = data.resize_center_crop(Image.fromarray(a), 64, crop_fraction=1.0)
    assert out.size == (64, 64)
    o = np.asarray(out)
    assert (o[:, 2:-2, 0] > 250).all() and (o[:, 2:-2, 2] < 5).all()  # the centre square is red
    assert (o[..., 0] > 200).all()  # only the antialiased border columns blend with blue
    wide = data.resize_center_crop(Image.fromarray(a), 64)  # shorter side -> round(64/0.875)=73
    assert wide.size == (64, 64)


# ---------------------------------------------------------------- bad files


def test_bad_files_are_skipped_with_one_warning_each_and_counted(tmp_path):
    good = _good_files(tmp_path)
    bad = _bad_files(tmp_path)
    names = list(good) + bad
    _write_labels(tmp_path, [(n, 7, "", "") for n in names] + [("absent.jpg", 7, "", "")])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = data.load_dataset(tmp_path, size=SIZE)
        batches = list(data.iter_batches(ds, 4))
        # A second pass warns no more and counts nothing twice.
        again = list(data.iter_batches(ds, 4))
    ids = [i for b in batches for i in b[2]]
    assert ids == list(good)
    assert [i for b in again for i in b[2]] == ids
    assert ds.skipped == len(bad) + 1
    messages = [str(w.message) for w in _skip_warnings(record)]
    assert len(messages) == len(bad) + 1
    for name in bad + ["absent.jpg"]:
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert any("truncated" in m for m in messages if "truncated.jpg" in m)
    assert any("decompression" in m for m in messages if "bomb.png" in m)
    assert any("too small" in m for m in messages if "tiny.png" in m)


def test_bomb_is_skipped_even_when_pillows_limit_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _good_files(tmp_path)
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    _write_labels(tmp_path, [("rgb.jpg", 1, "", ""), ("bomb.png", 2, "", "")])
    with pytest.warns(SkippedFileWarning, match="bomb"):
        ds = data.load_dataset(tmp_path, size=SIZE)
    assert len(ds) == 1 and ds.skipped == 1


def test_load_images_counts_truncated_files(tmp_path):
    _good_files(tmp_path)
    _bad_files(tmp_path)
    _write_labels(tmp_path, [("rgb.jpg", 3, "", ""), ("truncated.jpg", 4, "", "")])
    with pytest.warns(SkippedFileWarning, match="truncated"):
        x, labels, ids, skipped = data.load_images(tmp_path, size=SIZE)
    assert ids == ["rgb.jpg"] and skipped == 1 and labels.tolist() == [3]


def test_only_bad_files_is_a_data_error(tmp_path):
    _bad_files(tmp_path)
    _write_labels(tmp_path, [("empty.jpg", 1, "", ""), ("text.jpg", 2, "", "")])
    with pytest.warns(SkippedFileWarning), pytest.raises(DataError, match="no readable image"):
        data.load_dataset(tmp_path, size=SIZE)


# ---------------------------------------------------------------- folder formats and errors


def test_synset_folders(tmp_path):
    for wnid, seed in (("n01440764", 0), ("n01443537", 1), ("n15075141", 2)):
        (tmp_path / wnid).mkdir()
        Image.fromarray(_noise(40, 50, seed)).save(tmp_path / wnid / f"img{seed}.png")
    (tmp_path / ".hidden").mkdir()
    ds = data.load_dataset(tmp_path, size=SIZE)
    assert ds.ids == ["n01440764/img0.png", "n01443537/img1.png", "n15075141/img2.png"]
    assert ds.labels.tolist() == [0, 1, 999]
    x, label, ident = ds[2]
    assert x.shape == (3, SIZE, SIZE) and label == 999 and ident.endswith("img2.png")


def test_synset_folder_with_a_foreign_subfolder_is_an_error(tmp_path):
    (tmp_path / "n01440764").mkdir()
    Image.fromarray(_noise(40, 50)).save(tmp_path / "n01440764" / "a.png")
    (tmp_path / "holiday").mkdir()
    with pytest.raises(DataError, match="holiday"):
        data.load_dataset(tmp_path, size=SIZE)


@pytest.mark.parametrize(
    "header,row,match",
    [
        ("file,wnid,name", "rgb.jpg,n01440764,tench", "missing label"),
        ("file,label,wnid,name", "rgb.jpg,abc,n01440764,tench", "row 3: label 'abc' is not an integer"),
        ("file,label,wnid,name", "rgb.jpg,1000,n01440764,tench", "row 3: label 1000 is outside 0..999"),
        ("file,label,wnid,name", "rgb.jpg,-1,n01440764,tench", "row 3: label -1 is outside"),
        ("file,label,wnid,name", ",5,n01440764,tench", "row 3: empty file name"),
    ],
)
def test_bad_labels_csv_rows_are_errors_with_the_row_number(tmp_path, header, row, match):
    _good_files(tmp_path)
    good_row = "gray.png,0,n01440764,tench" if "label" in header else "gray.png,n01440764,tench"
    (tmp_path / "labels.csv").write_text(f"{header}\n{good_row}\n{row}\n")
    with pytest.raises(DataError, match=match):
        data.load_dataset(tmp_path, size=SIZE)


def test_missing_empty_and_unlabelled_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_dataset(tmp_path / "nope", size=SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        data.load_dataset(empty, size=SIZE)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(_noise(40, 40)).save(loose / "a.png")
    with pytest.raises(DataError, match="labels.csv"):
        data.load_dataset(loose, size=SIZE)
    header_only = tmp_path / "header_only"
    header_only.mkdir()
    (header_only / "labels.csv").write_text("file,label,wnid,name\n")
    with pytest.raises(DataError, match="lists no images"):
        data.load_dataset(header_only, size=SIZE)
    with pytest.raises(DataError, match="not a folder"):
        data.load_dataset(loose / "a.png", size=SIZE)


def test_limit_and_batches(tmp_path):
    files = _good_files(tmp_path)
    _write_labels(tmp_path, [(n, i, "", "") for i, n in enumerate(files)])
    ds = data.load_dataset(tmp_path, size=SIZE, limit=5)
    assert len(ds) == 5
    sizes = [len(b[2]) for b in data.iter_batches(ds, 2)]
    assert sizes == [2, 2, 1]
    picked = list(data.iter_batches(ds, 8, indices=[3, 0]))
    assert picked[0][2] == [list(files)[3], list(files)[0]]


def test_limit_counts_only_the_missing_files_passed_over(tmp_path):
    files = list(_good_files(tmp_path))[:3]
    rows = [(files[0], 0, "", ""), ("gone1.png", 1, "", ""), (files[1], 2, "", ""), ("gone2.png", 3, "", ""), (files[2], 4, "", "")]
    _write_labels(tmp_path, rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_dataset(tmp_path, size=SIZE, limit=2)
    assert [e.id for e in ds.entries] == files[:2] and ds.skipped == 1  # gone2.png lies past the limit
    assert [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)] == [
        "skipped gone1.png: listed in labels.csv but not found"]
    assert data.load_dataset(tmp_path, size=SIZE).skipped == 2
    _write_labels(tmp_path, rows + [(files[0] + "x", -1, "", "")])  # a bad row past the limit is still an error
    with pytest.raises(DataError, match="outside"):
        data.load_dataset(tmp_path, size=SIZE, limit=1)


def test_class_tables():
    wnids, names = data.imagenet_wnids(), data.imagenet_class_names()
    assert len(wnids) == len(names) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and names[0] == "tench"


# ---------------------------------------------------------------- builtin


def test_builtin_images_load_with_their_labels():
    ds = data.load_dataset("builtin", size=SIZE)
    assert ds.source == "builtin" and ds.skipped == 0
    assert ds.ids == [f"skimage:{name}" for name, _ in BUILTIN_IMAGES]
    assert ds.labels.tolist() == [label for _, label in BUILTIN_IMAGES]
    x, _, _ = ds[0]
    assert x.shape == (3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1


def test_builtin_images_are_classified_correctly_by_the_default_model(model):
    x, labels, ids, _ = data.load_images("builtin", size=model.input_size)
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    wrong = [(i, int(p), int(y)) for i, p, y in zip(ids, pred, labels) if p != y]
    assert not wrong, f"misclassified built-in images (id, predicted, label): {wrong}"


def test_shared_sample_reads_cleanly(imagenet_sample_dir):
    ds = data.load_dataset(imagenet_sample_dir, size=224, limit=8)
    assert len(ds) == 8 and ds.skipped == 0
    x, labels, ids = next(data.iter_batches(ds, 8))
    assert x.shape == (8, 3, 224, 224) and labels.tolist() == list(range(8))


def test_load_images_takes_the_models_classes(tmp_path):
    files = list(_good_files(tmp_path))[:2]
    _write_labels(tmp_path, [(files[0], 1500, "", ""), (files[1], 3, "", "")])
    with pytest.raises(DataError, match="outside 0..999"):
        data.load_images(tmp_path, size=SIZE)
    x, labels, _, _ = data.load_images(tmp_path, size=SIZE, num_classes=2000)
    assert labels.tolist() == [1500, 3]
    with pytest.raises(DataError, match="outside 0..1"):
        data.load_images(tmp_path, size=SIZE, num_classes=2)
