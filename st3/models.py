"""The one table of model shapes st3 knows, and the transformers configs they give.

A `ModelSpec` holds the dimensions that decide a model's inference cost (its decoder, its projector's
width, its visual tokens) plus the few numbers a small random test model needs. `SPECS` are real models'
shapes: `st3 plan` prices methods at them (`ModelSpec.shape`), `st3 bench` builds random-weight models at
them (`st3.bench.shapes`). `llava_config` / `qwen_config` turn a spec into a stock config, so every model
st3 builds from scratch (bench shapes, the tests' tiny models in `st3.testing`, the scenes LLaVA) comes from
here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from st3.accounting import Shape

IMAGE_TOKEN = 32000
"""LLaVA-1.5's `<image>` id; used when the vocabulary is larger (else 3)."""
PAD_TOKEN = 0
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions that decide a vision-language model's inference cost."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    image_size: int
    """Tower input size; (image_size / patch_size)^2 visual tokens enter the language model (LLaVA)."""
    patch_size: int = 14
    vision_hidden: int = 1024
    """CLIP-L's width: the projector's input dimension."""
    vision_layers: int = 1
    note: str = ""
    family: str = "llava"
    """"llava", or a Qwen-VL family ("qwen2.5-vl", "qwen3-vl") or "gemma3", built with its own classes."""
    grid: tuple[int, int] = (0, 0)
    """Qwen-VL: the image's patch grid (rows, cols) before the 2 x 2 merge."""
    head_dim: int | None = None
    rope_theta: float = 10000.0
    vision_heads: int | None = None
    """None: one head per 64 channels."""
    vision_intermediate: int | None = None
    """None: 4 x vision_hidden."""
    feature_layer: int = -1
    """The vision tower's layer whose output the projector reads."""
    max_positions: int = 4096
    text_model: str = "llama"
    """LLaVA's decoder: "llama", "qwen2", "qwen3" or "mistral"."""

    @property
    def visual_tokens(self) -> int:
        if self.family == "gemma3":
            return GEMMA3_TOKENS_PER_IMAGE
        if self.family != "llava":
            return self.grid[0] * self.grid[1] // 4
        return (self.image_size // self.patch_size) ** 2

    @property
    def shape(self) -> Shape:
        """The decoder dimensions that FLOPs and KV bytes are priced with (`st3.accounting`)."""
        head_dim = self.head_dim or self.hidden // self.heads
        return Shape(self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, head_dim)


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llava-1.5-7b", 4096, 32, 32, 32, 11008, 32064, image_size=336),
        ModelSpec("llava-1.5-13b", 5120, 40, 40, 40, 13824, 32064, image_size=336),
        ModelSpec(
            "llava-next-7b", 4096, 32, 32, 32, 11008, 32064, image_size=756,
            note=(
                "LLaVA-NeXT-7B's language model with 2916 (54x54) visual tokens through the LLaVA-1.5 class: "
                "NeXT's 672x672 anyres image gives 2880 features (+48 newline tokens = 2928); a square grid "
                "cannot give 2880, and 2916 lies between the two"
            ),
        ),
        ModelSpec(
            "qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, image_size=0, vision_hidden=1280,
            family="qwen2.5-vl", grid=(56, 76), rope_theta=1e6,
            note="Qwen2.5-VL-7B-Instruct's decoder; a 784x1064 image: 56x76 patches of 14, merged 2x2 to 1064 tokens",
        ),
        ModelSpec(
            "qwen3-vl-8b", 4096, 36, 32, 8, 12288, 151936, image_size=0, patch_size=16, vision_hidden=1152,
            family="qwen3-vl", grid=(48, 88), head_dim=128, rope_theta=5e6,
            note="Qwen3-VL-8B-Instruct's decoder; a 768x1408 image: 48x88 patches of 16, merged 2x2 to 1056 tokens",
        ),
        ModelSpec(
            "gemma3-4b", 2560, 34, 8, 4, 10240, 262208, image_size=896, vision_hidden=1152, family="gemma3",
            head_dim=256, rope_theta=1e6, vision_heads=16, vision_intermediate=4304,
            note="Gemma 3 4B's decoder (5 sliding-window layers of 1024 columns per full one); an 896x896 image "
                 "pooled to 256 tokens; one SigLIP layer",
        ),
        ModelSpec("tiny", 64, 4, 4, 2, 128, 128, image_size=48, patch_size=8, vision_hidden=32,
                  note="for tests and smoke runs"),
    )
}  # fmt: skip


def spec_for(name: str, layers: int | None = None) -> ModelSpec:
    """The named shape, optionally truncated to its first `layers` decoder layers."""
    try:
        spec = SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; available: {', '.join(SPECS)}") from None
    if layers is not None:
        if not 1 <= layers <= spec.layers:
            raise ValueError(f"--layers must be in [1, {spec.layers}] for {spec.name}, got {layers}")
        spec = replace(spec, layers=layers)
    return spec


def decoder_dims(spec: ModelSpec) -> dict:
    """The spec's decoder dimensions as transformers config keywords (the same for every family)."""
    return dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                tie_word_embeddings=False)  # fmt: skip


def llava_config(
    spec: ModelSpec,
    *,
    image_token: int | None = None,
    pad_token: int = PAD_TOKEN,
    bos_token: int | None = None,
    eos_token: int | None = None,
    **text_overrides,
) -> LlavaConfig:
    """A LlavaConfig with the spec's decoder, projector width and vision tower (CLIP), from stock classes.

    `image_token` defaults to LLaVA-1.5's id when the vocabulary holds it, else 3; `text_overrides` go to
    the decoder's config.
    """
    import transformers as tf

    text_config = {"llama": LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
                   "mistral": tf.MistralConfig}[spec.text_model]  # fmt: skip
    if image_token is None:
        image_token = IMAGE_TOKEN if spec.vocab > IMAGE_TOKEN else 3
    text = decoder_dims(spec) | dict(max_position_embeddings=spec.max_positions, pad_token_id=pad_token)
    # Left out when unset, so each decoder config keeps its own default.
    optional = dict(head_dim=spec.head_dim, bos_token_id=bos_token, eos_token_id=eos_token)
    text |= {key: value for key, value in optional.items() if value is not None}
    if spec.rope_theta != ModelSpec.rope_theta:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads or max(1, spec.vision_hidden // 64),
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        text_config=text_config(**(text | text_overrides)),
        image_token_index=image_token,
        image_seq_length=spec.visual_tokens,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token,
    )


def mrope_sections(real: list[int], head_dim: int) -> list[int]:
    """The real (t, h, w) rotary sections (for head_dim 128) scaled to `head_dim` (smaller test shapes)."""
    half = head_dim // 2
    scaled = [x * half // sum(real) for x in real]
    scaled[-1] += half - sum(scaled)
    return scaled


def qwen_config(spec: ModelSpec):
    """A Qwen2.5-VL / Qwen3-VL config with the spec's decoder and a vision tower of the spec's width."""
    import transformers as tf

    text = decoder_dims(spec) | dict(max_position_embeddings=32768, pad_token_id=PAD_TOKEN)
    vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.hidden,
                  num_heads=16 if spec.vision_hidden >= 1024 else 2, patch_size=spec.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    if spec.family == "qwen2.5-vl":
        sections = mrope_sections([16, 24, 24], spec.hidden // spec.heads)
        rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": sections}
        return tf.Qwen2_5_VLConfig(text_config=dict(**text, rope_parameters=rope),
                                   vision_config=dict(**vision, intermediate_size=3420, fullatt_block_indexes=[0]),
                                   **QWEN_IDS)  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": mrope_sections([24, 20, 20],
            spec.head_dim or spec.hidden // spec.heads),
            "mrope_interleaved": True}  # fmt: skip
    return tf.Qwen3VLConfig(text_config=dict(**text, head_dim=spec.head_dim, rope_parameters=rope),
                            vision_config=dict(**vision, intermediate_size=4304, deepstack_visual_indexes=[0]),
                            **QWEN_IDS)  # fmt: skip


#: Gemma 3's `mm_tokens_per_image`: every image is pooled to 16 x 16 tokens.
GEMMA3_TOKENS_PER_IMAGE = 256


def gemma3_config(spec: ModelSpec):
    """A Gemma 3 config with the spec's decoder (Gemma 3's layer pattern, window and rotary) and a SigLIP tower."""
    import transformers as tf

    head_dim = spec.head_dim or spec.hidden // spec.heads
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": spec.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
    text = decoder_dims(spec) | dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=1024,
                                     max_position_embeddings=131072, pad_token_id=PAD_TOKEN)  # fmt: skip
    text["rope_parameters"] = rope
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads or 1,
                  image_size=spec.image_size, patch_size=spec.patch_size)  # fmt: skip
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE)


def model_class(spec: ModelSpec):
    """The transformers class a spec's model is built with."""
    import transformers as tf

    return {"llava": tf.LlavaForConditionalGeneration, "qwen2.5-vl": tf.Qwen2_5_VLForConditionalGeneration,
            "qwen3-vl": tf.Qwen3VLForConditionalGeneration,
            "gemma3": tf.Gemma3ForConditionalGeneration}[spec.family]  # fmt: skip


def config_for(spec: ModelSpec):
    """The spec's config, by family."""
    if spec.family == "gemma3":
        return gemma3_config(spec)
    return llava_config(spec) if spec.family == "llava" else qwen_config(spec)
