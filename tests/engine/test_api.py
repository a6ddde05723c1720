"""The public contract for ST3: validated knob ranges, clear errors, the registry, the trace.

Restoring the model and refusing bad knobs are checked for every method in test_properties.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import st3
from st3.compat import cache_of

BAD_KNOBS = [
    ("ratio", -0.1),
    ("ratio", 1.0),
    ("stride", 0),
    ("start_layer", -1),
    ("min_keep", -1),
    ("query", "first"),
    ("anneal_curve", "step"),
    ("anneal_final", 0.0),
    ("anneal_final", 1.5),
    ("anneal_steps", 0),
    ("anneal_every", 0),
]


@pytest.mark.parametrize(("knob", "value"), BAD_KNOBS)
def test_invalid_knobs_raise_a_value_error_naming_the_knob(knob, value):
    with pytest.raises(ValueError, match=knob):
        st3.ST3(**{knob: value})


def test_start_layer_beyond_the_last_layer_is_rejected_when_applied(model):
    with pytest.raises(ValueError, match="start_layer"):
        st3.ST3(start_layer=6)(model)


def test_an_unsupported_model_names_the_supported_classes():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        st3.ST3()(LlamaForCausalLM(config))


def test_applying_a_second_method_while_one_is_active_is_an_error(model):
    with st3.ST3()(model), pytest.raises(RuntimeError, match="already applied"), st3.ST3(ratio=0.5)(model):
        pass
    with st3.ST3()(model):  # and the first exit released the model
        pass


def test_requesting_attentions_is_a_clear_error(model, inputs):
    with pytest.raises(ValueError, match="output_attentions"), torch.no_grad(), st3.ST3()(model):
        model(**inputs, output_attentions=True)


def test_the_trace_is_available_only_after_a_run():
    with pytest.raises(RuntimeError, match="no trace yet"):
        _ = st3.ST3().trace


def test_registry_builds_methods_by_name():
    assert "st3" in st3.methods()
    method = st3.get("ST3", ratio=0.5)
    assert isinstance(method, st3.ST3) and method.ratio == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        st3.get("nope")


def test_trace_summary_is_json_and_consistent(model, inputs):
    method = st3.ST3(start_layer=1, stride=2, ratio=0.5, anneal_steps=4, anneal_every=1)
    with torch.no_grad(), method(model):
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    summary = json.loads(json.dumps(method.trace.summary()))
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache_of(out).layers)
    assert summary["kv_bytes"] == cache_bytes
    assert summary["kv_bytes_peak"] >= cache_bytes
    assert 0 < summary["kv_ratio"] < 1 and 0 < summary["prefill_flops_ratio"] < 1
    assert summary["decode_steps"] == 5
    assert summary["visual_tokens"] == [36, 36, 36]
