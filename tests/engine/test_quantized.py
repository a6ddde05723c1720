"""Quantized weights: st3 runs a model whose decoder projections are quantized, and the masked reference holds
for the same quantized model; a quantization that couples rows (one activation scale per call) is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import CASES, generate, new_tokens
from reference import reference_logits

from st3.adapters import UnsupportedModel
from st3.testing import tiny_inputs, tiny_llava

BATCH = ((4, 6), (2, 9), (5, 3))


def test_dynamic_quantization_with_one_activation_scale_is_refused():
    model = tiny_llava()
    lm = model.model.language_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        torch.ao.quantization.quantize_dynamic(lm, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        # Why it cannot be exact: a row's projection depends on the other rows of the call.
        proj = lm.layers[0].self_attn.q_proj
        rows = torch.randn(1, 6, proj.in_features)
        rows[0, 0] *= 50
        assert not torch.allclose(proj(rows)[:, 1:], proj(rows[:, 1:]), atol=1e-3)
        with pytest.raises(UnsupportedModel, match="one activation scale for all rows"):
            CASES["spread"]()(model)


@pytest.mark.parametrize("name", ["spread", "st3"])
def test_torchao_int8_weight_only_equals_masked_reference(name):
    """torchao int8 weight-only (CPU): the stock-decoder path (spread) and st3's loop (st3) on quantized linears."""
    quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed (docs/fast-paths.md)")
    model = tiny_llava()
    quantization.quantize_(model.model.language_model, quantization.Int8WeightOnlyConfig())
    assert type(model.model.language_model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    inputs = tiny_inputs(model, BATCH)
    method = CASES[name]()
    method.record_positions = True
    extra = {"cache_implementation": "static"} if name == "spread" else {}
    out = generate(model, inputs, method, **extra)
    assert method.trace.pruned
    if name == "spread":  # the stock decoder evicts nothing: every decode step sees the prefill's survivors
        method.trace.decode_visual_positions = [method.trace.prefill_visual_positions] * (len(out.logits) - 1)
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        reference = reference_logits(model, inputs, method.trace, fed, method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)
