"""Algorithm 2 (learning the quantization table) and table files (paper Section 5.2, PROTOCOL.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.fft
import torch

from prepdefense import defenses
from prepdefense.defenses import quant_tables
from prepdefense.defenses.block_dct import dct_matrix
from prepdefense.defenses.quant_tables import (
    FD_TABLE,
    JPEG_LUMA_Q50,
    default_table,
    learn_quantization_table,
    load_table,
    resolve_table,
    save_table,
)
from prepdefense.errors import PrepDefenseError
from prepdefense.seeding import make_generator


def basis_image(k: int, l: int, h: int, w: int, amplitude_255: float) -> torch.Tensor:
    """An image whose every 8x8 block is ``amplitude * DCT basis (k, l)`` ([0,1] units)."""
    d = dct_matrix(8, dtype=torch.float64)
    block = torch.outer(d[k], d[l]) * amplitude_255 / 255.0
    return block.repeat(h // 8, w // 8)


def reference_counts(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """Algorithm 2 written independently with NumPy/SciPy, one block at a time."""
    counts = np.zeros((8, 8), dtype=np.int64)
    n, c, h, w = clean.shape
    pad = ((0, (-h) % 8), (0, (-w) % 8))
    for i in range(n):
        for ch in range(c):
            a = np.pad(clean[i, ch] * 255.0, pad, mode="reflect")
            b = np.pad(adv[i, ch] * 255.0, pad, mode="reflect")
            for r in range(0, a.shape[0], 8):
                for s in range(0, a.shape[1], 8):
                    diff = np.abs(
                        scipy.fft.dctn(a[r : r + 8, s : s + 8], norm="ortho")
                        - scipy.fft.dctn(b[r : r + 8, s : s + 8], norm="ortho")
                    )
                    counts[np.unravel_index(np.argmax(diff), (8, 8))] += 1
    return counts


def test_known_answer_single_coefficient():
    g = make_generator(0)
    clean = 0.2 + 0.6 * torch.rand(3, 3, 32, 40, dtype=torch.float64, generator=g)
    adversarial = clean + basis_image(2, 3, 32, 40, amplitude_255=6.0)
    table, counts = learn_quantization_table(clean, adversarial, return_counts=True)
    n_blocks = 3 * 3 * (32 // 8) * (40 // 8)
    assert counts.dtype == torch.int64 and counts.shape == (8, 8)
    assert int(counts[2, 3]) == n_blocks and int(counts.sum()) == n_blocks
    assert table[2, 3] == 100.0
    others = torch.ones(8, 8, dtype=torch.bool)
    others[2, 3] = False
    assert torch.all(table[others] == 20.0)


def test_table_formula_on_two_coefficients():
    """Half the images perturbed at (0, 1), half at (5, 6) with twice as many: Q = Q0/max*80+20."""
    g = make_generator(1)
    clean = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=g) * 0.5 + 0.25
    adv = clean.clone()
    adv[0] += basis_image(0, 1, 16, 16, 8.0)
    adv[1:] += basis_image(5, 6, 16, 16, 8.0)
    table, counts = learn_quantization_table(clean, adv, return_counts=True)
    assert int(counts[0, 1]) == 4 and int(counts[5, 6]) == 8
    assert table[5, 6] == 100.0 and table[0, 1] == pytest.approx(4 / 8 * 80 + 20)
    assert table.min() == 20.0


@pytest.mark.parametrize("size", [(24, 32), (29, 21)])
def test_matches_independent_reference_on_random_pairs(size):
    g = make_generator(2)
    clean = torch.rand(2, 3, *size, dtype=torch.float64, generator=g)
    adv = (clean + 0.03 * torch.randn(2, 3, *size, dtype=torch.float64, generator=g)).clamp(0, 1)
    _, counts = learn_quantization_table(clean, adv, return_counts=True, chunk_size=1)
    np.testing.assert_array_equal(counts.numpy(), reference_counts(clean.numpy(), adv.numpy()))


def test_every_block_of_a_299_image_counts_once_and_chunking_is_irrelevant():
    g = make_generator(3)
    clean = torch.rand(3, 3, 299, 299, generator=g)
    adv = (clean + 0.02 * torch.randn(3, 3, 299, 299, generator=g)).clamp(0, 1)
    table_a, counts_a = learn_quantization_table(clean, adv, return_counts=True, chunk_size=1)
    table_b, counts_b = learn_quantization_table(clean, adv, return_counts=True, chunk_size=16)
    assert int(counts_a.sum()) == 3 * 3 * 38 * 38
    assert torch.equal(counts_a, counts_b) and torch.equal(table_a, table_b)
    assert table_a.max() == 100.0 and table_a.min() >= 20.0


def test_unchanged_pairs_count_for_dc():
    x = torch.rand(1, 3, 16, 16, generator=make_generator(4))
    _, counts = learn_quantization_table(x, x.clone(), return_counts=True)
    assert int(counts[0, 0]) == 3 * 4 and int(counts.sum()) == 12


def test_input_validation():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError):
        learn_quantization_table(x, x[:, :, :8])
    with pytest.raises(ValueError):
        learn_quantization_table(x[:0], x[:0])


def test_save_load_round_trip(tmp_path):
    table = torch.rand(8, 8, dtype=torch.float64, generator=make_generator(5)) * 80 + 20
    meta = {"attack": "cw", "model": "efficientnet-lite0", "n_images": 100, "counts": [[1] * 8] * 8}
    path = save_table(tmp_path / "sub" / "t.json", table, meta)
    loaded, meta2 = load_table(path)
    assert torch.equal(loaded, table) and meta2 == meta
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temp file left behind
    assert json.loads(path.read_text())["table"][0][0] == pytest.approx(float(table[0, 0]))


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"table": [[1, 2], [3, 4]]}))
    with pytest.raises(PrepDefenseError):
        load_table(bad)
    with pytest.raises(PrepDefenseError):
        load_table(tmp_path / "missing.json")
    with pytest.raises(PrepDefenseError):
        save_table(tmp_path / "zero.json", torch.zeros(8, 8))


def test_default_table_falls_back_to_fd(tmp_path, monkeypatch):
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", tmp_path / "learned.json")
    table, source = default_table()
    assert torch.equal(table, FD_TABLE) and source == "fd (no learned table shipped yet)"
    assert "fd (no learned table shipped yet)" in repr(defenses.create("dct-distort"))
    with pytest.raises(PrepDefenseError):
        resolve_table("learned")


def test_default_table_uses_the_shipped_learned_table(tmp_path, monkeypatch):
    path = tmp_path / "learned.json"
    learned = torch.full((8, 8), 20.0, dtype=torch.float64)
    learned[0, 0] = 100.0
    save_table(path, learned, {"attack": "cw", "model": "efficientnet-lite0", "n_images": 50})
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", path)
    table, source = default_table()
    assert torch.equal(table, learned) and source.startswith("learned") and "cw" in source
    d = defenses.create("dct-distort")
    assert torch.equal(d.quantize.table, learned) and "learned" in repr(d)
    assert torch.equal(resolve_table("learned")[0], learned)


def test_resolve_table_specs(tmp_path):
    assert torch.equal(resolve_table("fd")[0], FD_TABLE)
    assert torch.equal(resolve_table("JPEG50")[0], JPEG_LUMA_Q50)
    custom = np.arange(1, 65, dtype=np.float64).reshape(8, 8)
    assert torch.equal(resolve_table(custom)[0], torch.from_numpy(custom))
    assert resolve_table(torch.from_numpy(custom))[1] == "custom"
    path = save_table(tmp_path / "q.json", custom, {})
    assert torch.equal(resolve_table(str(path))[0], torch.from_numpy(custom))
    assert torch.equal(resolve_table(path)[0], torch.from_numpy(custom))
    with pytest.raises(PrepDefenseError):
        resolve_table("no-such-table")
    with pytest.raises(PrepDefenseError):
        resolve_table(np.ones((4, 4)))


def _two_shipped_tables(tmp_path, monkeypatch):
    """A tables folder with a new ``learned.json`` and the one it replaced, ``learned-v1.json``."""
    new = torch.full((8, 8), 20.0, dtype=torch.float64)
    new[0, 0] = 100.0
    old = torch.full((8, 8), 30.0, dtype=torch.float64)
    save_table(tmp_path / "learned.json", new, {"attack": "cw", "model": "m", "n_images": 100,
                                               "attack_settings": {"binary_search_steps": 5, "steps": 200}})
    save_table(tmp_path / "Learned-V1.json", old, {"attack": "cw", "model": "m", "n_images": 16})
    monkeypatch.setattr(quant_tables, "TABLES_DIR", tmp_path)
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", tmp_path / "learned.json")
    return new, old


def test_every_shipped_table_is_selectable_by_name(tmp_path, monkeypatch):
    new, old = _two_shipped_tables(tmp_path, monkeypatch)
    assert list(quant_tables.shipped_tables()) == ["learned", "learned-v1"]
    assert torch.equal(default_table()[0], new) and "cw 5x200" in default_table()[1]
    table, source = resolve_table("LEARNED-v1")  # case-blind, like the other names
    assert torch.equal(table, old) and "Learned-V1.json" in source and "16 images" in source
    d = defenses.create("dct-distort[table=learned-v1]")
    assert torch.equal(d.quantize.table, old) and "Learned-V1.json" in repr(d)
    with pytest.raises(PrepDefenseError, match="learned-v1"):  # the message lists what there is
        resolve_table("learned-v2")


def test_table_digest_follows_values_not_names(tmp_path, monkeypatch):
    new, old = _two_shipped_tables(tmp_path, monkeypatch)
    assert quant_tables.table_digest(new) == quant_tables.table_digest(resolve_table("learned")[0])
    assert quant_tables.table_digest(new.numpy()) == quant_tables.table_digest(new)
    assert quant_tables.table_digest(new) != quant_tables.table_digest(old)
    assert quant_tables.table_digest(FD_TABLE).startswith("sha256:")


def test_state_digest_tells_tables_apart_and_is_none_without_state(tmp_path, monkeypatch):
    _two_shipped_tables(tmp_path, monkeypatch)
    digest = defenses.state_digest
    assert digest(defenses.create("dct-distort")) == digest(defenses.create("dct-distort[table=learned]"))
    assert digest(defenses.create("dct-distort")) != digest(defenses.create("dct-distort[table=learned-v1]"))
    assert digest(defenses.create("fd")) == digest(defenses.create("dct-quant[table=fd]"))
    assert digest(defenses.create("grid-distort")) is None


def test_built_in_names_and_unwritable_stems_are_never_shipped_names(tmp_path, monkeypatch):
    new, _ = _two_shipped_tables(tmp_path, monkeypatch)
    for stem in ("fd", "Default", "jpeg", "q50", "jpeg50", "2", "a,b", "x[1]"):
        save_table(tmp_path / f"{stem}.json", torch.full((8, 8), 99.0, dtype=torch.float64), {})
    assert list(quant_tables.shipped_tables()) == ["learned", "learned-v1"]
    assert torch.equal(resolve_table("fd")[0], FD_TABLE)  # the built-in, not fd.json
    assert torch.equal(resolve_table("default")[0], new)


def test_every_table_shipped_with_the_package_is_selectable_by_its_name():
    files = sorted(quant_tables.TABLES_DIR.glob("*.json"))
    assert files, "no table shipped"
    names = quant_tables.shipped_tables()
    assert sorted(p.stem.lower() for p in files) == sorted(names)  # none reserved, unwritable or a case twin
    for name, path in names.items():
        table, metadata = load_table(path)
        assert torch.equal(resolve_table(name)[0], table)
        assert metadata.get("what") and metadata.get("n_images"), f"{path.name} says what made it"
        assert defenses.normalize_name(f"dct-distort[table={name.upper()}]") in (
            f"dct-distort[table={name}]", "dct-distort")


def test_state_digest_reads_any_state_and_says_when_it_cannot():
    class Held(torch.nn.Module):
        def __init__(self, values, extra=None):
            super().__init__()
            self.register_buffer("values", values)
            self.extra = extra

        def get_extra_state(self):
            return self.extra

        def set_extra_state(self, state):
            self.extra = state

    digest = defenses.state_digest
    base = torch.arange(12.0).reshape(3, 4)
    assert digest(Held(base.t())) == digest(Held(base.t().contiguous()))  # layout is not state
    assert digest(Held(base.t())) != digest(Held(base))  # shape is
    assert digest(Held(torch.tensor(True))) != digest(Held(torch.tensor([True])))  # bool, 0-dim
    assert digest(Held(base, {"a": 1})) != digest(Held(base, {"a": 2}))  # extra state by repr
    assert digest(Held(torch.zeros(2, requires_grad=True))) == digest(Held(torch.zeros(2)))
    lazy = torch.nn.LazyLinear(3)
    with pytest.raises(ValueError, match="uninitialised"):
        digest(lazy)
