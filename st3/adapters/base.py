"""The seam between the engine and a model family.

An adapter answers every model-specific question the engine has: where the decoder stack is and how to
embed, normalise and call its layers; which input tokens are visual (images and videos); how positions
(of any leading shape, e.g. M-RoPE's [3, B, S]) become rotary embeddings; how one layer projects query and
key rows for scoring (bias, q/k norms, scaling); what travels with each row besides the hidden state
(e.g. Qwen3-VL's deepstack features); and how the visual tokens of a sample tile its images. The engine
only moves rows and cache entries. Nothing model-specific lives anywhere else.

Adapters are matched by the top-level model class, and then check the decoder they find: every layer must
be one whose attention they can re-project exactly, or the model is refused with an error saying what is
unsupported and what is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from st3 import compat
from st3.accounting import Shape

if TYPE_CHECKING:
    from st3.models import ModelSpec


class UnsupportedModel(TypeError):
    """The model (or its decoder) is one st3 cannot run exactly."""


@dataclass(frozen=True)
class MaskRule:
    """Which keys a query row may see in one kind of layer, composed as transformers' `masking_utils` composes it:
    (causal OR same image block) AND inside the window AND not padding.

    The engine evaluates it on ORIGINAL prompt columns (every row and cache slot keeps its column), never on slot
    indices: after pruning a layer holds fewer slots than columns, and a window counts columns, as the model does.
    """

    window: int | None = None
    """Sliding window: a key at column k is visible from column q only if k > q - window (`sliding_window_overlay`)."""
    blocks: bool = False
    """Rows of one image block see each other both ways (`blockwise_overlay`), where the prompt has blocks."""

    @property
    def causal(self) -> bool:
        """Plain causal attention: the mask transformers builds from slot order (equal: slots keep column order)."""
        return self.window is None and not self.blocks


@dataclass(frozen=True)
class Grid:
    """How one image or video of a sample lays out its visual tokens: `frames` x `rows` x `cols`, raster order.

    newline: each row ends with one extra token that is no patch (LLaVA-NeXT's `image_newline`), so a frame
    holds rows x (cols + 1) tokens; spatial selectors spread their budget over the patches first. An image of
    several parts (a base image and its tiles) is several grids, in prompt order.
    """

    frames: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def width(self) -> int:
        """Tokens per row, the newline included."""
        return self.cols + int(self.newline)

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.width


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings (cos/sin [B, R, D]) to rows x [B, heads, R, D], as Llama does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@contextmanager
def loaded(*modules: nn.Module) -> Iterator[None]:
    """Load, for direct calls into their submodules, the weights accelerate keeps off the device until one of
    `modules` runs its forward: a module offloaded whole (`preload_module_classes`) holds its submodules' weights on
    the meta device, and they have no hook of their own. st3 re-projects queries and keys without running the layer,
    so it loads them as that forward would, and offloads them again after. A module offloaded submodule by submodule
    (what `from_pretrained(device_map=...)` does) needs nothing here: each submodule's own hook loads its weights."""
    done = []
    try:
        for module in modules:
            hook = getattr(module, "_hf_hook", None)  # accelerate's AlignDevicesHook
            if getattr(hook, "offload", False) and getattr(hook, "place_submodules", False):
                hook.pre_forward(module)
                done.append((hook, module))
        yield
    finally:
        for hook, module in reversed(done):
            hook.post_forward(module, None)


def _row_coupled(layer: nn.Module) -> str | None:
    """The first submodule of `layer` whose output for one row depends on the other rows: torch's dynamic
    quantization computes one activation scale per call (by class module, without importing torch.ao)."""
    for name, module in layer.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            return f"{name} ({type(module).__name__})"
    return None


class Adapter:
    """Model-family specifics for one loaded model; the defaults describe a Llama-style decoder.

    A Llama-style layer: `input_layernorm`, then `self_attn` with `q_proj`/`k_proj` (bias or not), an
    optional per-head `q_norm`/`k_norm` before the rotation, rotate-half rotary, full causal attention and
    `scaling`. Subclasses name the layer/attention classes that match this exactly in `decoder_layers`.
    """

    #: Class names of the top-level models this adapter serves.
    model_classes: tuple[str, ...] = ()
    #: Decoder layer class name -> its attention class name, for every layer this adapter re-projects exactly.
    decoder_layers: dict[str, str] = {}
    #: Keyword arguments that reach the decoder stack from the top-level model but that no layer takes.
    ignored_kwargs: tuple[str, ...] = ()
    #: Layer types (`config.layer_types`) this adapter declares a `mask_rule` for.
    layer_kinds: tuple[str, ...] = ("full_attention",)

    def __init__(self, model: nn.Module):
        self.model = model
        self.check_decoder()

    # --------------------------------------------------------------------------------- where things are
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (e.g. `LlamaModel`) whose forward the engine replaces."""
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.language_model.layers

    @property
    def text_config(self):
        """The decoder's config."""
        return self.language_model.config

    @property
    def model_name(self) -> str:
        """The loaded model's class name, for messages."""
        return type(self.model).__name__

    # ------------------------------------------------------------------------ what the adapter supports
    def check_decoder(self) -> None:
        """Raise `UnsupportedModel` unless every decoder layer is one this adapter re-projects exactly."""
        supported = ", ".join(f"{layer} ({attn})" for layer, attn in self.decoder_layers.items())
        config = self.text_config
        problems = []
        kinds = set(self.layer_types)
        if not kinds <= set(self.layer_kinds):
            problems.append(f"layer types {sorted(kinds)} (supported: {', '.join(self.layer_kinds)})")
        for index, layer in enumerate(self.layers):
            layer_name, attn = type(layer).__name__, getattr(layer, "self_attn", None)
            expected = self.decoder_layers.get(layer_name)
            if expected is None:
                problems.append(f"layer {index} is a {layer_name}")
            elif type(attn).__name__ != expected:
                problems.append(f"layer {index}'s attention is a {type(attn).__name__}, not {expected}")
            elif hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
                problems.append(f"layer {index} normalises only one of queries and keys")
            coupled = _row_coupled(layer)
            if coupled:
                problems.append(
                    f"layer {index}'s {coupled} is dynamically quantized with one activation scale for all rows (a "
                    "row's output then depends on which other rows are present, so no pruned run equals the model; "
                    "weight-only or per-token activation quantization, e.g. torchao's, is supported)"
                )
            window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
            declared = self.mask_rule(index).window if not problems else None
            if window != declared:
                problems.append(f"layer {index} uses sliding-window attention (window {window})")
            if problems:
                break
        for knob in ("attn_logit_softcapping", "attention_logit_softcapping"):
            if getattr(config, knob, None) is not None:
                problems.append(f"attention soft-capping ({knob}={getattr(config, knob)})")
        if problems:
            raise UnsupportedModel(
                f"st3 cannot run {self.model_name} with this decoder exactly: {'; '.join(problems)}. "
                f"Supported decoder layers: {supported}; layer types {', '.join(self.layer_kinds)} (sliding "
                "windows as the config declares them); no soft-capping."
            )

    #: Why this family cannot compress visual tokens inside its vision tower (VisionZip and kin), for the refusal.
    compression_refused: str = "it has no [CLS] token to rank patches by"

    @classmethod
    def compression_refusal(cls, method_name: str, model_name: str) -> str:
        """The error of a method that compresses in the vision tower on this family (also raised before loading)."""
        return (
            f"{method_name} compresses visual tokens inside the vision tower, which st3 supports on LLaVA-1.5 (a CLIP "
            f"tower with a [CLS] token) only; {model_name}: {cls.compression_refused}. Use a method that prunes "
            "inside the decoder (e.g. spread, st3, fastv, divprune: `st3 methods` lists them)."
        )

    def check_method(self, method) -> None:
        """Raise ValueError if `method` needs something this family does not have."""
        if method.compresses_vision and not self.compresses_vision:
            raise ValueError(self.compression_refusal(type(method).__name__, self.model_name))

    def check_inputs(self, kwargs: dict, continuing: bool) -> None:
        """Inspect the top-level model's keyword arguments and refuse what cannot run exactly.

        continuing: the call continues a cache that st3 pruned (a decode step).
        """

    # -------------------------------------------------------------------- the decoder stack's own steps
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden)

    @property
    def use_cache_default(self) -> bool:
        return bool(self.text_config.use_cache)

    def layer_kwargs(self, kwargs: dict) -> dict:
        """The decoder stack's extra keyword arguments that its layers take."""
        return {k: v for k, v in kwargs.items() if k not in self.ignored_kwargs}

    def layer_mask(self, index: int, hidden: torch.Tensor, valid: torch.Tensor | None, cache):
        """Layer `index`'s attention mask, sized from that layer's own cache; `valid` [B, cached + new], or None
        when no key is padding (known on the host, so transformers' own padding check need not sync)."""
        return compat.causal_mask(self.text_config, hidden, valid, cache, index, padded=valid is not None)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Each decoder layer's type (`config.layer_types`; a model without them is all full attention)."""
        return tuple(getattr(self.text_config, "layer_types", None) or ("full_attention",) * len(self.layers))

    def mask_rule(self, index: int) -> MaskRule:
        """Which keys layer `index`'s rows may see (see `MaskRule`); default: plain causal."""
        return MaskRule()

    def causal_only(self) -> bool:
        """Whether every layer's mask is plain causal (no sliding window, no image block): only such a decoder runs
        exactly on a shortened prompt with the model's own masks, which count in slots, not original columns."""
        return all(self.mask_rule(index).causal for index in range(len(self.layers)))

    def padding_mask(self, attention_mask, inputs: dict) -> torch.Tensor | None:
        """The 2-D padding mask [B, columns] of a decoder call. A model that prepares its decoder's masks itself
        (a dict of 4-D masks, one per layer type) hands the decoder no 2-D mask: read the top-level call's."""
        return inputs.get("attention_mask") if isinstance(attention_mask, dict) else attention_mask

    def row_blocks(self, inputs: dict, visual: torch.Tensor) -> torch.Tensor | None:
        """LongTensor [B, S]: each prompt column's image block (-1: none) for `MaskRule.blocks`; None: no blocks."""
        return None

    def layer_rotary(self, index: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (cos, sin) [B, R, head_dim] out of what `rotary` returned for the same rows (a family
        with rotary per layer type returns every type's at once, [B, R, types, head_dim], and picks here)."""
        return cos, sin

    def layer_call_kwargs(self, cache, kwargs: dict) -> dict:
        """Keyword arguments of every decoder layer call in one forward (besides mask and rotary); built once."""
        return {"use_cache": True, **compat.cache_kwargs(cache), **kwargs}

    # --------------------------------------------------------------------------------------- positions
    def default_positions(self, attention_mask: torch.Tensor | None, start: int, batch: int, length: int, device):
        """Position ids for `length` new tokens after `start` columns, when the caller passed none."""
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        return torch.arange(start, start + length, device=device).expand(batch, length)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, L, head_dim], for `position_ids` [..., B, L]."""
        return compat.rotary(self.language_model.rotary_emb, hidden, position_ids)

    # ----------------------------------------------------------------------------------- re-projection
    def _project(self, layer: int, proj: str, norm: str, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s `proj` rows of `hidden`, per head, on `hidden`'s device (the layer may run on another)."""
        decoder_layer = self.layers[layer]
        attn = decoder_layer.self_attn
        with loaded(decoder_layer, attn):
            rows = getattr(attn, proj)(decoder_layer.input_layernorm(hidden)).view(*hidden.shape[:2], -1, attn.head_dim)
            if hasattr(attn, norm):
                rows = getattr(attn, norm)(rows)
        return rows.transpose(1, 2).to(hidden.device)

    def project_queries(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated query rows [B, heads, R, head_dim] of layer `layer` for its input rows `hidden` [B, R, H]."""
        return rotate(self._project(layer, "q_proj", "q_norm", hidden), *self.layer_rotary(layer, cos, sin))

    def project_keys(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated key rows [B, kv_heads, R, head_dim] of layer `layer` (as the layer would cache them)."""
        return rotate(self._project(layer, "k_proj", "k_norm", hidden), *self.layer_rotary(layer, cos, sin))

    def attention_scaling(self, layer: int) -> float:
        """The factor applied to q.k in layer `layer`."""
        return self.layers[layer].self_attn.scaling

    # ------------------------------------------------------------------------------------ visual tokens
    #: Token ids that hold visual features (images and videos).
    def visual_token_ids(self) -> tuple[int, ...]:
        raise NotImplementedError

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor [B, L]: which prompt columns hold visual tokens."""
        ids = torch.tensor(self.visual_token_ids(), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def token_counts(self, inputs: dict) -> tuple[list[int], list[int]]:
        """Per sample of the processor's output `inputs`, its (visual, text) token counts, padding excluded."""
        ids = inputs["input_ids"]
        real = inputs.get("attention_mask")
        real = real.bool() if real is not None else ids.new_ones(ids.shape, dtype=torch.bool)
        seen = self.visual_mask(ids) & real
        return seen.sum(-1).tolist(), (real & ~seen).sum(-1).tolist()

    def tokens_per_image(self) -> int | None:
        """Visual tokens one image takes where the config fixes it (LLaVA); None where the image decides (Qwen-VL):
        `typical_visual_tokens()` answers for every family."""
        return None

    def typical_visual_tokens(self) -> int:
        """Visual tokens of one typical image (`typical_image`): the fixed count where the config fixes it, else a
        figure to size budgets by, never a prompt's count (count those with `visual_mask`)."""
        config = self.model.config
        return self.image_tokens(config, self.typical_image(config))

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, the grids its visual tokens tile, in prompt order.

        inputs: the top-level model's keyword arguments; visual [B, S]; position_ids: what the decoder got.
        """
        raise NotImplementedError(f"{self.model_name}: no image layout")

    # ----------------------------------------------------------- what travels with each row of a prefill
    def row_inputs(self, kwargs: dict, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pop per-row decoder inputs from `kwargs` as [B, S, ...] tensors (gathered with the rows)."""
        return {}

    def stock_inputs(self, visual: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict:
        """The decoder stack's keyword arguments that `row_inputs` took, rebuilt for the surviving rows (the
        stock decoder runs them: docs/fast-paths.md); `visual` [B, K] marks the surviving visual rows."""
        return {}

    def after_layer(self, index: int, hidden: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the decoder stack does to the hidden states after layer `index` (default: nothing)."""
        return hidden

    # ----------------------------------------------------- vision side (methods that act before the decoder)
    compresses_vision: bool = False

    def capture_vision(self, store: dict, start: int | None = None) -> list:
        """Register removable hooks that put the vision tower's saliency inputs in `store` (from encoder layer
        `start` to the feature layer, summed; None: the feature layer alone); return the handles."""
        raise NotImplementedError(f"{self.model_name} cannot compress visual tokens before the decoder")

    def vision_saliency(self, store: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From a capture: ([CLS] attention [images, P], keys [images, P, d], projector inputs [images, P, d_v])."""
        raise NotImplementedError(f"{self.model_name} cannot compress visual tokens before the decoder")

    def place_compressed(
        self, hidden: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor, replaced: torch.Tensor,
        merged: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Write a compression's merged features into the prompt's rows: (hidden [B, S, H], kept [B, S]).

        keep / replaced [images, P]: the patches that stay and those rewritten with `merged` [images, P, d_v]
        (projected here); the adapter knows where each image's patches sit in the prompt.
        """
        raise NotImplementedError(f"{self.model_name} cannot compress visual tokens before the decoder")

    # ------------------------------------------------------------------------------------- accounting
    @property
    def shape(self) -> Shape:
        """Decoder dimensions, for FLOPs and KV accounting."""
        cfg = self.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return Shape(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
        )

    # ------------------------------------------------ the family's facts: tests, bench shapes, plans and docs
    #: The family's row of the README's supported-models table: (family, classes and decoders, status).
    summary: tuple[str, str, str] = ("", "", "")
    #: A batch of 3 samples in `tiny_inputs`'s form whose visual-token counts differ (the family matrix's batch).
    example_samples: tuple = ()

    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **options) -> nn.Module:
        """A tiny random model of this family, built from config (fp32, eval mode): nothing is downloaded."""
        raise NotImplementedError(f"{cls.__name__} declares no tiny model")

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch for a tiny model of this family, built without a processor (default samples:
        `example_samples`)."""
        raise NotImplementedError(f"{cls.__name__} declares no example inputs")

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """The transformers config of a real model's shape (`st3.models.SPECS`) of this family."""
        raise NotImplementedError(f"{cls.__name__} declares no real shape's config")

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Visual tokens of one image of `size` (height, width) pixels under `config`, as the family's processor
        sizes it (sides that are multiples of its tile or patch)."""
        raise NotImplementedError(f"{cls.__name__} does not count an image's visual tokens")

    @classmethod
    def typical_image(cls, config) -> tuple[int, int]:
        """The (height, width) of a typical image under `config` (a square of twice the tower's input side where
        the image decides the count; see each family)."""
        side = 2 * tower_square(config)[0]
        return side, side

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        """The family's own processor class for a tiny model of it (a word-level tokenizer, w0 w1 ...; the image
        processor at the tiny tower's size), for a saved checkpoint `st3 generate` can run; it needs no torchvision.
        Raise NotImplementedError where the family's processor needs torchvision, saying so."""
        raise NotImplementedError(f"{cls.__name__} declares no tiny processor")

    def bench_inputs(self, size: tuple[int, int], batch_size: int, text_before: int, text_after: int,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:  # fmt: skip
        """A batch of identical prompts for `st3 bench`: text, one image of `size` pixels, text; no padding."""
        raise NotImplementedError(f"{self.model_name}: no bench inputs")


def tower_square(config) -> tuple[int, int]:
    """The vision tower's square input (height, width); its size may be given as an int or a pair."""
    size = config.vision_config.image_size
    side = size if isinstance(size, int) else size[0]
    return side, side
