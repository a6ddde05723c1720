"""Every registered method x every generic property, on the tiny LLaVA (tests/cases.py builds the cases).

The properties checked once per method: its no-op setting equals the model (greedy sdpa and eager, sampling,
beams); sampling is seeded and leaves the global RNG alone; beam search runs and a padded batch's beams
equal each sample's alone; input without an image runs unpruned; the model is restored exactly (after a
normal exit, an exception of the caller's and an error of st3's); bad knobs are refused naming the knob.
Checked for every case (all settings): the model-free planner equals the real run, and the KV bytes
measured from the cache equal the planned ones. Greedy runs against the masked reference, a padded batch
against its samples one by one and eager against sdpa are checked for every case on every family in
tests/proofs/test_families.py. A property that does not apply to a method is declared in tests/cases.py with
its reason (`NO_NOOP`) or below (`KNOB_EXCEPTIONS`), never left out silently.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from cases import CASES, NEW_TOKENS, NO_NOOP, REGISTERED, TEXT, TINY, VISUAL, generate, noop
from conftest import BATCH, single

import st3
from st3.adapters import adapter_for
from st3.compat import cache_of
from st3.plan import plan
from st3.testing import tiny_inputs

BEAMS = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
SAMPLING = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20)


def test_the_cases_describe_the_tiny_model(model, inputs):
    """tests/cases.py sizes budgets from TINY/VISUAL/TEXT: they must be the test model's."""
    assert adapter_for(model).shape == TINY
    assert model.config.image_seq_length == VISUAL
    assert int(single(inputs, 0)["attention_mask"].sum()) == VISUAL + TEXT


def test_every_registered_method_has_a_case_that_prunes(model, inputs):
    assert sorted(REGISTERED) == st3.methods()
    for name, build in REGISTERED.items():
        method = build()
        assert isinstance(method, type(st3.get(name))), name
        generate(model, inputs, method)
        assert method.trace.pruned, f"{name}: its case prunes nothing on the tiny model"


def sample(model, inputs, method=None):
    torch.manual_seed(123)
    with torch.no_grad():
        if method is None:
            return model.generate(**inputs, **SAMPLING)
        with method(model):
            return model.generate(**inputs, **SAMPLING)


TEXT_ONLY = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
TEXT_INPUTS = {"input_ids": TEXT_ONLY, "attention_mask": torch.ones_like(TEXT_ONLY)}


@pytest.fixture(scope="module")
def unpruned(model, eager_model):
    """The model's own outputs, computed once per module: run(kind, attn) for kind greedy, sample, beams, text."""
    memo: dict = {}

    def run(kind: str, attn: str = "sdpa"):
        if (kind, attn) not in memo:
            m = model if attn == "sdpa" else eager_model
            batch = tiny_inputs(m, BATCH)
            runs = {"greedy": lambda: generate(m, batch), "sample": lambda: sample(m, batch),
                    "beams": lambda: generate(m, batch, **BEAMS, output_logits=False, return_dict_in_generate=False),
                    "text": lambda: generate(m, TEXT_INPUTS)}  # fmt: skip
            memo[kind, attn] = runs[kind]()
        return memo[kind, attn]

    return run


# ------------------------------------------------------------------------------------ the no-op
def noop_or_skip(name: str):
    if name in NO_NOOP:
        pytest.skip(f"{name} has no no-op setting: {NO_NOOP[name]}")
    return noop(name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_the_no_op_setting_equals_the_model(name, attn, model, eager_model, inputs, unpruned):
    model = model if attn == "sdpa" else eager_model
    method = noop_or_skip(name)
    original, pruned = unpruned("greedy", attn), generate(model, inputs, method)
    assert torch.equal(original.sequences, pruned.sequences)
    for a, b in zip(original.logits, pruned.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not method.trace.pruned


# ------------------------------------------------------------------------------- generation modes
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_sampling_is_seeded_and_the_no_op_samples_as_the_model(name, model, inputs, unpruned):
    if name not in NO_NOOP:
        assert torch.equal(unpruned("sample"), sample(model, inputs, noop(name)))
    method = REGISTERED[name]()
    first, second = sample(model, inputs, method), sample(model, inputs, REGISTERED[name]())
    assert method.trace.pruned
    assert torch.equal(first, second)
    state = torch.get_rng_state()  # a method draws from its own generators, never from the user's
    generate(model, inputs, REGISTERED[name](), max_new_tokens=3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_beam_search_runs_and_a_samples_beams_equal_its_beams_alone(name, model, inputs, unpruned):
    original = unpruned("beams")
    with torch.no_grad():
        if name not in NO_NOOP:
            with noop(name)(model):
                assert torch.equal(model.generate(**inputs, **BEAMS), original)
        method = REGISTERED[name]()
        with method(model):
            pruned = model.generate(**inputs, **BEAMS)
            assert method.trace.pruned
            alone = model.generate(**single(inputs, 2), **BEAMS)  # the most padded sample, last in the batch
    assert pruned.shape == original.shape == (6, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(pruned[4:6, -NEW_TOKENS:], alone[:, -NEW_TOKENS:])  # its beams are rows 4 and 5


# --------------------------------------------------------------------------------- special inputs
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_input_without_an_image_runs_unpruned(name, model, unpruned):
    method = REGISTERED[name]()
    original, pruned = unpruned("text"), generate(model, TEXT_INPUTS, method)
    assert torch.equal(original.sequences, pruned.sequences)
    for a, b in zip(original.logits, pruned.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not method.trace.pruned
    assert "no visual tokens" in method.trace.note


# ------------------------------------------------------------------------- planner and KV bytes
@pytest.fixture(scope="module")
def alone_runs(model):
    """{case: (generate output, method)} for sample 0 alone (no padding: the planner's one sample)."""
    runs: dict = {}
    sample = single(tiny_inputs(model, BATCH), 0)

    def run(case: str):
        if case not in runs:
            method = CASES[case]()
            runs[case] = (generate(model, sample, method), method)
        return runs[case]

    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_planner_equals_the_real_run(case, alone_runs):
    _, method = alone_runs(case)
    trace = method.trace
    assert trace.visual_tokens == [VISUAL] and trace.prompt_tokens == [VISUAL + TEXT]
    expected = plan(CASES[case](), TINY, visual=VISUAL, text=TEXT, new_tokens=NEW_TOKENS)
    assert trace.visual_per_layer == expected.prefill_visual
    assert [[layer[0] for layer in step] for step in trace.decode_visual_counts] == expected.decode_visual
    summary = trace.summary()
    assert summary["prefill_flops_ratio"] == pytest.approx(expected.prefill_flops_ratio)
    assert summary["total_flops_ratio"] == pytest.approx(expected.total_flops_ratio)
    assert summary["kv_ratio"] == pytest.approx(expected.kv_ratio)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_bytes_measured_equal_the_planned_bytes(case, alone_runs):
    out, method = alone_runs(case)
    cache = cache_of(out)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    held = plan(CASES[case](), TINY, visual=VISUAL, text=TEXT, new_tokens=NEW_TOKENS).final_visual
    per_token = TINY.kv_bytes_per_token(4)  # fp32
    assert method.trace.kv_bytes == measured == per_token * sum(TEXT + NEW_TOKENS - 1 + n for n in held)
    assert method.trace.kv_bytes_peak >= measured


# ------------------------------------------------------------------------------------- restoring
def snapshot(model) -> dict:
    """What applying a method could leave behind: per module its class, instance attributes and hooks;
    the weights and buffers; the attention backend; transformers' attention-function table."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return {
        "modules": {
            name: (type(m), type(m).forward, sorted(vars(m)), m.training, [list(getattr(m, h)) for h in hooks])
            for name, m in model.named_modules()
        },
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "attn": [(m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")],
        "functions": dict(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS),
        "sdpa": torch.nn.functional.scaled_dot_product_attention,
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["attn"] == before["attn"] and after["sdpa"] is before["sdpa"]
    assert after["functions"] == before["functions"]


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_the_model_is_restored_exactly(name, model, inputs):
    before = snapshot(model)
    with torch.no_grad():
        reference = model(**inputs).logits
        method = REGISTERED[name]()
        with method(model):  # a normal exit, after a generate that pruned
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert snapshot(model)["modules"] != before["modules"]
        assert method.trace.pruned
        assert_same(before, snapshot(model))
        with pytest.raises(RuntimeError, match="boom"), REGISTERED[name]()(model):  # the caller's exception
            model(**inputs)
            raise RuntimeError("boom")
        assert_same(before, snapshot(model))
        right_padded = dict(inputs, attention_mask=inputs["attention_mask"].flip(-1))
        with pytest.raises(ValueError, match="left padding"), REGISTERED[name]()(model):  # an error of st3's
            model(**right_padded)
        assert_same(before, snapshot(model))
        torch.testing.assert_close(model(**inputs).logits, reference, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- bad knobs
#: (method, knob): why the generic bad value below is valid for it.
KNOB_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("random", "seed"): "every integer seeds the draw",
    ("sgl", "guide"): "a checkpoint path or hub id is checked when it is loaded, as the method is applied (a "
    "missing one is refused then: tests/rules/test_systems.py)",
    ("vtccls", "start"): "a slice start over the tower's layers: a negative one counts from the end (refused "
    "when applied if it starts after the feature layer: tests/rules/test_systems.py)",
}
#: Knobs that name a layer: a layer beyond the model is refused when the method is applied.
LAYER_KNOBS = ("layer", "start_layer", "stages")


def bad_value(field: dataclasses.Field, default):
    """A value out of range for any knob of this kind, or None where every value of its type is valid."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if isinstance(default, bool) or kind == "bool":
        return None
    if isinstance(default, int) or kind.startswith("int"):
        return -1
    if isinstance(default, float):
        return -0.5
    if kind.startswith("tuple"):
        return (-1,)
    return "no-such-value"  # strings, and selector / decode names


def knob_cases() -> list:
    cases = []
    for name in sorted(REGISTERED):
        method = st3.get(name)
        for field in dataclasses.fields(method):
            if not field.init or field.name == "record_positions":
                continue
            value = bad_value(field, getattr(method, field.name))
            if (name, field.name) in KNOB_EXCEPTIONS or value is None:
                continue
            cases.append(pytest.param(name, field.name, value, id=f"{name}-{field.name}"))
    return cases


@pytest.mark.parametrize(("name", "knob", "value"), knob_cases())
def test_a_bad_knob_is_refused_naming_it(name, knob, value):
    with pytest.raises(ValueError, match=f"^{knob}: "):
        st3.get(name, **{knob: value})


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_an_unknown_knob_is_refused_naming_it(name):
    with pytest.raises(TypeError, match="no_such_knob"):
        st3.get(name, no_such_knob=1)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_a_layer_beyond_the_model_is_refused_when_applied(name, model):
    method = st3.get(name)
    knobs = {f.name: f.type for f in dataclasses.fields(method) if f.name in LAYER_KNOBS}
    if not knobs:
        pytest.skip(f"{name} has no knob that names a layer ({', '.join(LAYER_KNOBS)})")
    for knob, kind in knobs.items():
        beyond = (100,) if str(kind).startswith("tuple") else 100
        with pytest.raises(ValueError, match=f"^{knob}: .*beyond"):
            st3.get(name, **{knob: beyond})(model)
