"""The engine's own steps by name, for profilers: `st3.bench.profile` labels each inside torch.profiler.

The engine keeps this list next to the code it names, so a profiler never reaches into private names itself
(tests/test_layering.py holds apps to that) and a renamed step is caught here (tests check every entry exists).
"""

from __future__ import annotations

from st3 import compat
from st3.compat import DynamicLayer
from st3.engine import forward, rows
from st3.engine.cache import PrunableLayer
from st3.engine.forward import Engine
from st3.engine.masks import DecodeMasks

#: (object, attribute, label): the steps a profiler may label. Labels nest (a forward includes its layers).
STEPS: tuple[tuple[object, str, str], ...] = (
    (Engine, "_prefill", "st3: prefill forward (all layers)"),
    (Engine, "_decode", "st3: decode forward (all layers)"),
    (compat, "causal_mask", "st3: mask building (create_causal_mask per layer)"),
    (DecodeMasks, "__call__", "st3: decode mask lookup"),
    (Engine, "_prefill_scores", "st3: prefill scoring (re-projected attention)"),
    (Engine, "_evict", "st3: decode eviction (scoring + select + keep)"),
    (PrunableLayer, "keep", "st3: cache keep (gather K/V + bookkeeping)"),
    (PrunableLayer, "record", "st3: cache bookkeeping (record columns/valid/visual)"),
    (rows, "gather", "st3: gather rows/cos/sin/positions"),
    (rows, "pack_index", "st3: pack_index (stable sort)"),
    (forward, "pack_index", "st3: pack_index (stable sort)"),
    (Engine, "_measure_kv", "st3: measure KV bytes"),
    (Engine, "_visual_mask", "st3: locate visual tokens"),
    (DynamicLayer, "update", "cache update (torch.cat of K/V)"),
)
