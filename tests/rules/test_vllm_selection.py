"""The vLLM plugin's settings and its door into st3's selectors, without vLLM (the main stage runs these).

The plugin's choice for an image (`selection.select` on the image's embeddings, its grid and the instruction's
token embeddings) equals the choice of st3's transformers engine at layer 0 for the same prompt, rule by rule,
on the shipped scenes model. tests/apps/test_vllm.py then shows vLLM hands the plugin the same embeddings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import st3
from st3.plugins.vllm import selection
from st3.plugins.vllm.config import Pruning

KEEP = 71  # 22 % of the scenes model's 324 tokens

#: plugin method -> the same rule as an st3 method acting at layer 0 (before the decoder)
ENGINE = {
    "spread": lambda: st3.get("spread", keep=KEEP),
    "stratified": lambda: st3.get("stratified", keep=KEEP),
    "divprune": lambda: st3.get("divprune", keep=KEEP),
    "cdpruner": lambda: st3.get("cdpruner", keep=KEEP),
    "random": lambda: st3.get("random", keep=KEEP, layer=0),
    "raster": lambda: st3.Keep(keep=KEEP, layer=0, selector=st3.selectors.Raster()),
    "lattice": lambda: st3.get("lattice", keep=KEEP, layer=0),
}


@pytest.fixture(scope="module")
def scenes():
    st3_scenes = pytest.importorskip("st3_scenes", reason="needs the scenes package (make install installs it)")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3_scenes.processor import prompt
    from st3_scenes.tasks import example

    model = LlavaForConditionalGeneration.from_pretrained(st3_scenes.MODEL_DIR, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(st3_scenes.MODEL_DIR)
    qa = example("test", 3)
    return model, processor(images=qa.image, text=prompt(qa.question), return_tensors="pt")


def test_every_rule_the_plugin_ships_is_compared_with_the_engine():
    assert set(ENGINE) | {"visionzip"} == set(selection.RULES)  # visionzip: tests/apps/test_vllm.py, on the tower


@pytest.mark.parametrize("name", list(ENGINE))
@torch.no_grad()
def test_plugin_choice_equals_the_engine_choice_before_the_decoder(name, scenes):
    model, inputs = scenes
    method = ENGINE[name]()
    with method(model):
        model(**inputs)
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    engine_kept = method.trace.prefill_visual_positions[0][0] - visual[0]

    pixels, ids = inputs["pixel_values"], inputs["input_ids"][0]
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
        model.config.vision_feature_layer
    ]
    embeds = model.model.multi_modal_projector(hidden[:, 1:])[0]
    pruning = Pruning.parse({"method": name, "keep": KEEP})
    text = before = None
    if pruning.rule.reads_prompt:
        text, before = (model.get_input_embeddings()(part) for part in (ids[visual[-1] + 1 :], ids[: visual[0]]))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kept = selection.select(pruning.selector(KEEP), embeds, selection.Grid(1, side, side), KEEP, text, before)
    assert torch.equal(kept, engine_kept.to(kept.dtype))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"method": "bogus", "keep": 3}, "st3.method: unknown 'bogus'"),
        ({"method": "fastv", "keep": 3}, "st3.method: 'fastv' chooses tokens inside the language model"),
        ({"method": "dart", "keep": 3}, "st3.method: 'dart' chooses tokens inside the language model"),
        ({"keep": 3}, "st3.method: required"),
        ({"method": "spread"}, "st3.keep: required"),
        ({"method": "spread", "keep": 0}, "st3.keep: must be >= 1"),
        ({"method": "spread", "keep": 1.5}, "st3.keep: a share must lie in (0, 1]"),
        ({"method": "spread", "keep": "half"}, "st3.keep: must be an integer or a share"),
        ({"method": "spread", "keep": 3, "spatial": -1}, "st3.spatial: must be in [0, 1e6]"),
        ({"method": "divprune", "keep": 3, "features": "keys"}, "st3.features: not a knob of 'divprune'"),
        ({"method": "stratified", "keep": 3, "within": "centre"}, "st3.within: must be one of"),
        ({"method": "visionzip", "keep": 8, "contextual": 8}, "st3.contextual: must be an integer in [0, keep)"),
        (["spread"], "st3: must be a dict"),
    ],
)
def test_bad_settings_name_the_setting(setting, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Pruning.parse(setting)


def test_budgets():
    assert Pruning.parse({"method": "spread", "keep": 0.5}).tokens(576) == 288
    assert Pruning.parse({"method": "spread", "keep": 0.22}).tokens(324) == 71
    assert Pruning.parse({"method": "spread", "keep": 0.001}).tokens(324) == 1  # at least one token per image
    assert Pruning.parse({"method": "spread", "keep": 324}).tokens(324) == 324
    assert Pruning.parse({"method": "raster", "keep": 1.0}).tokens(576) == 576  # the unpruned baseline
    with pytest.raises(ValueError, match=r"^st3.keep: 325 is more than an image's 324 visual tokens"):
        Pruning.parse({"method": "spread", "keep": 325}).tokens(324)
    zipped = Pruning.parse({"method": "visionzip", "keep": 64}).selector(64)
    assert (zipped.dominant, zipped.patches()) == (55, 54)  # the paper's 54 patches + 10 ([CLS] counted, dropped)


def test_the_door_to_the_selectors_imports_neither_transformers_nor_vllm():
    code = "import sys, st3.plugins.vllm.config; print(sorted({'transformers', 'vllm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_engine_refuses_a_transformers_below_its_floor(monkeypatch, model, inputs):
    """pyproject's floor is lowered for st3[vllm]; applying a method on such a transformers is refused, saying why."""
    from st3 import compat

    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", "5.19.0")
    with pytest.raises(RuntimeError, match=r"st3's engine needs transformers >= 5\.23 .* 5\.19\.0 is installed"):
        st3.ST3()(model)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", compat.ENGINE_TRANSFORMERS + ".0.dev0")  # the floor's own
    with st3.ST3()(model):  # pre-releases are accepted
        pass
    monkeypatch.undo()
    with st3.ST3()(model):
        model(**inputs)
