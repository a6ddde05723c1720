"""The stock-decoder path (`st3.engine.stock`): a method that chooses only before the decoder runs the model's
own, unmodified decoder on the shortened prompt. Proven against the masked reference and st3's engine loop on
every family, with a static cache, and under `torch.compile` without a recompile per decode step."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, NEW_TOKENS, generate, new_tokens
from reference import reference_logits
from test_families import FAMILIES, applicable, models
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LogitsProcessor, LogitsProcessorList

import st3
from st3.adapters import adapter_for
from st3.compat import cache_of

#: The cases whose declared schedule chooses only before the decoder (read off the schedule, not a name list).
STOCK = sorted(name for name, make in CASES.items() if make().chooses_before_decoder(6))
#: In `make test`: spread on every family, VisionZip's compression (or its refusal); the rest is `slow`.
FAST = ("spread", "visionzip")
#: Families of the default-path test in `make test` (1-D and M-RoPE with deepstack); the others are `slow`.
FAST_FAMILIES = ("llava", "qwen3-vl")


def stock_matrix() -> list:
    """(family, case, cache); fast: the FAST cases with a static cache everywhere, and LLaVA's with a dynamic one."""

    def fast(f: str, m: str, c: str) -> bool:
        return m in FAST and (c == "static" or f == "llava")

    return [pytest.param(f, m, c, marks=() if fast(f, m, c) else pytest.mark.slow, id=f"{f}-{m}-{c}")
            for f in FAMILIES for m in STOCK for c in ("dynamic", "static")]  # fmt: skip


def test_the_schedule_decides_which_methods_take_the_stock_decoder():
    assert {"cdpruner", "divprune", "lattice", "spread", "stratified", "visionzip"} <= set(STOCK)
    for name in ("st3", "fastv", "pyramiddrop", "vtw", "random", "dart", "fastv+vta", "st3-layer0"):
        assert not CASES[name]().chooses_before_decoder(6), name
    assert not st3.Spread(keep=8, decode=st3.VTA()).chooses_before_decoder(6)  # evicts while decoding
    assert st3.ST3(start_layer=0, stride=8, anneal_final=1.0).chooses_before_decoder(6)  # prunes at layer 0 only


def run(model, inputs: dict, method, decoder: str = "auto", **extra):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True, **extra}  # fmt: skip
    with torch.no_grad(), method(model, decoder=decoder):
        return model.generate(**inputs, **kwargs)


@pytest.mark.parametrize("family,name,cache", stock_matrix())
def test_stock_decoder_equals_masked_reference_and_the_engine(family, name, cache):
    if not applicable(family, name):
        return
    model, _, inputs = models(family)
    method = CASES[name]()
    method.record_positions = True
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    if not all(adapter_for(model).mask_rule(i).causal for i in range(len(adapter_for(model).layers))):
        with pytest.raises(ValueError, match="sliding windows or bidirectional image blocks"):
            run(model, inputs, method, "stock", **extra)  # Gemma 3: the model's masks count slots, not columns
        return
    out = run(model, inputs, method, "stock", **extra)
    trace = method.trace
    assert trace.pruned
    kept = [p.tolist() for p in trace.prefill_visual_positions[0]]
    assert all([p.tolist() for p in layer] == kept for layer in trace.prefill_visual_positions)
    # The decoder's own cache holds the shortened prompt (the survivors, left-padded to the longest) + new tokens.
    if cache == "dynamic":
        assert cache_of(out).get_seq_length() == max(trace.prefill_rows[0]) + NEW_TOKENS - 1
    # The trace records every decode forward: each layer attended to the survivors and the tokens fed so far, and
    # the cache's bytes (a static cache: its whole buffer) are measured after it.
    survivors, layers = trace.prefill_rows[0], len(trace.prefill_rows)
    assert trace.decode_keys == [[[n + step for n in survivors]] * layers for step in range(1, NEW_TOKENS)]
    assert trace.decode_visual_counts == [[[len(p) for p in kept]] * layers] * (NEW_TOKENS - 1)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache_of(out).layers)
    assert trace.kv_bytes == cached > 0 and trace.kv_bytes_peak == cached
    # The masked reference, from the trace's own decode record: every step sees the prefill's survivors.
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        reference = reference_logits(model, inputs, trace, fed, method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)
    # st3's own loop chooses the same tokens and gives the same logits.
    engine_method = CASES[name]()
    engine = run(model, inputs, engine_method, "engine")
    assert [p.tolist() for p in engine_method.trace.prefill_visual_positions[0]] == kept
    assert torch.equal(engine.sequences, out.sequences)
    for a, b in zip(engine.logits, out.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f in FAST_FAMILIES else pytest.mark.slow) for f in sorted(FAMILIES)]
)
def test_a_static_cache_takes_the_stock_decoder_by_default(family):
    model, _, inputs = models(family)
    if not all(adapter_for(model).mask_rule(i).causal for i in range(len(adapter_for(model).layers))):
        with pytest.raises(TypeError, match="sliding windows or image blocks run exactly only on st3's own loop"):
            run(model, inputs, CASES["spread"](), cache_implementation="static")  # Gemma 3: st3's loop only
        return
    dynamic = generate(model, inputs, CASES["spread"]())
    static = run(model, inputs, CASES["spread"](), cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_in_decoder_methods_refuse_the_stock_decoder_and_a_static_cache():
    model, _, inputs = models("llava")
    with pytest.raises(ValueError, match="prunes inside the decoder"):
        CASES["st3"]()(model, decoder="stock")
    with pytest.raises(TypeError, match="choose only before the decoder"):
        run(model, inputs, CASES["fastv"](), cache_implementation="static")
    with pytest.raises(ValueError, match="decoder: must be one of"):
        CASES["spread"]()(model, decoder="fast")
    model.forward = torch.compile(model.forward)
    try:
        with pytest.raises(ValueError, match="does not run under torch.compile"), CASES["st3"]()(model):
            pass
    finally:
        del model.forward


def test_the_stock_path_restores_the_model_exactly():
    model, _, inputs = models("llava")
    lm = model.model.language_model
    before = (dict(model.__dict__), dict(lm.__dict__))
    run(model, inputs, CASES["spread"](), "stock", cache_implementation="static")
    assert "forward" not in lm.__dict__ and "prepare_inputs_for_generation" not in model.__dict__
    assert before == (dict(model.__dict__), dict(lm.__dict__))


class _Frames(LogitsProcessor):
    """Records, at every generated token, how many frames dynamo has compiled so far."""

    def __init__(self, counter: CompileCounterWithBackend):
        self.counter, self.seen = counter, []

    def __call__(self, input_ids, scores):
        self.seen.append(self.counter.frame_count)
        return scores


def compiled_frames(model, inputs: dict, method, backend: str) -> tuple[list[int], object]:
    """Frames compiled by the time of each token of a static-cache generate under `torch.compile(model.forward)`."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    model.forward = torch.compile(model.forward, backend=counter)
    frames = _Frames(counter)
    try:
        out = run(model, inputs, method, logits_processor=LogitsProcessorList([frames]), max_new_tokens=5,
                  cache_implementation="static")  # fmt: skip
    finally:
        del model.forward  # the instance attribute set above; the class's forward is back
        torch._dynamo.reset()
    return frames.seen, out


def check_compiled(family: str, backend: str) -> None:
    """Compiled == eager; no frame compiled after the first decode step."""
    model, _, inputs = models(family)
    seen, out = compiled_frames(model, inputs, CASES["spread"](), backend)
    eager = run(model, inputs, CASES["spread"](), max_new_tokens=5, cache_implementation="static")
    assert torch.equal(out.sequences, eager.sequences)
    for a, b in zip(out.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert len(set(seen[1:])) == 1, f"frames compiled per token: {seen}"  # nothing after the first decode step


def test_torch_compile_does_not_recompile_per_decode_step():
    """Dynamo alone (the eager backend): recompiles are dynamo's guards, which do not depend on the backend."""
    check_compiled("llava", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl", "qwen3-vl"])
def test_inductor_compiles_the_stock_decoder_once(family):
    check_compiled(family, "inductor")
