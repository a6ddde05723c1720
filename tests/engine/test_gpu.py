"""On a GPU: FlashAttention-2 / sdpa runs agree with eager under every registered method. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from cases import REGISTERED

from st3.testing import tiny_inputs, tiny_llava

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
BACKENDS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("name", sorted(REGISTERED))
@pytest.mark.parametrize("attn", BACKENDS)
def test_gpu_backends_agree_with_eager(attn, name):
    runs = {}
    for backend in ("eager", attn):
        dtype = torch.bfloat16 if backend == "flash_attention_2" else torch.float32
        model = tiny_llava(attn=backend).to(DEVICE, dtype)
        inputs = {k: v.to(DEVICE) for k, v in tiny_inputs(model, ((4, 6), (2, 9))).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        method = REGISTERED[name]()
        with torch.no_grad(), method(model):
            out = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        runs[backend] = (out, method.trace)
    (eager, eager_trace), (other, other_trace) = runs["eager"], runs[attn]
    tolerance = 5e-2 if attn == "flash_attention_2" else 1e-4
    torch.testing.assert_close(other.logits[0].float(), eager.logits[0].float(), atol=tolerance, rtol=0)
    assert other_trace.visual_per_layer == eager_trace.visual_per_layer
