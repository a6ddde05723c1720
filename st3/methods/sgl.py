"""SGL (Zhao et al., CVPR 2025, arXiv 2412.03324, "A Stitch in Time Saves Nine"): a small VLM guides a large one.

    small = LlavaForConditionalGeneration.from_pretrained(..., attn_implementation="eager")
    with st3.SGL(guide=small)(large):
        large.generate(**inputs)

At the large model's prefill the guide (a smaller VLM of the same family, so the same visual tokens in the same
columns) runs the same inputs under `torch.no_grad`; each visual token's score is the attention it received in
the guide, summed over every layer, every head and the query rows from the prompt's last visual token onward.
Entering `layer` (default int(0.4 x depth)) the large model keeps the floor(`keep` x n) visual tokens of highest
score (n: the sample's).

Facts from the official code (NUS-HPC-AI-Lab/SGL @7e76fd2, InternVL2, modeling_internlm2.py 956-1005,
1033-1037): the raw sum over layers, heads and those rows; the large model prunes entering layer
int(depth x 0.4) (its script; argparse 0.3) keeping int(V x 0.4). Where st3 differs (docs/methods.md): the
official guide first generates its own answer and its decode rows' attention is added to the sum; st3's guide
runs the prompt only (one forward, no answer of its own). Kept tokens keep their positions, as the official's do.
The guide's cost is counted apart in the trace (`trace.flops()["guide"]`) and runs inside the timed call.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from st3.accounting import prefill_flops
from st3.methods.base import Method, check, register
from st3.selectors.base import quantised, top_k_mask

if TYPE_CHECKING:
    from st3.engine.forward import Engine
    from st3.engine.session import Session
    from st3.selectors import View

#: Config fields that fix how many visual tokens an image becomes and how they tile (top level or vision_config).
GEOMETRY = (
    "image_size", "patch_size", "spatial_merge_size", "temporal_patch_size", "merge_size", "downsample_ratio",
    "scale_factor", "vision_feature_select_strategy", "image_seq_length", "mm_tokens_per_image",
    "image_grid_pinpoints", "vision_aspect_ratio", "max_image_tiles", "tokens_per_second",
)  # fmt: skip
#: The image and video encoders generate() calls before the first forward (their inputs then never reach it).
ENCODERS = ("get_image_features", "get_video_features")
#: Where generate() copies each sample for beams and return sequences (after encoding the images: they stay single).
EXPAND = "_expand_inputs_for_generation"
#: Top-level keyword arguments that are the large model's own state, not the inputs the guide runs.
_NOT_INPUTS = frozenset({"cache", "past_key_values", "cache_position", "labels", "inputs_embeds"})


@register("sgl")
@dataclass(kw_only=True)
class SGL(Method):
    """SGL (arXiv 2412.03324): a small VLM of the same family reads the prompt; the visual tokens its attention
    favours, summed over its layers, are the ones the large model keeps entering `layer`."""

    budget_knob: ClassVar[str] = "keep"
    selectable: ClassVar[bool] = False

    guide: nn.Module | Callable | str | None = None
    """The small VLM (same family and image geometry as the model, eager attention), a function building it from
    the model it is applied to, or a checkpoint (a local directory or hub id: loaded once with the model's class,
    dtype and device, eager; `-m sgl:guide=PATH` on the command line); None is refused when applied."""
    layer: int | None = None
    """The large model's layer entering which the visual tokens leave; None: the official int(0.4 x depth) (12 of
    32, 19 of 48)."""
    keep: float = 0.4
    """Share of each sample's visual tokens kept, floor(keep x n) (official 0.4)."""

    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)
    _small: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _seen: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _vision: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _loaded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self) -> None:
        check(self.layer is None or self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")
        check(0.0 <= self.keep <= 1.0, "keep", f"must be in [0, 1], got {self.keep}")

    def validate_for(self, num_layers: int) -> None:
        last = self.pruning_layer(num_layers)
        check(last < num_layers, "layer", f"{last} is beyond the model's last layer ({num_layers - 1})")

    def pruning_layer(self, num_layers: int) -> int:
        """The layer entering which the visual tokens leave, on a model of `num_layers`."""
        return int(num_layers * 0.4) if self.layer is None else self.layer

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        if layer != self.pruning_layer(num_layers):
            return None
        return torch.minimum(torch.floor(visual.double() * self.keep + 1e-9).long(), visual)

    def knobs(self) -> dict:
        knobs = super().knobs()
        guide = self.guide
        if guide is not None and not isinstance(guide, str):  # a model is no JSON: its class and path, or a name
            path = getattr(getattr(guide, "config", None), "name_or_path", "")
            name = getattr(guide, "__name__", repr(guide))
            knobs["guide"] = f"{type(guide).__name__}({path})" if isinstance(guide, nn.Module) else name
        return knobs

    def __call__(self, model: nn.Module, decoder: str = "auto") -> Session:
        session = super().__call__(model, decoder)
        guide = self.guide
        if isinstance(guide, str):
            guide = self._from_checkpoint(guide, model)
        elif guide is not None and not isinstance(guide, nn.Module):
            guide = guide(model)
        check_guide(guide, session.adapter)
        self._small, self._engine = guide, session.engine
        return _Guided(session, self, model.base_model)  # type: ignore[return-value]

    def _from_checkpoint(self, path: str, model: nn.Module) -> nn.Module:
        """The guide at `path`, loaded as the model's class (dtype, device, eager attention) once per method."""
        if path not in self._loaded:
            from st3.compat import LOAD_KWARGS

            device = next(model.parameters()).device
            try:
                guide = type(model).from_pretrained(path, dtype=model.dtype, attn_implementation="eager", **LOAD_KWARGS)
            except OSError as error:
                raise ValueError(f"guide: cannot load a {type(model).__name__} from {path!r}: {error}") from None
            self._loaded[path] = guide.to(device).eval()
        return self._loaded[path]

    def begin(self, trace) -> None:
        super().begin(trace)
        self._vision, self._seen = self._seen, {}  # the encoders' inputs of this prefill

    def choose(self, view: View) -> torch.Tensor:
        """The `view.keep` candidates the guide's attention ranks highest."""
        if not bool(view.keep.any()):
            return torch.zeros_like(view.candidates)
        scores = self._guide_scores().to(view.candidates.device)
        ranked = torch.gather(scores, 1, view.columns.clamp(min=0))
        return top_k_mask(quantised(ranked), view.candidates, view.keep)

    @torch.no_grad()
    def _guide_scores(self) -> torch.Tensor:
        """FloatTensor [B, L] over the prompt's columns: the attention each visual token received in the guide."""
        if self._small is None or self._engine is None:
            raise RuntimeError("SGL's guide runs inside `with st3.SGL(guide=...)(model):` only")
        from st3.adapters import adapter_for

        small, engine, seen = self._small, self._engine, self._vision
        expand = seen.get("expand_size") or 1  # generate's copies of each sample (beams, return sequences)
        rows = {k: v[..., ::expand, :] for k, v in engine.inputs.items()
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and k not in _NOT_INPUTS and k not in seen}  # fmt: skip
        inputs = {**rows, **{k: v for k, v in seen.items() if isinstance(v, torch.Tensor)}}
        if not any(k.startswith("pixel_values") for k in inputs):
            raise ValueError("SGL runs its guide on the model's images: pass pixel_values, not encoder outputs")
        if "input_ids" not in inputs:
            raise ValueError("SGL runs its guide on the same input_ids as the model: pass input_ids, not inputs_embeds")
        device = next(small.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        visual = engine.adapter.visual_mask(inputs["input_ids"])
        guide_adapter = adapter_for(small)
        if not torch.equal(guide_adapter.visual_mask(inputs["input_ids"]), visual):
            raise ValueError("guide: it finds visual tokens in other columns than the model does (token ids differ)")
        out = small(**inputs, output_attentions=True, use_cache=False, logits_to_keep=1, return_dict=True)
        maps = out.attentions
        if not maps or any(m is None for m in maps):
            raise ValueError(
                "guide: it returned no attention maps; load it with attn_implementation='eager' "
                "(or call guide.set_attn_implementation('eager'))"
            )
        valid = inputs.get("attention_mask", torch.ones_like(visual)).bool()
        scores = aggregate(maps, visual, valid)
        shape = guide_adapter.shape
        self.trace.guide_flops += sum(prefill_flops(shape, [n] * shape.num_layers) for n in valid.sum(-1).tolist())
        return scores.repeat_interleave(expand, 0)


class _Guided:
    """The method's session, plus recorders of what the model's image and video encoders are given (generate()
    encodes the images before the first forward, so the pixels reach the encoders and not the forward the guide
    copies) and of how many copies of each sample generate() makes (the images are encoded once per sample).
    Instance attributes of the model only, restored on exit (as the session's own)."""

    def __init__(self, session: Session, method: SGL, base: nn.Module):
        self.session, self.method, self.base = session, method, base
        self.saved: dict[tuple[nn.Module, str], object] = {}
        self.inside = 0  # recorded calls under way

    def __enter__(self) -> nn.Module:
        model = self.session.__enter__()
        for owner, name in [(self.base, name) for name in ENCODERS] + [(model, EXPAND)]:
            function = getattr(owner, name, None)
            if function is not None:
                self.saved[owner, name] = owner.__dict__.get(name, _ABSENT)
                setattr(owner, name, self._recorder(function, ("expand_size",) if name == EXPAND else None))
        return model

    def __exit__(self, *exc_info) -> bool:
        for (owner, name), saved in self.saved.items():
            if saved is _ABSENT:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, saved)
        self.saved.clear()
        return self.session.__exit__(*exc_info)

    def __getattr__(self, name: str):
        if name == "session":
            raise AttributeError(name)
        return getattr(self.session, name)  # the session's own attributes (engine, adapter, stock)

    def _recorder(self, function: Callable, only: tuple[str, ...] | None) -> Callable:
        """`function`, recording its arguments (those named in `only`, else all) into the method's `_seen`."""
        signature = inspect.signature(function)

        @functools.wraps(function)  # generate() reads an encoder's signature to pick its inputs
        def record(*args, **kwargs):
            if not self.inside:  # an encoder calling another (Qwen3-VL's videos go through its image encoder)
                given = signature.bind_partial(*args, **kwargs).arguments
                self.method._seen.update({k: v for k, v in given.items() if only is None or k in only})
            self.inside += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.inside -= 1

        return record


_ABSENT = object()


def aggregate(maps: tuple[torch.Tensor, ...], visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FloatTensor [B, L]: per visual column, the attention it received in `maps` (per layer [B, H, L, L]), summed
    over layers, heads and the real query rows from each sample's last visual token on (official: raw sums)."""
    columns = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, columns, -1).amax(-1, keepdim=True)  # [B, 1]
    rows = (columns >= last_visual) & valid & (last_visual >= 0)  # [B, L]
    received = sum(m.float().sum(1) for m in maps)  # [B, L, L]: heads and layers summed
    return (received * rows[:, :, None]).sum(1) * visual


def check_guide(guide: nn.Module | None, adapter) -> None:
    """Refuse a guide that could not rank the model's visual tokens: none, another family, other visual token ids,
    another image geometry (so another count or grid of visual tokens), or attention maps it cannot return."""
    from st3.adapters import adapter_for

    if guide is None:
        raise ValueError(
            "guide: SGL ranks the visual tokens by a small model's attention; pass st3.SGL(guide=small_model), a "
            "smaller VLM of the same family loaded with attn_implementation='eager'"
        )
    check(isinstance(guide, nn.Module), "guide", f"the builder must return a model, got {type(guide).__name__}")
    small = adapter_for(guide)
    check(
        type(small) is type(adapter),
        "guide",
        f"{small.model_name} is not of the model's family ({adapter.model_name}): its visual tokens would differ",
    )
    ids, want = small.visual_token_ids(), adapter.visual_token_ids()
    check(ids == want, "guide", f"its visual token ids {list(ids)} differ from the model's {list(want)}")
    mine, theirs = geometry(guide.config), geometry(adapter.model.config)
    differ = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    check(
        not differ,
        "guide",
        "its images become other visual tokens (count or grid) than the model's: "
        + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in sorted(differ.items())),
    )
    attention = getattr(small.text_config, "_attn_implementation", None)
    check(
        attention in (None, "eager"),
        "guide",
        f"SGL reads the guide's attention maps, which {attention!r} attention does not return; load it with "
        "attn_implementation='eager' (or call guide.set_attn_implementation('eager'))",
    )


def geometry(config) -> dict:
    """The config fields (top level and vision_config) that decide an image's visual tokens."""
    out = {}
    for prefix, part in (("", config), ("vision_config.", getattr(config, "vision_config", None))):
        for name in GEOMETRY:
            value = getattr(part, name, None) if part is not None else None
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[prefix + name] = value
    return out
