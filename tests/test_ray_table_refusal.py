"""A Ray worker whose install ships another default quantization table than the run was made
with computes nothing: each unit it is sent comes back as an error that says why (issue 15,
item 1: a new shipped table must never mix with the old one). Needs no Ray: the check is the
worker's own."""

from __future__ import annotations

import torch

from prepdefense.defenses import quant_tables
from prepdefense.experiments import ray_executor


def test_a_worker_with_another_default_table_refuses(tmp_path, monkeypatch):
    here = quant_tables.table_digest(quant_tables.default_table()[0])
    assert ray_executor._table_refusal({"default_table": here}) is None
    assert ray_executor._table_refusal({}) is None  # an evaluate or older identity records none
    table = tmp_path / "learned.json"
    quant_tables.save_table(table, torch.full((8, 8), 60.0, dtype=torch.float64), {})
    monkeypatch.setattr(quant_tables, "TABLES_DIR", tmp_path)
    monkeypatch.setattr(quant_tables, "LEARNED_TABLE_PATH", table)
    message = ray_executor._table_refusal({"default_table": here})
    assert message and here in message and "same prepdefense" in message
