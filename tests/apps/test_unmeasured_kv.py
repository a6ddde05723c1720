"""A cache st3 cannot read gives `kv_bytes=None`: the apps show "not measured", never a 0 or a crash."""

from __future__ import annotations

from st3.plugins.lmms_eval import Figures


def summary(kv_bytes: int | None) -> dict:
    return {"batch_size": 1, "mean_visual_per_layer": 4.0, "visual_per_layer": [4.0], "visual_tokens": [8],
            "flops": {"prefill": 1, "prefill_unpruned": 2}, "kv_bytes": kv_bytes, "kv_bytes_unpruned": 100,
            "note": ""}  # fmt: skip


def test_lmms_figures_stop_totalling_kv_once_a_call_was_not_measured():
    figures = Figures()
    figures.add(summary(50))
    assert figures.digest()["kv_ratio"] == 0.5
    figures.add(summary(None))
    figures.add(summary(50))
    assert figures.digest()["kv_ratio"] is None
