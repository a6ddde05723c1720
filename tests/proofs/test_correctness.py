"""ST3's own rules on the tiny LLaVA: its prefill schedule, its annealing curves and eviction rules.

The generic proofs (masked reference, no-op, batch == one by one, eager == sdpa, generation modes) run for
every registered method in tests/proofs/test_families.py and tests/proofs/test_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, NEW_TOKENS, generate, new_tokens
from reference import attention_weights

import st3
from st3.compat import cache_of


def test_decode_positions_are_recorded_only_on_request(model, inputs):
    method = CASES["st3"]()
    generate(model, inputs, method)
    assert method.trace.decode_visual_positions is None
    assert len(method.trace.decode_visual_counts) == NEW_TOKENS - 1


def evictions(model, inputs, method):
    """Run `method` recording positions; yield (attended, kept, attention [heads, queries, keys]) per eviction.

    `attended`: the visual columns step `t` attended to; `kept`: those left after its eviction; the attention
    rows are the reference's eager weights of every decode query up to step `t`, for that layer and sample.
    """
    method.record_positions = True
    out = generate(model, inputs, method)
    trace = method.trace
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        weights = attention_weights(model, inputs, trace, fed)
    prompt = inputs["input_ids"].shape[1]
    for t in range(len(trace.decode_visual_positions) - 1):
        for layer, probs in enumerate(weights):
            for b in range(fed.shape[0]):
                attended = trace.decode_visual_positions[t][layer][b]
                kept = trace.decode_visual_positions[t + 1][layer][b]
                if len(kept) != len(attended):
                    yield attended, kept, probs[b, :, prompt : prompt + t + 1]


def test_annealing_evicts_the_least_attended_by_the_current_token(model, inputs):
    method = st3.ST3(start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=1)
    checked = 0
    for attended, kept, rows in evictions(model, inputs, method):
        score = rows[:, -1].mean(0)
        expected = attended[score[attended].topk(len(kept)).indices].sort().values
        assert torch.equal(kept, expected)
        checked += 1
    assert checked > 0


# ------------------------------------------------------------------------------------- schedules
def st3_prefill_schedule(n: int, layers: int, start_layer: int, stride: int, ratio: float, min_keep: int) -> list[int]:
    counts, held = [], n
    for layer in range(layers):
        if layer >= start_layer and (layer - start_layer) % stride == 0:
            held = min(held, max(min_keep, math.ceil((1 - ratio) * held - 1e-9)))
        counts.append(held)
    return counts


def cosine(final: float, steps: int, t: int) -> float:
    x = min(t / steps, 1.0)
    return final + (1 - final) * (1 + math.cos(math.pi * x)) / 2


@pytest.mark.parametrize("every", [1, 3])
def test_cache_lengths_follow_the_schedule(every, model, inputs):
    knobs = dict(start_layer=1, stride=2, ratio=0.5, min_keep=3)
    method = st3.ST3(**knobs, anneal_final=0.3, anneal_steps=5, anneal_every=every)
    out = generate(model, inputs, method)
    trace = method.trace
    layers = model.config.text_config.num_hidden_layers
    n = model.config.image_seq_length
    prefill = st3_prefill_schedule(n, layers, **knobs)
    assert [len(p) for p in trace.prefill_visual_positions[0]] == [n] * 3
    assert trace.visual_per_layer == prefill

    held = list(prefill)
    for t, counts in enumerate(trace.decode_visual_counts):
        assert counts == [[h] * 3 for h in held], f"decode forward {t}"
        for layer in range(layers):  # keys = prompt + fed tokens so far + visual held
            assert trace.decode_keys[t][layer] == [p - n + t + 1 + held[layer] for p in trace.prompt_tokens]
        if (t + 1) % every == 0:
            budgets = [min(p, max(3, round(p * cosine(0.3, 5, t + 1)))) for p in prefill]
            held = [min(h, b) for h, b in zip(held, budgets)]

    cache = cache_of(out)
    for layer in range(layers):
        real = cache.layers[layer].valid.sum(-1).tolist()
        steps = len(trace.decode_keys)
        assert real == [p - n + steps + held[layer] for p in trace.prompt_tokens]
        assert cache.layers[layer].keys.shape[-2] >= max(real)


@pytest.mark.parametrize("curve", ["linear", "cosine", "exponential"])
def test_annealing_curves_fall_from_one_to_final(curve):
    from st3.methods.st3 import anneal

    values = [anneal(curve, 0.25, 10, t) for t in range(15)]
    assert values[0] == 1.0
    assert values[10:] == pytest.approx([0.25] * 5)
    assert all(a >= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------------- special inputs
def test_forward_returns_the_surviving_rows(model, inputs):
    method = CASES["st3"]()
    with torch.no_grad(), method(model):
        logits = model(**inputs).logits
    trace = method.trace
    survivors = max(trace.prefill_rows[-1])
    assert logits.shape[1] == survivors < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("rule", ["accumulated", "coverage"])
def test_annealing_by_accumulated_attention_evicts_by_the_sum_over_steps(rule, model, inputs):
    method = st3.ST3(start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=1,
                     anneal_evict=rule, anneal_protect=0.0)  # fmt: skip
    checked = 0
    for attended, kept, rows in evictions(model, inputs, method):
        received = rows.mean(0).sum(0)[attended]
        order = received.topk(len(kept), largest=rule == "accumulated").indices
        assert torch.equal(kept, attended[order].sort().values)
        checked += 1
    assert checked > 0
