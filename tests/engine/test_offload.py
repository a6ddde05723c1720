"""Models bigger than one device: st3 under accelerate's big-model hooks (`device_map`, offload to the CPU or disk).

On the CPU, part of the decoder layers' weights live on disk (or in CPU memory, `cpu_offload`) and are loaded by
accelerate's hooks for each call: st3's own loop (which re-projects queries and keys through a layer's modules
without running the layer) and the stock decoder equal the masked reference of the same offloaded model, and
leaving the `with` block leaves every forward and hook as it was. With CUDA, a model split between the GPU and the
CPU (two devices) runs as the same model on one device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from cases import CASES, NEW_TOKENS, new_tokens
from reference import decoder, reference_logits

from st3.adapters import adapter_class
from st3.testing import tiny_llava, tiny_qwen_vl

accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")

#: Decoder layers whose weights live on disk; the others stay on the CPU.
DISK = (1, 2, 4)
#: Methods of st3's loop that re-project queries and keys at several layers, and the stock decoder's.
ENGINE = ("fastv", "st3", "pyramiddrop")
STOCK = "spread"


def layer_map(model, place: Callable[[int], str | int]) -> dict[str, str | int]:
    """A device map: decoder layer i on `place(i)`, every other module on the CPU."""
    layers = decoder(model).layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    mapping: dict[str, str | int] = {}

    def visit(module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in index:
                mapping[prefix + name] = place(index[id(child)])
            elif any(sub is layers for sub in child.modules()):
                visit(child, f"{prefix}{name}.")
            else:
                mapping[prefix + name] = "cpu"

    visit(model, "")
    return mapping


def on_disk(i: int) -> str:
    return "disk" if i in DISK else "cpu"


def state(model) -> list:
    """Every module's instance-level forward and accelerate hook, and the top-level forward hooks."""
    modules = [(m.__dict__.get("forward"), getattr(m, "_hf_hook", None)) for m in model.modules()]
    return [modules, list(model._forward_pre_hooks.values()), list(model._forward_hooks.values())]


def offloaded_weights(model) -> list[int]:
    """The decoder layers whose q_proj weight is not loaded (accelerate keeps it elsewhere)."""
    return [i for i, layer in enumerate(decoder(model).layers) if layer.self_attn.q_proj.weight.device.type == "meta"]


def run(model, inputs: dict, name: str, decoder_mode: str = "auto"):
    """(generate's output, the trace) of `name` on `model`; every forward, hook and offloaded weight is as it was
    after the `with` block."""
    before, offloaded = state(model), offloaded_weights(model)
    method = CASES[name]()
    method.record_positions = True
    with torch.no_grad(), method(model, decoder=decoder_mode):
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    assert state(model) == before and offloaded_weights(model) == offloaded
    assert method.trace.pruned
    return out, method.trace


def positions(trace) -> list:
    return [[p.tolist() for p in layer] for layer in trace.prefill_visual_positions]


def check_equals_reference(model, inputs: dict, name: str, decoder_mode: str = "auto") -> None:
    """`name` on `model` equals the masked reference of the same model."""
    out, trace = run(model, inputs, name, decoder_mode)
    if decoder_mode == "stock":  # the stock decoder evicts nothing: every decode step sees the prefill's survivors
        trace.decode_visual_positions = [trace.prefill_visual_positions] * (len(out.logits) - 1)
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        reference = reference_logits(model, inputs, trace, fed, CASES[name]())
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)


BUILDERS = {"llava": tiny_llava, "qwen2.5-vl": lambda: tiny_qwen_vl("qwen2.5-vl", layers=6)}
_LOADED: dict = {}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (the tiny model reloaded with DISK's layers on disk, its inputs), built once."""

    def load(family: str):
        if family not in _LOADED:
            model = BUILDERS[family]()
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            mapping = layer_map(model, on_disk)
            big = type(model).from_pretrained(folder, device_map=mapping, offload_folder=folder / "off").eval()
            assert offloaded_weights(big) == list(DISK)
            _LOADED[family] = big, adapter_class(type(big).__name__).tiny_inputs(big)
        return _LOADED[family]

    return load


def fast_first(cases: list[tuple]) -> list:
    """The first case in `make test` (a few seconds each on 2 cores), the others `slow`."""
    return [pytest.param(*case, marks=() if i == 0 else pytest.mark.slow) for i, case in enumerate(cases)]


@pytest.mark.parametrize("name,family", fast_first([(m, f) for m in (*ENGINE, STOCK) for f in sorted(BUILDERS)]))
def test_layers_offloaded_to_disk_equal_masked_reference(loaded, family, name):
    """`from_pretrained(device_map=..., offload_folder=...)`: each offloaded module has its own hook."""
    model, inputs = loaded(family)
    check_equals_reference(model, inputs, name, "stock" if name == STOCK else "auto")


@pytest.mark.parametrize("offload,name", fast_first([("cpu", "st3"), ("disk", "st3"), ("cpu", "visionzip")]))
def test_modules_offloaded_whole_are_loaded_for_reprojection(tmp_path, offload, name):
    """`preload_module_classes`: a decoder (or vision) layer loads its submodules' weights in its own forward, and
    they have no hook of their own; st3 loads them for its re-projection (`st3.adapters.base.loaded`). The run
    equals the same model's without offloading (proven equal to the masked reference in tests/proofs)."""
    model = tiny_llava()
    inputs = adapter_class(type(model).__name__).tiny_inputs(model)
    out, trace = run(model, inputs, name)
    whole = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    if offload == "disk":
        mapping = layer_map(model, on_disk)
        accelerate.dispatch_model(model, mapping, offload_dir=str(tmp_path), preload_module_classes=whole)
        assert offloaded_weights(model) == list(DISK)
    else:
        accelerate.cpu_offload(model, execution_device="cpu", preload_module_classes=whole)
        assert offloaded_weights(model) == list(range(len(decoder(model).layers)))
    assert not hasattr(decoder(model).layers[DISK[0]].self_attn.q_proj, "_hf_hook")
    offloaded_out, offloaded_trace = run(model, inputs, name)
    assert positions(offloaded_trace) == positions(trace)
    torch.testing.assert_close(offloaded_out.sequences, out.sequences)
    for logits, offloaded_logits in zip(out.logits, offloaded_out.logits):
        torch.testing.assert_close(offloaded_logits, logits, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a model split between the GPU and the CPU")
@pytest.mark.parametrize("name", [*ENGINE, "st3+dart-accumulated", STOCK])
def test_model_split_over_two_devices_runs_as_on_one(name):
    """Layers 0-2 on the CPU, 3-5 (and the final norm and head) on the GPU: the rows follow the hidden states across
    the boundary, decode scoring runs on each layer's cache device; the run equals the same model on the CPU."""
    model = tiny_llava()
    inputs = adapter_class(type(model).__name__).tiny_inputs(model)
    split = copy.deepcopy(model)
    mapping = layer_map(split, lambda i: 0 if i >= 3 else "cpu")
    mapping.update({key: 0 for key in mapping if key.endswith(("language_model.norm", "lm_head"))})
    accelerate.dispatch_model(split, mapping, main_device="cpu", skip_keys=split._skip_keys_device_placement)
    assert decoder(split).layers[3].self_attn.q_proj.weight.device.type == "cuda"
    decoder_mode = "stock" if name == STOCK else "auto"
    (out, trace), (split_out, split_trace) = (run(net, inputs, name, decoder_mode) for net in (model, split))
    assert positions(split_trace) == positions(trace)
    torch.testing.assert_close(split_out.sequences.cpu(), out.sequences)
    for logits, split_logits in zip(out.logits, split_out.logits):
        torch.testing.assert_close(split_logits.cpu(), logits, atol=1e-4, rtol=0)
