"""LLaVA (1.5 architecture): a CLIP vision tower and projector in front of a Llama-style decoder."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid, MaskRule, loaded, tower_square

if TYPE_CHECKING:
    from st3.models import ModelSpec

LLAVA_IMAGE_TOKEN = 32000
"""LLaVA-1.5's `<image>` id; used when the vocabulary is larger (else the tiny models' 3)."""


def cls_saliency(rows: list[torch.Tensor]) -> torch.Tensor:
    """[N, P]: per-layer [CLS] attention rows (heads averaged, shallow to deep) summed, as VTC-CLS ensembles them."""
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return total


class LlavaAdapter(Adapter):
    """`LlavaForConditionalGeneration` with a Llama-style text model (Llama, Mistral, Qwen2, Qwen3, Vicuna)."""

    model_classes = ("LlavaForConditionalGeneration",)
    decoder_layers = {
        "LlamaDecoderLayer": "LlamaAttention",
        "MistralDecoderLayer": "MistralAttention",
        "Qwen2DecoderLayer": "Qwen2Attention",
        "Qwen3DecoderLayer": "Qwen3Attention",  # q_norm / k_norm, applied by the re-projection
    }
    compresses_vision = True
    layer_kinds = ("full_attention", "sliding_attention")  # Mistral's and Qwen2's windows, counted in columns
    summary = (
        "LLaVA-1.5 and friends",
        "`LlavaForConditionalGeneration` with a Llama, Mistral, Qwen2 (sliding windows included) or Qwen3 decoder",
        "supported, proven by the test matrix (sliding windows: `tests/proofs/test_windows.py`)",
    )
    #: (text before, text after) the image, per sample: every image is 36 tokens (48 px, patch 8).
    example_samples = ((4, 6), (2, 9), (5, 3))

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Mistral has no `layer_types`: with `sliding_window` set, every layer slides (its model's convention)."""
        config = self.text_config
        if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is not None:
            return ("sliding_attention",) * len(self.layers)
        return Adapter.layer_types.fget(self)  # explicit: Mistral3's adapter borrows this property

    def mask_rule(self, index: int) -> MaskRule:
        sliding = self.layer_types[index] == "sliding_attention"
        return MaskRule(window=self.text_config.sliding_window if sliding else None)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self) -> int:
        return self.model.config.image_seq_length

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """One square grid per image (CLIP patches in raster order)."""
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        if side * side != per_image:
            raise ValueError(f"{per_image} image tokens do not form a square grid of patches")
        return [[Grid(1, side, side)] * (int(n) // per_image) for n in visual.sum(-1).tolist()]

    # ------------------------------------------------------------------------------------ vision side
    def _feature_layer(self) -> int:
        """Index of the vision encoder layer whose output LLaVA feeds the projector."""
        config = self.model.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or config.vision_feature_select_strategy != "default":
            raise ValueError(
                "compressing before the decoder needs a single vision_feature_layer and the 'default' feature "
                f"strategy (CLS dropped); this model has {layer!r} / {config.vision_feature_select_strategy!r}"
            )
        return (layer % (len(self._vision_layers) + 1)) - 1  # hidden_states[i] is the output of encoder layer i - 1

    @property
    def _vision_layers(self) -> nn.ModuleList:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def saliency_layers(self, start: int | None = None) -> range:
        """Encoder layers whose [CLS] attention is summed into the saliency: `start` (a slice start over the
        tower's layers, negative from the end, as `attentions[start:]`) through the feature layer; None: the
        feature layer alone."""
        feature = self._feature_layer()
        if start is None:
            return range(feature, feature + 1)
        return range(len(self._vision_layers))[start : feature + 1]

    def check_method(self, method) -> None:
        super().check_method(method)
        start = getattr(method, "saliency_start", None)
        if method.compresses_vision and start is not None and not self.saliency_layers(start):
            raise ValueError(
                f"start: {start} is beyond the vision tower's feature layer ({self._feature_layer()} of "
                f"{len(self._vision_layers)} layers): {type(method).__name__} sums the [CLS] attention from `start` "
                "through the feature layer"
            )

    def capture_vision(self, store: dict, start: int | None = None) -> list:
        """Pre-hooks on the feature layer (its input), the projector (its input) and, for a saliency summed over
        several layers (`start`), the inputs of the other layers summed."""
        encoder_layer = self._vision_layers[self._feature_layer()]

        def layer_input(module, args, kwargs):
            store["layer_input"] = kwargs.get("hidden_states", args[0] if args else None)

        def projector_input(module, args):
            store["features"] = args[0]

        def other_input(index):
            def hook(module, args, kwargs):
                store.setdefault("other_inputs", {})[index] = kwargs.get("hidden_states", args[0] if args else None)

            return hook

        others = [i for i in self.saliency_layers(start) if i != self._feature_layer()]
        return [
            encoder_layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            self.model.model.multi_modal_projector.register_forward_pre_hook(projector_input),
            *(self._vision_layers[i].register_forward_pre_hook(other_input(i), with_kwargs=True) for i in others),
        ]

    def _cls_attention(self, layer: nn.Module, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the [CLS] query's attention to each patch [N, P], heads averaged; the patches' keys [N, heads, P, D])."""
        attn = layer.self_attn
        with loaded(layer, attn):
            normed = layer.layer_norm1(layer_input)
            images, tokens, _ = normed.shape
            query = attn.q_proj(normed[:, :1]).view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            keys = attn.k_proj(normed).view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((query @ keys.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [N, heads, 1, 1+P]
        return probs.mean(1)[:, 0, 1:], keys[:, :, 1:]

    def vision_saliency(self, store: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The feature layer's [CLS] attention (plus, where captured, the other layers' summed: VTC-CLS), the
        feature layer's keys (heads averaged) and the projector's inputs."""
        feature = self._feature_layer()
        cls_attention, keys = self._cls_attention(self._vision_layers[feature], store["layer_input"])
        others = store.pop("other_inputs", {})
        if others:  # summed shallow to deep, as VTC-CLS adds them
            summed = [self._cls_attention(self._vision_layers[i], x)[0] for i, x in sorted(others.items())]
            cls_attention = cls_saliency(summed + [cls_attention])
        return cls_attention, keys.mean(1), store["features"]

    def place_compressed(
        self, hidden: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor, replaced: torch.Tensor,
        merged: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """LLaVA scatters each image's patches, in raster order, into its image-token slots (row-major)."""
        positions = visual.nonzero(as_tuple=True)
        repeats, rest = divmod(len(positions[0]), keep.numel())
        if rest or (repeats > 1 and keep.shape[0] * repeats != visual.shape[0]):
            raise ValueError(f"{len(positions[0])} visual tokens in the prompt but {keep.numel()} image patches")
        if repeats > 1:  # generate() expanded one image per sample for beams / num_return_sequences
            keep, replaced, merged = (t.repeat_interleave(repeats, dim=0) for t in (keep, replaced, merged))
        hidden = hidden.clone()
        flat = replaced.reshape(-1)
        if bool(flat.any()):
            projected = self.model.model.multi_modal_projector(merged[replaced].unsqueeze(0))[0]
            hidden[positions[0][flat], positions[1][flat]] = projected.to(hidden.device, hidden.dtype)
        kept = torch.zeros_like(visual)
        kept[positions] = keep.reshape(-1)
        return hidden, kept

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, heads: int = 4,
             kv_heads: int = 2, vocab: int = 128, image_size: int = 48, patch_size: int = 8, text_model: str = "llama",
             **text_overrides) -> nn.Module:  # fmt: skip
        """A LLaVA-1.5-shaped model (CLIP tower, MLP projector, Llama decoder with GQA), fp32, eval mode.

        text_model picks another decoder ("qwen2", "qwen3", "mistral"); text_overrides go to its config.
        """
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(seed)
        text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                    tie_word_embeddings=False, max_position_embeddings=1024, pad_token_id=build.PAD_TOKEN)  # fmt: skip
        vision = build.tiny_vision(image_size, patch_size)
        config = make_llava_config(text | text_overrides, vision, text_model, build.IMAGE_TOKEN, feature_layer=-2)
        return build.finish(LlavaForConditionalGeneration(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch: per sample, (text before, text after) the image tokens, plus pixel values."""
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.text_config.vocab_size
        image_tokens = model.config.image_seq_length  # builds inputs for any LLaVA, also ones the adapters refuse
        rows = []
        for before, after in samples or cls.example_samples:
            text = torch.randint(build.IMAGE_TOKEN + 1, vocab, (before + after,), generator=generator)
            rows.append(torch.cat([text[:before], torch.full((image_tokens,), build.IMAGE_TOKEN), text[before:]]))
        input_ids, attention_mask = build.left_padded(rows)
        size = model.config.vision_config.image_size
        pixel_values = torch.randn(len(rows), 3, size, size, generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        """`LlavaProcessor` with CLIP's PIL image processor at the tiny tower's size."""
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        config = model.config
        side, patch = config.vision_config.image_size, config.vision_config.patch_size
        images = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        tokenizer = build.word_tokenizer(["<pad>", "<unk>", "<s>", "<image>"], config.text_config.vocab_size)
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>", chat_template=build.chat_template("<image>"))  # fmt: skip

    @classmethod
    def real_config(cls, spec: ModelSpec):
        return llava_config(spec)

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        return config.image_seq_length  # the processor resizes every image to the tower's input

    @classmethod
    def typical_image(cls, config) -> tuple[int, int]:
        return tower_square(config)

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, the image tokens, text (LLaVA-1.5's chat template puts about 35 tokens before the image)."""
        config = self.model.config
        [image_token] = self.visual_token_ids()
        image = torch.full((self.image_tokens(config, size),), image_token)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       (image_token,), generator)  # fmt: skip
        side = config.vision_config.image_size
        pixel_values = torch.randn(batch_size, 3, side, side, generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def llava_config(
    spec: ModelSpec,
    *,
    image_token: int | None = None,
    pad_token: int = build.PAD_TOKEN,
    bos_token: int | None = None,
    eos_token: int | None = None,
    **text_overrides,
):
    """A LlavaConfig with the spec's decoder, projector width and vision tower (CLIP), from stock classes.

    `image_token` defaults to LLaVA-1.5's id when the vocabulary holds it, else 3; `text_overrides` go to
    the decoder's config. Every LLaVA st3 builds (bench shapes, tiny test models, the scenes LLaVA) comes from here.
    """
    if image_token is None:
        image_token = LLAVA_IMAGE_TOKEN if spec.vocab > LLAVA_IMAGE_TOKEN else build.IMAGE_TOKEN
    text = build.text_dims(spec, pad_token)
    # Left out when unset, so each decoder config keeps its own default.
    text |= {key: value for key, value in dict(bos_token_id=bos_token, eos_token_id=eos_token).items()
             if value is not None}  # fmt: skip
    return make_llava_config(text | text_overrides, build.vision_dims(spec), spec.text_model, image_token,
                             spec.feature_layer, pad_token)  # fmt: skip


def make_llava_config(text: dict, vision: dict, text_model: str, image_token: int, feature_layer: int = -1,
                      pad_token: int = build.PAD_TOKEN):  # fmt: skip
    """A LlavaConfig from a decoder's and a CLIP tower's keywords; one image is the tower's patch grid."""
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=build.text_config_class(text_model)(**text),
        image_token_index=image_token,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token,
    )
