"""The one table of model shapes st3 knows, and the transformers configs they give.

A `ModelSpec` holds the dimensions that decide a model's inference cost (its decoder, its projector's
width, its visual tokens) plus the few numbers a small random test model needs. `SPECS` are real models'
shapes: `st3 plan` prices methods at them (`ModelSpec.shape`), `st3 bench` builds random-weight models at
them (`st3.bench.shapes`). Each family's config builder, visual-token count and bench inputs are its adapter's
(`Adapter.real_config`, `Adapter.image_tokens`, `Adapter.bench_inputs`), found by `ModelSpec.architecture`: a
new family's shape is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from st3.accounting import Shape
from st3.adapters import adapter_class
from st3.adapters.build import PAD_TOKEN, decoder_dims
from st3.adapters.gemma3 import GEMMA3_TOKENS_PER_IMAGE
from st3.adapters.llava import LLAVA_IMAGE_TOKEN as IMAGE_TOKEN
from st3.adapters.llava import llava_config
from st3.adapters.qwen_vl import QWEN_IDS, mrope_sections


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
    """The vision tower's input size (a tile or crop where the family tiles images)."""
    patch_size: int = 14
    vision_hidden: int = 1024
    """CLIP-L's width: the projector's input dimension."""
    vision_layers: int = 1
    tower_layers: int | None = None
    """The real vision tower's depth (for the bench's note: it builds `vision_layers` of them)."""
    note: str = ""
    architecture: str = "LlavaForConditionalGeneration"
    """The transformers class the shape is built with; its adapter holds the family's builders."""
    image: tuple[int, int] | None = None
    """The bench image's (height, width) in pixels; None: the family's typical image (`Adapter.typical_image`)."""
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
    """The decoder where the family takes several: "llama", "qwen2", "qwen3" or "mistral"."""

    @property
    def bench_image(self) -> tuple[int, int]:
        """The (height, width) of the image the bench and the plan price."""
        return self.image or adapter_class(self.architecture).typical_image(config_for(self))

    @property
    def visual_tokens(self) -> int:
        """The bench image's visual tokens, counted by the family's adapter."""
        return adapter_class(self.architecture).image_tokens(config_for(self), self.bench_image)

    @property
    def shape(self) -> Shape:
        """The decoder dimensions that FLOPs and KV bytes are priced with (`st3.accounting`)."""
        head_dim = self.head_dim or self.hidden // self.heads
        return Shape(self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, head_dim)


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llava-1.5-7b", 4096, 32, 32, 32, 11008, 32064, image_size=336, tower_layers=24),
        ModelSpec("llava-1.5-13b", 5120, 40, 40, 40, 13824, 32064, image_size=336, tower_layers=24),
        ModelSpec(
            "llava-next-7b", 4096, 32, 32, 32, 11008, 32064, image_size=336, feature_layer=-2,
            architecture="LlavaNextForConditionalGeneration", image=(672, 672), tower_layers=24,
            note="LLaVA-1.6-Vicuna-7B's decoder; a 672x672 image: base 24x24 + 2x2 anyres tiles (48x48) + 48 newline "
                 "tokens = 2928; one CLIP layer",
        ),
        ModelSpec(
            "llava-onevision-7b", 3584, 28, 28, 4, 18944, 152128, image_size=384, vision_hidden=1152, vision_heads=16,
            vision_intermediate=4304, rope_theta=1e6, max_positions=32768, text_model="qwen2",
            architecture="LlavaOnevisionForConditionalGeneration", image=(768, 768), tower_layers=26,
            note="LLaVA-OneVision-Qwen2-7B's decoder; a 768x768 image: base 27x27 + 2x2 anyres tiles (54x54) + 54 "
                 "newline tokens = 3699; one SigLIP layer",
        ),
        ModelSpec(
            "internvl3-8b", 3584, 28, 28, 4, 18944, 151674, image_size=448, vision_heads=16, rope_theta=1e6,
            max_positions=32768, text_model="qwen2", architecture="InternVLForConditionalGeneration", image=(896, 896),
            tower_layers=24,
            note="InternVL3-8B's decoder (Qwen2.5-7B); an 896x896 image: 2x2 tiles + a thumbnail of 256 tokens each "
                 "= 1280; one InternViT layer",
        ),
        ModelSpec(
            "smolvlm-2b", 2048, 24, 32, 32, 8192, 49155, image_size=384, vision_hidden=1152, vision_heads=16,
            vision_intermediate=4304, rope_theta=273768.0, max_positions=16384,
            architecture="Idefics3ForConditionalGeneration", image=(1536, 1536), tower_layers=27,
            note="SmolVLM-Instruct's decoder (SmolLM2-1.7B); a square image resized to 1536 px: 4x4 crops + the "
                 "global image of 81 tokens each = 1377; one SigLIP layer",
        ),
        ModelSpec(
            "qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, image_size=0, vision_hidden=1280,
            architecture="Qwen2_5_VLForConditionalGeneration", image=(784, 1064), rope_theta=1e6, tower_layers=32,
            note="Qwen2.5-VL-7B-Instruct's decoder; a 784x1064 image: 56x76 patches of 14, merged 2x2 to 1064 tokens",
        ),
        ModelSpec(
            "qwen3-vl-8b", 4096, 36, 32, 8, 12288, 151936, image_size=0, patch_size=16, vision_hidden=1152,
            architecture="Qwen3VLForConditionalGeneration", image=(768, 1408), head_dim=128, rope_theta=5e6,
            tower_layers=27,
            note="Qwen3-VL-8B-Instruct's decoder; a 768x1408 image: 48x88 patches of 16, merged 2x2 to 1056 tokens",
        ),
        ModelSpec(
            "gemma3-4b", 2560, 34, 8, 4, 10240, 262208, image_size=896, vision_hidden=1152,
            architecture="Gemma3ForConditionalGeneration", tower_layers=27,
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


def model_class(spec: ModelSpec):
    """The transformers class a spec's model is built with."""
    import transformers

    return getattr(transformers, spec.architecture)


def config_for(spec: ModelSpec):
    """The spec's config, from its family's adapter."""
    return adapter_class(spec.architecture).real_config(spec)


def qwen_config(spec: ModelSpec):
    """A Qwen2.5-VL / Qwen3-VL config with the spec's decoder and a vision tower of the spec's width."""
    return config_for(spec)


def gemma3_config(spec: ModelSpec):
    """A Gemma 3 config with the spec's decoder (Gemma 3's layer pattern, window and rotary) and a SigLIP tower."""
    return config_for(spec)


__all__ = [
    "GEMMA3_TOKENS_PER_IMAGE", "IMAGE_TOKEN", "PAD_TOKEN", "QWEN_IDS", "SPECS", "ModelSpec", "config_for",
    "decoder_dims", "gemma3_config", "llava_config", "model_class", "mrope_sections", "qwen_config", "spec_for",
]  # fmt: skip
