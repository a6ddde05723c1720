"""The main job on the embedded default: generate with and without ST3, compare what it cost.

Until the project's trained demo model ships, the default is a random LLaVA built from config with the
LLaVA-1.5 token layout (576 visual tokens from a 336 px image in 14 px patches) and a decoder as deep as
LLaVA-1.5-7B's (32 layers) but narrow. Random weights produce meaningless text, but the cost of a pruned
sequence does not depend on the weights: kept tokens per layer, KV bytes, FLOPs and wall time are real.
"""

from __future__ import annotations

import json
import time

import torch
from rich.console import Console
from rich.table import Table

import st3
from st3.tiny import tiny_inputs, tiny_llava


def demo_model():
    """The embedded default: LLaVA-1.5 token layout, 32-layer narrow decoder, random weights, fp32."""
    return tiny_llava(layers=32, hidden=128, heads=4, kv_heads=4, vocab=512, image_size=336, patch_size=14)


def timed_generate(model, inputs, max_new_tokens: int, method=None):
    """(sequences, cache, seconds) of a greedy generation, under `method` if given."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        start = time.perf_counter()
        if method is None:
            out = model.generate(**inputs, **kwargs)
        else:
            with method(model):
                out = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
    return out.sequences, out.past_key_values, seconds


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_demo(max_new_tokens: int = 64, json_path: str | None = None, console: Console | None = None) -> dict:
    """Run both generations, print a side-by-side table, and return (and optionally save) the figures."""
    console = console or Console()
    model = demo_model()
    inputs = tiny_inputs(model, ((12, 48),))  # 60 text tokens around the image, as in the README's arithmetic
    method = st3.ST3()
    timed_generate(model, inputs, 2)  # warm-up
    full_tokens, full_cache, full_seconds = timed_generate(model, inputs, max_new_tokens)
    st3_tokens, _, st3_seconds = timed_generate(model, inputs, max_new_tokens, method)
    summary = method.trace.summary()
    flops = summary["flops"]
    full_kv = cache_bytes(full_cache)
    assert full_kv == summary["kv_bytes_unpruned"], "the unpruned cache should match the trace's counterfactual"

    table = Table(title=f"st3 demo: {method!r}")
    table.add_column("")
    table.add_column("unpruned", justify="right")
    table.add_column("ST3", justify="right")
    table.add_column("ST3 / unpruned", justify="right")

    def row(name: str, full: float, pruned: float, fmt: str) -> None:
        table.add_row(name, format(full, fmt), format(pruned, fmt), f"{pruned / full:.1%}")

    n = summary["visual_tokens"][0]
    row("visual tokens per layer (mean, prefill)", n, summary["mean_visual_per_layer"], ".1f")
    row("prefill GFLOPs (decoder)", flops["prefill_unpruned"] / 1e9, flops["prefill"] / 1e9, ".3f")
    row("total GFLOPs (decoder)", flops["total_unpruned"] / 1e9, flops["total"] / 1e9, ".3f")
    row("KV cache at the end (KiB)", full_kv / 1024, summary["kv_bytes"] / 1024, ".0f")
    row("wall time (s)", full_seconds, st3_seconds, ".3f")
    console.print(table)
    for label, key in (("after prefill", "visual_per_layer"), ("at the last step", "visual_per_layer_final")):
        counts = " ".join(str(round(v)) for v in summary[key])
        console.print(f"visual tokens per layer {label}: {counts}", soft_wrap=True)
    same = (full_tokens == st3_tokens).float().mean().item()
    console.print(f"generated tokens identical to unpruned: {same:.0%} (random weights: content is meaningless)")

    result = {
        "model": "random LLaVA-1.5 layout, 32 narrow layers (embedded default)",
        "max_new_tokens": max_new_tokens,
        "unpruned": {"seconds": full_seconds, "kv_bytes": full_kv},
        "st3": {"seconds": st3_seconds, **summary},
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {json_path}")
    return result
