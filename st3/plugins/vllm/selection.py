"""The vLLM plugin's one door into st3's selectors: every call from the plugin into them goes through here.

The plugin runs the very selector classes the transformers engine runs (one implementation of each rule):
it shows a selector a `View` of one image as the engine shows it before the decoder (the image's projected
features as candidates, the instruction's token embeddings after them, the image's grid) and reads back the
kept rows. Nothing here imports transformers or vLLM, so it also runs where another transformers is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from st3 import selectors
from st3.methods.base import methods as registered_methods
from st3.methods.visionzip import VisionZip
from st3.selectors import View


class Grid(NamedTuple):
    """An image's token layout as selectors read it (`st3.adapters.Grid`'s fields, without its imports)."""

    frames: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.cols


@dataclass(frozen=True)
class Rule:
    """A rule the plugin applies before the language model: how to build it and what it reads."""

    build: Callable[..., object]
    reads_prompt: bool = False
    """Whether the choice depends on the instruction (then its embeddings travel with the image)."""
    needs_cls: bool = False
    """Whether it reads the vision tower's [CLS] attention (VisionZip)."""


RULES: dict[str, Rule] = {
    "spread": Rule(selectors.Spread),
    "stratified": Rule(selectors.Stratified),
    "divprune": Rule(selectors.DivPrune),
    "cdpruner": Rule(selectors.CDPruner, reads_prompt=True),
    "random": Rule(selectors.Random),
    "raster": Rule(selectors.Raster),
    "lattice": Rule(selectors.Lattice),
    "visionzip": Rule(VisionZip, needs_cls=True),
}
"""The plugin's method names -> st3's rules (`st3.selectors`, and VisionZip's own): `raster` is every n-th token
in raster order, `lattice` a lattice per image grid; `random` and `stratified` are seeded as in the engine."""

#: Knobs the plugin sets itself (a selector before the decoder reads the embeddings, never keys).
FIXED_KNOBS = {"features": "hidden"}


def rule(name: str) -> Rule:
    """The rule of a plugin method name; refuses st3's in-LLM methods and unknown names, saying why."""
    if name in RULES:
        return RULES[name]
    if name in registered_methods():
        raise ValueError(
            f"st3.method: {name!r} chooses tokens inside the language model, layer by layer, which vLLM cannot "
            f"do (one KV-cache length per request for all layers; docs/vllm.md); use one that acts before it: "
            f"{', '.join(RULES)}"
        )
    raise ValueError(f"st3.method: unknown {name!r}; available: {', '.join(RULES)}")


def knob_names(name: str) -> list[str]:
    """The knobs a user may set for a method (its selector's fields, less what the plugin sets itself)."""
    build = RULES[name].build
    if build is VisionZip:
        return ["contextual"]  # dominant = keep - contextual + 1 (it counts [CLS], which LLaVA drops)
    return [f.name for f in fields(build) if f.name not in FIXED_KNOBS]


def build(name: str, knobs: dict, keep: int) -> object:
    """The selector (or VisionZip) with `knobs`, validated by st3 itself: errors name the knob as `st3.<knob>`.

    VisionZip's budget is `keep` = patches + contextual tokens per image (its paper's 64 = 54 + 10): its
    `dominant` counts [CLS] as the released code does, which LLaVA's tower output does not carry."""
    allowed = knob_names(name)
    for knob in knobs:
        if knob not in allowed:
            raise ValueError(f"st3.{knob}: not a knob of {name!r}; its knobs: {', '.join(allowed) or 'none'}")
    names = {f.name for f in fields(RULES[name].build)}
    fixed = {k: v for k, v in FIXED_KNOBS.items() if k in names}
    if name == "visionzip":
        contextual = knobs.get("contextual", VisionZip.contextual)
        if not isinstance(contextual, int) or not 0 <= contextual < keep:
            raise ValueError(f"st3.contextual: must be an integer in [0, keep) = [0, {keep}), got {contextual!r}")
        fixed["dominant"] = keep - contextual + 1
    try:
        return RULES[name].build(**knobs, **fixed)
    except ValueError as error:
        raise ValueError(f"st3.{error}") from None
    except TypeError as error:
        raise ValueError(f"st3.{name}: {error}") from None


def reads_features(name: str, knobs: dict) -> bool:
    """Whether a rule's choice depends on the image's features (else on its grid and seed alone, so it is
    known before the encoder runs)."""
    if name in ("random", "raster", "lattice"):
        return False
    return not (name == "stratified" and knobs.get("within", selectors.Stratified.within) == "jitter")


def _unavailable(what: str) -> Callable:
    def read(*_):
        raise ValueError(f"{what} is not available before the language model (the vLLM plugin selects there)")

    return read


def select(
    selector,
    features: torch.Tensor,
    grid: Grid,
    keep: int,
    text: torch.Tensor | None = None,
    before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the `keep` rows of one image's `features` [N, d] that `selector` keeps.

    `text` [T, d]: the token embeddings of the instruction after the image, for rules that read it; `before`
    [P, d]: the prompt's embeddings before the image, which the engine's view holds too (nothing reads them,
    but with them the view has the engine's very shape, so its products round alike: CDPruner's greedy DPP
    flips on differences of 1e-7).
    """
    count = features.shape[0]
    parts = [p.to(features.dtype) for p in (before, features, text) if p is not None]
    hidden = torch.cat(parts) if len(parts) > 1 else features
    start = 0 if before is None else before.shape[0]
    candidates = torch.zeros(1, hidden.shape[0], dtype=torch.bool, device=features.device)
    candidates[0, start : start + count] = True
    instruction = None
    if text is not None and len(text):
        instruction = torch.zeros_like(candidates)
        instruction[0, start + count :] = True
    view = View(
        layer=0,
        candidates=candidates,
        keep=torch.tensor([keep], device=features.device),
        attention=_unavailable("attention"),
        hidden=lambda: hidden[None],
        keys=_unavailable("a decoder layer's keys"),
        text=lambda: instruction,
        grids=[[grid]],
    )
    return selector.select(view)[0, start : start + count].nonzero().squeeze(-1)


def compress(method: VisionZip, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor):
    """VisionZip per image: (kept patches [N, P], features [N, P, d_v] after merging), st3's own rule."""
    keep, _, merged = method.compress(saliency, keys, features)
    return keep, merged
