"""Gemma 3: a SigLIP tower and an average-pooling projector in front of a hybrid sliding/full-attention decoder.

What differs from a Llama-style decoder, and where it is handled:
- `config.layer_types` mixes "sliding_attention" and "full_attention" layers. Each type's `MaskRule`: a sliding
  layer sees keys at columns k > q - sliding_window (transformers' `sliding_window_overlay`), counted in ORIGINAL
  columns, so a layer holding fewer slots than columns after pruning keeps the model's window exactly; the engine
  gives such a layer a prunable sliding cache layer (`PrunableLayer(window)`).
- With `token_type_ids` (as the processor returns them) the tokens of one image attend to each other both ways
  (`blockwise_overlay`; the model is silently causal without them, and so is st3). Blocks are read off
  `token_type_ids` with the model's own function and travel with the rows: a pruned visual token is gone for every
  row, the other tokens of its image included. At decode the new row is text, so blocks play no part.
- rotary frequencies differ per layer type (`rotary_emb(x, position_ids, layer_type)`): `rotary` returns every
  type's, stacked, and `layer_rotary` picks a layer's.
- four norms per layer, q_norm/k_norm and `scaling = query_pre_attn_scalar ** -0.5`: the shared re-projection
  (input_layernorm, q/k projection, q/k norm, rotation) and `self_attn.scaling` already describe them; the
  embedding's sqrt(hidden) scale is applied by the model before the decoder.
- flash attention is refused (Gemma 3 does not support it: it would drop the image blocks); st3 builds these
  masks for eager and sdpa.

Scoring (attention-ranked methods): the attention st3 recomputes for the query rows is the one the layer computed,
under that layer's own mask: image-token query rows see their whole image; a sliding layer's query rows see only
their window. A method that ranks by a sliding layer's attention while some visual token lies outside every query
row's window is refused (that attention was never computed). At decode, a sliding layer first drops the slots no
later token can see, then ranks the rest.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3 import compat
from st3.adapters.base import Adapter, Grid, MaskRule, UnsupportedModel, tower_square

if TYPE_CHECKING:
    from st3.models import ModelSpec

GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 3, 4, 5
"""The tiny Gemma 3's image, begin-of-image and end-of-image tokens."""
#: Gemma 3's `mm_tokens_per_image`: every image is pooled to 16 x 16 tokens.
GEMMA3_TOKENS_PER_IMAGE = 256


class Gemma3Adapter(Adapter):
    """`Gemma3ForConditionalGeneration` (Gemma 3 4B, 12B, 27B)."""

    model_classes = ("Gemma3ForConditionalGeneration",)
    decoder_layers = {"Gemma3DecoderLayer": "Gemma3Attention"}  # q_norm / k_norm, re-projected
    layer_kinds = ("full_attention", "sliding_attention")
    summary = (
        "Gemma 3",
        "`Gemma3ForConditionalGeneration` (sliding-window and full layers, bidirectional image blocks; eager or sdpa)",
        "supported, proven by the family matrix on a tiny model whose window is shorter than the prompt; VisionZip "
        "refused; ranking by a sliding layer's attention refused where its window never saw a visual token; no real "
        "checkpoint run here",
    )
    #: (text before, images, text after): 16, 32 and 48 visual tokens; 31, 43 and 61 tokens. With `tiny`'s window of
    #: 56 columns the last prompt's early text leaves the sliding layers' window at prefill, and its first image
    #: leaves it while decoding; every prompt's last token still sees every image (attention scoring is defined).
    example_samples = ((8, 1, 5), (3, 2, 4), (5, 3, 2))

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def check_decoder(self) -> None:
        super().check_decoder()
        config = self.text_config
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModel(f"{self.model_name} with use_bidirectional_attention=True is not a causal decoder")
        if config._attn_implementation not in compat.ALLOWED_MASK_BACKENDS:
            raise UnsupportedModel(
                f"st3 runs {self.model_name} with eager or sdpa attention, not {config._attn_implementation!r} "
                "(Gemma 3 does not support flash attention: it would drop the bidirectional image blocks)"
            )

    # --------------------------------------------------------------------------------------- masks
    def mask_rule(self, index: int) -> MaskRule:
        sliding = self.layer_types[index] == "sliding_attention"
        return MaskRule(window=self.text_config.sliding_window if sliding else None, blocks=True)

    def row_blocks(self, inputs: dict, visual: torch.Tensor) -> torch.Tensor | None:
        """The model's own image blocks from `token_type_ids` (None without them: the model is then causal)."""
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        types = inputs.get("token_type_ids")
        if types is None or types.shape != visual.shape:
            return None
        return get_block_sequence_ids_for_mask(types, device=visual.device)

    # --------------------------------------------------------------------------------------- rotary
    @property
    def _rotary_kinds(self) -> list[str]:
        return sorted(set(self.layer_types))

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer type's (cos, sin), stacked: [B, L, types, head_dim]."""
        rotary_emb = self.language_model.rotary_emb
        pairs = [compat.rotary(rotary_emb, hidden, position_ids, kind) for kind in self._rotary_kinds]
        return torch.stack([c for c, _ in pairs], 2), torch.stack([s for _, s in pairs], 2)

    def layer_rotary(self, index: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self._rotary_kinds.index(self.layer_types[index])
        return cos[:, :, kind], sin[:, :, kind]

    # --------------------------------------------------------------------------------- visual tokens
    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self) -> int:
        return self.model.config.mm_tokens_per_image

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """One square grid per image (the projector average-pools the patches to side x side tokens, raster order)."""
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        return [[Grid(1, side, side)] * (int(n) // per_image) for n in visual.sum(-1).tolist()]

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, window: int = 56,
             **options) -> nn.Module:  # fmt: skip
        """A Gemma 3 model (SigLIP tower of 2 layers, 16 tokens per image) whose decoder alternates two sliding-window
        layers (`window` columns) and one full-attention layer, with different rotary bases per type; fp32, eval.

        Its RMSNorm weights (zero at init, i.e. identity) are drawn at random so that the re-projection's norms
        matter, and so is the projector's weight (zero at init: every image token would be the same vector, scores
        all tied).
        """
        import transformers as tf

        torch.manual_seed(seed)
        text = build.tiny_text(
            hidden, layers, head_dim=16, sliding_window=window, query_pre_attn_scalar=24, bos_token_id=None,
            eos_token_id=None,
            layer_types=["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        )  # fmt: skip
        ids = dict(image_token_index=GEMMA_IMAGE, boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
        config = tf.Gemma3Config(text_config=text, vision_config=build.tiny_vision(32), mm_tokens_per_image=16, **ids)
        model = tf.Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            for module in model.model.language_model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.normal_(0.0, 0.3)
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
        return build.finish(model, attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch as Gemma3Processor lays it out: per sample (text before, images, text after), each
        image its `mm_tokens_per_image` tokens between begin/end-of-image tokens; `token_type_ids` 1 on image tokens."""
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        per_image = config.mm_tokens_per_image
        vocab = config.text_config.vocab_size
        rows, images = [], 0
        for before, count, after in samples or cls.example_samples:
            text = torch.randint(GEMMA_EOI + 1, vocab, (before + after,), generator=generator)
            image = torch.tensor([GEMMA_BOI] + [GEMMA_IMAGE] * per_image + [GEMMA_EOI])
            rows.append(torch.cat([text[:before], *[image] * count, text[before:]]))
            images += count
        input_ids, attention_mask = build.left_padded(rows)
        size = config.vision_config.image_size
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": (input_ids == GEMMA_IMAGE).long(),
            "pixel_values": torch.randn(images, 3, size, size, generator=generator),
        }

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        """`Gemma3Processor` with its PIL image processor at the tiny tower's size (image, begin and end tokens 3-5)."""
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        config = model.config
        side = config.vision_config.image_size
        specials = ["<pad>", "<unk>", "<s>", "<img>", "<boi>", "<eoi>"]
        tokenizer = build.word_tokenizer(specials, config.text_config.vocab_size, image_token="<img>",
                                         boi_token="<boi>", eoi_token="<eoi>")  # fmt: skip
        images = Gemma3ImageProcessorPil(size={"height": side, "width": side})
        return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=build.chat_template("<boi>"),
                               image_seq_length=config.mm_tokens_per_image)  # fmt: skip

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """The spec's decoder (Gemma 3's layer pattern, window and rotary) and a SigLIP tower."""
        import transformers as tf

        head_dim = spec.head_dim or spec.hidden // spec.heads
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": spec.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}  # fmt: skip
        text = build.decoder_dims(spec) | dict(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                               sliding_window=1024, max_position_embeddings=131072,
                                               pad_token_id=build.PAD_TOKEN)  # fmt: skip
        text["rope_parameters"] = rope
        vision = build.vision_dims(spec) | dict(num_attention_heads=spec.vision_heads or 1)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE)

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        return config.mm_tokens_per_image  # every image is pooled to the same grid

    @classmethod
    def typical_image(cls, config) -> tuple[int, int]:
        return tower_square(config)

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, the image tokens, text; `token_type_ids` so that the image attends to itself both ways."""
        config = self.model.config
        image_token = config.image_token_id
        image = torch.full((self.image_tokens(config, size),), image_token)
        special = (image_token, config.boi_token_index, config.eoi_token_index)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       special, generator)  # fmt: skip
        side = config.vision_config.image_size
        pixel_values = torch.randn(batch_size, 3, side, side, generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
                "token_type_ids": (ids == image_token).long()}  # fmt: skip
