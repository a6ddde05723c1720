"""LLaVA (1.5 architecture): a CLIP vision tower and projector in front of a Llama-style decoder."""

from __future__ import annotations

import math

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid, MaskRule


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
            hidden[positions[0][flat], positions[1][flat]] = projected.to(hidden.dtype)
        kept = torch.zeros_like(visual)
        kept[positions] = keep.reshape(-1)
        return hidden, kept
