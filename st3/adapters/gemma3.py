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

import torch
from torch import nn

from st3 import compat
from st3.adapters.base import Adapter, Grid, MaskRule, UnsupportedModel


class Gemma3Adapter(Adapter):
    """`Gemma3ForConditionalGeneration` (Gemma 3 4B, 12B, 27B)."""

    model_classes = ("Gemma3ForConditionalGeneration",)
    decoder_layers = {"Gemma3DecoderLayer": "Gemma3Attention"}  # q_norm / k_norm, re-projected
    layer_kinds = ("full_attention", "sliding_attention")

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
