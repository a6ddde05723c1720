"""The vLLM plugin on Qwen2.5-VL (a tiny random checkpoint saved here), against transformers (vLLM stage).

For each rule Qwen2.5-VL serves (those whose choice the image's grid decides), on images of three sizes: vLLM's
greedy tokens equal transformers' on the same pruned prompt with the kept tokens and the text at the positions
`get_rope_index` gives the unpruned prompt (st3's semantics), and vLLM schedules the text plus K tokens.
Rules it cannot serve exactly are refused at engine start, naming the setting.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vLLM plugin's tests run in .ci/run's vLLM stage (docs/vllm.md)")

from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from st3.plugins.vllm.config import Pruning  # noqa: E402
from st3.plugins.vllm.qwen_vl import kept_patches  # noqa: E402
from st3.testing import QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ARCH = "St3Qwen2_5_VLForConditionalGeneration"
SPECIALS = ["<pad>", "<unk>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
WORDS = ["<|im_start|>", "user", "assistant", "what", "is", "shown", "?", "\n"]
PROMPT = "<|im_start|> user \n <|vision_start|><|image_pad|><|vision_end|> what is shown ? <|im_end|> \n <|im_start|> assistant \n"  # noqa: E501
SIZES = ((32, 32), (48, 32), (40, 64))  # (width, height): merged grids 4x4, 4x6 and 8x5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL with a word-level tokenizer (ids as st3.testing's) and Qwen's own processors."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(128 - 15)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )  # fmt: skip
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, min_pixels=16 * 16, max_pixels=64 * 64),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
    )
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(  # head_dim 64: vLLM's CPU attention has kernels for 32, 64, 80, ... (not 16)
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           hidden_size=32, intermediate_size=64, out_hidden_size=128, window_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def engine(path: str, setting):
    from vllm import LLM

    return LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, limit_mm_per_prompt={"image": 1},
               kv_cache_memory_bytes=2**26, seed=0, hf_overrides={"architectures": [ARCH], "st3": setting})  # fmt: skip


@torch.no_grad()
def reference(path: str, pruning: Pruning, picture, steps: int) -> tuple[list[int], int]:
    """Greedy tokens of transformers on the pruned prompt at the unpruned prompt's positions, and its length."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(path)(images=[picture], text=[PROMPT], return_tensors="pt")
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=grid)
    features = model.model.get_image_features(inputs["pixel_values"], grid).pooler_output[0]
    embeds = model.get_input_embeddings()(ids)
    visual = (ids[0] == model.config.image_token_id).nonzero().squeeze(-1)
    embeds[0, visual] = features
    t, h, w = (grid[0] // torch.tensor([1, 2, 2])).tolist()
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept_patches(pruning, t, h, w)]] = True
    embeds, positions = embeds[:, keep], positions[..., keep]
    out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    tokens, following = [], int(positions.max()) + 1
    for step in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        position = torch.full((3, 1, 1), following + step)
        out = model(input_ids=torch.tensor([[token]]), position_ids=position, past_key_values=out.past_key_values,
                    use_cache=True)  # fmt: skip
    return tokens, int(keep.sum())


@pytest.mark.parametrize("method", ["stratified", "random", "raster", "lattice"])
def test_qwen_vllm_equals_transformers_at_the_original_positions(method, checkpoint):
    from vllm import SamplingParams

    setting = {"method": method, "keep": 0.5}
    pruning = Pruning.parse(setting)
    llm = engine(checkpoint, setting)
    try:
        for seed, size in enumerate(SIZES):
            picture = image(size, seed)
            request = {"prompt": PROMPT, "multi_modal_data": {"image": picture}}
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            out = llm.generate([request], params, use_tqdm=False)[0]
            expected, length = reference(checkpoint, pruning, picture, steps=6)
            assert len(out.prompt_token_ids) == length  # the text and K tokens
            assert list(out.outputs[0].token_ids) == expected, (method, size)
    finally:
        del llm
        gc.collect()


def test_the_positions_matter(checkpoint, monkeypatch):
    """Negative control: the same kept tokens at consecutive positions (vLLM's plain layout) answer otherwise."""
    from vllm import SamplingParams

    from st3.plugins.vllm import qwen_vl

    def consecutive(self, input_tokens, mm_features):
        return torch.arange(len(input_tokens)).expand(3, -1), 0

    monkeypatch.setattr(qwen_vl.St3Qwen2_5_VLForConditionalGeneration, "get_mrope_input_positions", consecutive)
    setting = {"method": "lattice", "keep": 0.5}
    llm = engine(checkpoint, setting)
    try:
        differ = []
        for seed, size in enumerate(SIZES):
            picture = image(size, seed)
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": picture}}], params, use_tqdm=False)
            expected, _ = reference(checkpoint, Pruning.parse(setting), picture, steps=6)
            differ.append(list(out[0].outputs[0].token_ids) != expected)
    finally:
        del llm
        gc.collect()
    assert any(differ)


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ({"method": "spread", "keep": 0.5}, "st3.method: 'spread' chooses by the image's features"),
        ({"method": "stratified", "keep": 0.5, "within": "salient"}, "st3.method: 'stratified' chooses by"),
        ({"method": "visionzip", "keep": 16}, "st3.method: visionzip ranks patches by the tower's [CLS] attention"),
        ({"method": "st3", "keep": 0.5}, "st3.method: 'st3' chooses tokens inside the language model"),
    ],
)
def test_qwen_refuses_what_it_cannot_run_exactly(setting, names, checkpoint):
    with pytest.raises(Exception) as error:  # noqa: PT011 - vLLM may wrap it: the message is what counts
        engine(checkpoint, setting)
    assert names in str(error.value) or names in repr(error.value.__cause__), str(error.value)
