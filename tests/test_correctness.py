"""Pruned runs equal a masked full-sequence reference; pruning nothing equals the original model.

One matrix of methods x settings: every method registered later joins `METHODS` and gets every check.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import single
from reference import attention_weights, reference_logits

import st3
from st3.compat import cache_of

NEW_TOKENS = 8

#: Settings scaled to the tiny 6-layer model (36 visual tokens), so that every method prunes.
METHODS = {
    "st3": lambda: st3.ST3(start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2),
    "fastv": lambda: st3.FastV(layer=2, ratio=0.5),
    "fastv-all-rows": lambda: st3.FastV(layer=1, ratio=0.7, query="all"),
    "pyramiddrop": lambda: st3.PyramidDrop(keep=0.5),
    "vtw": lambda: st3.VTW(layer=3),
    "random": lambda: st3.Random(keep=12, layer=1, seed=3),
    "uniform": lambda: st3.Uniform(keep=10, layer=0),
    "visionzip": lambda: st3.VisionZip(dominant=7, contextual=4),
    "st3-text-query": lambda: st3.ST3(start_layer=2, stride=1, ratio=0.3, min_keep=2, query="text", anneal_every=1),
    "st3-layer0": lambda: st3.ST3(start_layer=0, stride=3, ratio=0.6, min_keep=2, anneal_curve="linear"),
    "st3-exponential": lambda: st3.ST3(start_layer=1, stride=1, ratio=0.2, anneal_curve="exponential", anneal_every=1),
    # compositions: schedule x selector (+ decode schedule)
    "divprune": lambda: st3.get("divprune", keep=10),
    "divprune-layer2-keys": lambda: st3.get("divprune", keep=12, layer=2, selector=st3.DivPrune(features="keys")),
    "dart": lambda: st3.get("dart", keep=12, layer=2, selector=st3.DART(pivots=3)),
    "cdpruner": lambda: st3.get("cdpruner", keep=9),
    "stratified": lambda: st3.get("stratified", keep=10),
    "st3+stratified-diverse": lambda: st3.get(
        "st3+stratified", start_layer=0, stride=2, ratio=0.5, min_keep=2, anneal_final=1.0,
        selector=st3.Stratified(within="diverse"),
    ),
    "st3+dart-accumulated": lambda: st3.get(
        "st3+dart", start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2,
        anneal_evict="accumulated",
    ),
    "st3+divprune-protected": lambda: st3.get(
        "st3+divprune", start_layer=1, stride=2, ratio=0.4, min_keep=2, anneal_steps=4, anneal_every=1,
        anneal_evict="protected", anneal_delay=1,
    ),
    "st3+cdpruner-diverse": lambda: st3.get(
        "st3+cdpruner", start_layer=0, stride=3, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=2,
        anneal_evict="diverse",
    ),
    "st3+uniform-coverage": lambda: st3.get(
        "st3+uniform", start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=1,
        anneal_evict="coverage", anneal_protect=0.3,
    ),
    "fastv+vta": lambda: st3.get("fastv+vta", layer=2, ratio=0.5, decode=st3.VTA(steps=4, every=1, min_keep=2)),
    "pyramiddrop+vta-text": lambda: st3.PyramidDrop(
        keep=0.5, selector=st3.Attention(query="text"), decode=st3.VTA(steps=6, every=2, evict="accumulated")
    ),
}


def generate(model, inputs, method=None, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        if method is None:
            return model.generate(**inputs, **kwargs)
        with method(model):
            return model.generate(**inputs, **kwargs)


def new_tokens(out, inputs):
    return out.sequences[:, inputs["input_ids"].shape[1] :]


# ------------------------------------------------------------------------------------ pruning nothing
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruning_nothing_equals_the_original_model(attn, model, eager_model, inputs):
    model = model if attn == "sdpa" else eager_model
    noop = st3.ST3(ratio=0.0, anneal_final=1.0)
    original = generate(model, inputs)
    pruned = generate(model, inputs, noop)
    assert torch.equal(original.sequences, pruned.sequences)
    for a, b in zip(original.logits, pruned.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not noop.trace.pruned


# ------------------------------------------------------------------------------- masked reference
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_run_equals_masked_reference(name, attn, model, eager_model, inputs):
    model = model if attn == "sdpa" else eager_model
    method = METHODS[name]()
    method.record_positions = True
    out = generate(model, inputs, method)
    assert method.trace.pruned
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        reference = reference_logits(model, inputs, method.trace, fed, method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)
        assert torch.equal(reference[:, start + step].argmax(-1), new_tokens(out, inputs)[:, step])


def test_decode_positions_are_recorded_only_on_request(model, inputs):
    method = METHODS["st3"]()
    generate(model, inputs, method)
    assert method.trace.decode_visual_positions is None
    assert len(method.trace.decode_visual_counts) == NEW_TOKENS - 1


# ------------------------------------------------------------------------------------- kept sets
@pytest.mark.parametrize("name", ["st3", "st3-text-query", "fastv", "fastv-all-rows", "pyramiddrop"])
def test_prefill_keeps_the_top_k_of_previous_layer_attention(name, model, inputs):
    method = METHODS[name]()
    with torch.no_grad(), method(model):
        model(**inputs)
    trace = method.trace
    with torch.no_grad():
        weights = attention_weights(model, inputs, trace)
    visual = inputs["input_ids"] == model.config.image_token_id
    checked = 0
    for layer in range(1, len(weights)):
        for b in range(inputs["input_ids"].shape[0]):
            before = trace.prefill_visual_positions[layer - 1][b]
            after = trace.prefill_visual_positions[layer][b]
            if len(after) == len(before):
                continue
            probs = weights[layer - 1][b].mean(0)  # [rows, keys], mean over heads
            if method.query_rows == "last":
                score = probs[-1]
            elif method.query_rows == "all":
                score = probs[inputs["attention_mask"][b].bool()].mean(0)
            else:
                image_end = int(visual[b].nonzero().max())
                rows = inputs["attention_mask"][b].bool() & ~visual[b]
                rows[: image_end + 1] = False
                score = probs[rows].mean(0)
            expected = before[score[before].topk(len(after)).indices].sort().values
            assert torch.equal(after, expected)
            checked += 1
    assert checked > 0


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


# ----------------------------------------------------------------------------- batches and backends
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_padded_batch_equals_its_samples_one_by_one(name, model, inputs):
    method = METHODS[name]()
    batch = generate(model, inputs, method)
    batch_trace = method.trace
    width = inputs["input_ids"].shape[1]
    for b in range(3):
        alone = generate(model, single(inputs, b), method)
        pad = width - alone.sequences.shape[1] + NEW_TOKENS
        assert torch.equal(new_tokens(batch, inputs)[b], new_tokens(alone, single(inputs, b))[0])
        for a, c in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[b], c[0], atol=1e-4, rtol=0)
        for layer, positions in enumerate(method.trace.prefill_visual_positions):
            assert torch.equal(batch_trace.prefill_visual_positions[layer][b] - pad, positions[0])
        assert decode_counts(batch_trace, b) == decode_counts(method.trace, 0)


def decode_counts(trace, sample: int) -> list[list[int]]:
    """[step][layer] visual tokens attended by one sample."""
    return [[layer[sample] for layer in step] for step in trace.decode_visual_counts]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_eager_and_sdpa_agree(name, model, eager_model, inputs):
    sdpa = generate(model, inputs, METHODS[name]())
    eager = generate(eager_model, inputs, METHODS[name]())
    assert torch.equal(sdpa.sequences, eager.sequences)
    for a, b in zip(sdpa.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- generation modes
def test_sampling_with_a_seed_is_reproducible_and_unpruned_sampling_is_unchanged(model, inputs):
    def sample(method):
        torch.manual_seed(123)
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20)
        with torch.no_grad():
            if method is None:
                return model.generate(**inputs, **kwargs)
            with method(model):
                return model.generate(**inputs, **kwargs)

    assert torch.equal(sample(None), sample(st3.ST3(ratio=0.0, anneal_final=1.0)))
    first, second = sample(METHODS["st3"]()), sample(METHODS["st3"]())
    assert torch.equal(first, second)


def test_beam_search_and_several_return_sequences(model, inputs):
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        original = model.generate(**inputs, **kwargs)
        with st3.ST3(ratio=0.0, anneal_final=1.0)(model):
            noop = model.generate(**inputs, **kwargs)
        method = METHODS["st3"]()
        with method(model):
            pruned = model.generate(**inputs, **kwargs)
            alone = model.generate(**single(inputs, 1), **kwargs)
    assert torch.equal(original, noop)
    assert pruned.shape == original.shape == (6, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert method.trace.batch_size == 3
    assert method.trace.pruned
    assert torch.equal(pruned[2:4, -NEW_TOKENS:], alone[:, -NEW_TOKENS:])


# --------------------------------------------------------------------------------- special inputs
def test_inputs_without_an_image_run_unpruned(model):
    ids = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        original = model(input_ids=ids).logits
        method = METHODS["st3"]()
        with method(model):
            pruned = model(input_ids=ids).logits
    torch.testing.assert_close(original, pruned, atol=1e-5, rtol=0)
    assert not method.trace.pruned
    assert "no visual tokens" in method.trace.note


def test_forward_returns_the_surviving_rows(model, inputs):
    method = METHODS["st3"]()
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
