"""What a newcomer's review of the CLI found (2026-11-30): an existing output file could not be
written again, a labels.csv could list a file twice, and usability --json gave strings."""

from __future__ import annotations

import pytest

from prepdefense.cli.common import UsageError, check_out_file
from prepdefense.cli.usability import _typed
from prepdefense.data import loading
from prepdefense.errors import DataError


def test_an_existing_output_file_may_be_written_again(tmp_path):
    """Was: a second identical run of attack --save-adv / judge --out / learn-table --out exited
    2 with 'adv.npz is a file, not a folder'."""
    f = tmp_path / "adv.npz"
    f.write_bytes(b"old")
    check_out_file(str(f), "--save-adv")  # replaced atomically by the new result
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_out_file(str(f / "x.json"))
    with pytest.raises(UsageError, match="is a folder"):
        check_out_file(str(tmp_path))


def test_a_file_listed_twice_in_labels_csv_is_refused(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "img0.png")
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,4\nimg0.png,5\n")
    with pytest.raises(DataError, match=r"row 3: img0.png is listed again \(first at row 2\)"):
        loading.load_dataset(tmp_path, size=32)


def test_usability_json_cells_are_numbers():
    assert _typed("1.000") == 1.0 and _typed("200") == 200 and _typed("-") is None and _typed("fd table") == "fd table"
