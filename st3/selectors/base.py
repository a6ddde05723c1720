"""The one contract for choosing tokens: a `Selector` keeps `view.keep[b]` of the candidates of each sample.

Every rule that picks visual tokens is a Selector: the prefill rules (attention, diversity, space), the decode
eviction rules of `st3.VTA`, Random and the lattice. A rule that ranks tokens writes `score(view)` and the base
class keeps the top k (`top_k_mask`, the one top-k); a rule that chooses a set (greedy max-min, a DPP, one per
stratum) writes `select(view)`. Each declares what it reads (`reads`) and whether it keeps exactly
min(keep, candidates) per sample by construction (`exact`; otherwise the engine checks the counts).

Every rule is per sample: a sample's choice depends on its own tokens only, never on its batch-mates (padding,
other images), which the tests check for every registered selector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from st3.knobs import check_types
from st3.registry import Registry
from st3.selectors.view import View

#: What a selector may read of a `View`.
READS = ("attention", "received", "features", "keys", "text", "layout")

SELECTORS: Registry = Registry("selector")
register = SELECTORS.register


#: A peer rule's `variant` knob: 'official' chooses what its authors' released code chooses (the default),
#: 'paper' follows the paper's text where the two differ (docs/methods.md says how, per peer).
VARIANTS = ("official", "paper")


def check(condition: bool, knob: str, message: str) -> None:
    """Raise a ValueError naming `knob` unless `condition` holds."""
    if not condition:
        raise ValueError(f"{knob}: {message}")


@dataclass(kw_only=True)
class Selector:
    """Which visual tokens to keep, given how many: `select(view)` -> BoolTensor [B, S]."""

    name: ClassVar[str] = "selector"
    #: What the rule reads of the view (`READS`): 'attention' needs a decoder layer that ran, 'received' makes
    #: the engine accumulate each decode step's attention, 'features' reads hidden states (or keys in decode).
    reads: ClassVar[frozenset[str]] = frozenset()
    #: Whether `select` keeps exactly min(keep, candidates) per sample by construction (a top-k of scores does);
    #: otherwise the engine checks the counts it keeps while decoding (one device sync per evicting step).
    exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the knob when a setting is out of range."""

    def score(self, view: View) -> torch.Tensor:
        """FloatTensor [B, S]: higher is kept first (a ranking rule writes this and nothing else)."""
        raise NotImplementedError(f"{type(self).__name__} writes `select`, not `score`")

    def select(self, view: View) -> torch.Tensor:
        """BoolTensor [B, S]: the view.keep[b] candidates of each sample to keep."""
        return top_k_mask(self.score(view), view.candidates, view.keep)

    def knobs(self) -> dict:
        """The selector's name and settings, e.g. for JSON."""
        return {"name": self.name, **asdict(self)}


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, S]: the k[b] highest-scoring candidates of each row (ties broken by position)."""
    masked = torch.where(candidates, scores, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = order.argsort(dim=-1)  # the inverse permutation: each slot's place in the order (6 ops in all)
    return candidates & (ranks < k[:, None])


def quantised(scores: torch.Tensor, resolution: float = 1e-4) -> torch.Tensor:
    """Scores rounded to `resolution` before ranking: ~1e-7 differences (eager vs sdpa, padded vs alone) then
    leave the rounded values equal, and ties go to the earlier position, so the choice does not flip."""
    return torch.round(scores.double() / resolution)


def seeded_draw(seed: int, patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, S]: one seeded uniform draw per patch index (`view.patches`), the same for every sample and batch."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(int(patches.max()) + 1, generator=generator, dtype=dtype)
    return draw.to(patches.device)[patches.clamp(min=0)]


def features(view: View, source: str) -> torch.Tensor:
    """[B, S, d] float features of the slots: 'hidden' states (embeddings before the decoder; keys where the
    hidden states are gone, in decode) or 'keys' (the kv heads' keys, concatenated)."""
    if source == "hidden":
        hidden = view.hidden()
        if hidden is not None:
            return hidden.float()
    return view.keys().transpose(1, 2).flatten(2).float()  # [B, S, kv_heads * D]


FEATURES = ("hidden", "keys")
