"""Sliding windows and image blocks over pruned caches (Gemma 3): what a window means when a layer holds fewer
slots than columns, and what st3 refuses.

A window counts ORIGINAL columns, as the model's own mask does (`kv > q - window` over sequence indices): a slot
at column k is visible from column q iff k > q - window, however many slots were pruned in between. The masked
reference (the model's own mask, intersected with the pruning) is the proof of equality; the tests here show that
the window really slides, that the prunable sliding layer drops exactly what no later token can see, and that a
window much smaller than the prompt is exact too.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, generate, new_tokens
from reference import reference_logits
from test_families import GEMMA_BATCH, gemma_single, models

import st3
from st3.adapters import UnsupportedModel, adapter_for
from st3.compat import cache_of
from st3.engine.cache import PrunableLayer
from st3.testing import tiny_gemma3, tiny_gemma3_inputs


def test_a_window_counts_original_columns_not_slots():
    layer = PrunableLayer(window=4)
    columns = torch.tensor([[0, 2, 3, 6, 7]])  # columns 1, 4 and 5 were pruned
    keys = columns[:, None, :, None].float()
    layer.update(keys, keys.clone())
    layer.end_prefill(columns, torch.ones(1, 5, dtype=torch.bool), columns < 4, [5], [3], False, width=8)
    layer.drop_outside_window()  # the next token is column 8: it sees columns 5, 6, 7 (and itself)
    assert layer.columns.tolist() == [[6, 7]]  # counted in slots, the last 3 would have kept column 3
    assert layer.keys[0, 0, :, 0].tolist() == [6.0, 7.0] and layer.real == [2] and layer.held == [0]


def test_the_family_row_slides_its_window_and_its_sliding_layers_drop_what_left_it():
    model, _, inputs = models("gemma3")
    adapter = adapter_for(model)
    rules = [adapter.mask_rule(i) for i in range(len(adapter.layers))]
    window = model.config.text_config.sliding_window
    assert {rule.window for rule in rules} == {None, window} and all(rule.blocks for rule in rules)
    assert inputs["input_ids"].shape[1] > window  # the longest prompt is longer than the window
    cache = cache_of(generate(model, inputs, CASES["st3"]()))  # anneals: evicts from every layer while decoding
    first = [int(c[v].min()) for c, v in zip(cache.layers[0].columns, cache.layers[0].valid)]
    for layer in cache.layers:
        oldest = [int(c[v].min()) for c, v in zip(layer.columns, layer.valid)]
        if layer.window is None:
            assert oldest[2] == 0  # a full layer keeps the longest prompt's first token
        else:
            assert oldest[2] > layer.next_column - 2 - window > 0  # dropped up to the window (a step behind at most)
    assert first[:2] == [30, 18]  # the shorter prompts' windows still hold their first tokens


@pytest.fixture(scope="module")
def narrow():
    """Gemma 3 with a 16-column window: far smaller than every prompt (31 to 61 tokens) and than two images."""
    model = tiny_gemma3(window=16)
    return model, tiny_gemma3_inputs(model, GEMMA_BATCH)


def _equals_masked_reference(model, inputs, method) -> None:
    method.record_positions = True
    out = generate(model, inputs, method)
    assert method.trace.pruned
    with torch.no_grad():
        reference = reference_logits(model, inputs, method.trace, new_tokens(out, inputs)[:, :-1], method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: st3.get("spread", keep=10),  # no attention read
        lambda: st3.FastV(layer=3, ratio=0.5),  # ranks by layer 2's attention: a full layer
        # scores at full layers 2 and 5; anneals on every layer, the sliding ones dropping what left their window
        lambda: st3.ST3(start_layer=3, stride=3, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=1),
    ],
    ids=["spread", "fastv-after-a-full-layer", "st3-at-full-layers"],
)
def test_a_window_far_smaller_than_the_prompt_is_exact(narrow, build):
    model, inputs = narrow
    _equals_masked_reference(model, inputs, build())
    batch = generate(model, inputs, build())
    for b in range(3):
        alone_inputs = gemma_single(inputs, b)
        alone = generate(model, alone_inputs, build())
        assert torch.equal(new_tokens(batch, inputs)[b], new_tokens(alone, alone_inputs)[0])
        for x, y in zip(batch.logits, alone.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "build",
    [lambda: st3.get("spread", keep=10), lambda: st3.ST3(start_layer=3, stride=3, ratio=0.5, anneal_steps=6)],
    ids=["spread", "st3-annealing"],
)
def test_sliding_layers_hold_no_more_than_transformers_own_sliding_cache(narrow, build):
    """After the last decode forward a sliding layer holds only columns the next token sees (at most window - 1
    per sample, what transformers' own `DynamicSlidingWindowLayer` keeps), and the trace's KV bytes say so."""
    model, inputs = narrow
    window = model.config.text_config.sliding_window
    method = build()
    ours = cache_of(generate(model, inputs, method))
    theirs = cache_of(generate(model, inputs))  # the model alone, its own cache
    trace, batch = method.trace, inputs["input_ids"].shape[0]
    slot = trace.shape.kv_bytes_per_token(4) * batch  # fp32, one slot of every sample
    full = sliding = 0
    for mine, stock in zip(ours.layers, theirs.layers):
        assert mine.keys.shape[-2] <= stock.keys.shape[-2]
        if mine.window is None:
            full += mine.keys.shape[-2] * slot
            continue
        assert stock.keys.shape[-2] == window - 1  # transformers keeps the last window - 1 columns
        assert mine.keys.shape[-2] == max(mine.real) <= window - 1
        assert (mine.columns[mine.valid] > mine.next_column - window).all()
        sliding += 1
    nbytes = [sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) for cache in (ours, theirs)]
    assert trace.kv_bytes == nbytes[0] <= full + sliding * (window - 1) * slot and nbytes[0] < nbytes[1]
    assert trace.kv_bytes_unpruned == nbytes[1]  # the unpruned baseline is transformers' own sliding cache
    # Before sliding layers dropped what left their window, each held the rows its prefill kept plus one per step.
    kept = sum(max(rows) + trace.decode_steps for rows in trace.prefill_rows) * slot
    assert trace.kv_bytes < kept
    # What the trace counts as attended (FLOPs) is what the window lets each decode row see.
    sliding_layers = [i for i, layer in enumerate(ours.layers) if layer.window is not None]
    assert all(step[i][b] <= window for step in trace.decode_keys for i in sliding_layers for b in range(batch))


def test_attention_a_sliding_layer_never_computed_is_refused(narrow):
    model, inputs = narrow
    with pytest.raises(ValueError, match="sliding-window layer .* never computed"):
        generate(model, inputs, st3.FastV(layer=2, ratio=0.5))  # would rank by layer 1's: a 16-column window
    # FastV(layer=3) ranks by layer 2's attention, a full layer: exact (test_a_window_far_smaller_than_the_prompt...)


def test_gemma3_refuses_attention_it_cannot_mask():
    model = tiny_gemma3(layers=3)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModel, match="not support flash attention"):
        st3.FastV(layer=1)(model)


# ------------------------------------------------------------------------ Mistral and Qwen2 inside LLaVA
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,refused",
    [
        (dict(text_model="mistral", sliding_window=16), True),  # every layer slides: FastV would rank by layer 1's
        # layers 0-1 full, 2-5 sliding: FastV ranks by layer 1's attention, a full layer
        (dict(text_model="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2), False),
    ],
    ids=["mistral-window-16", "qwen2-window-8-from-layer-2"],
)
def test_llava_runs_sliding_window_decoders_exactly(overrides, refused):
    from test_families import LLAVA_BATCH, llava_single

    from st3.testing import tiny_inputs, tiny_llava

    model = tiny_llava(**overrides)
    inputs = tiny_inputs(model, LLAVA_BATCH)  # 46 to 47 tokens: several windows long
    assert any(adapter_for(model).mask_rule(i).window for i in range(6))
    _equals_masked_reference(model, inputs, st3.get("spread", keep=10))
    batch = generate(model, inputs, st3.get("spread", keep=10))
    for b in range(3):
        alone_inputs = llava_single(inputs, b)
        alone = generate(model, alone_inputs, st3.get("spread", keep=10))
        for x, y in zip(batch.logits, alone.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)
    if refused:
        with pytest.raises(ValueError, match="never computed"):
            generate(model, inputs, st3.FastV(layer=2, ratio=0.5))
    else:
        _equals_masked_reference(model, inputs, st3.FastV(layer=2, ratio=0.5))
