"""What every token-trimming method is: a small validated dataclass with a few decision hooks.

The engine owns the mechanics (removing rows and cache entries, masks, positions, scoring); a method only
decides how many visual tokens each layer keeps, during prefill and during decoding, and which ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from st3.engine.scoring import top_k_mask

if TYPE_CHECKING:
    from torch import nn

    from st3.engine.session import Session
    from st3.trace import Trace

QUERY_ROWS = ("last", "text", "all")


@dataclass(kw_only=True)
class Method:
    """Base class: apply with `with method(model): model.generate(...)`, then read `method.trace`."""

    name: ClassVar[str] = "method"
    #: Whether `select` needs attention scores (controls such as Random do not).
    needs_scores: ClassVar[bool] = True
    #: The knob that sets how many tokens the method keeps (searched by `st3.match`).
    budget_knob: ClassVar[str | None] = None
    #: Whether the method merges visual tokens before the decoder (`compress`, from the vision tower).
    compresses_vision: ClassVar[bool] = False

    record_positions: bool = False
    """Also record which visual columns each decode forward attended to, per layer (costs memory)."""

    _trace: Trace | None = field(default=None, init=False, repr=False, compare=False)
    #: Per sample, the image/frame grids (`st3.adapters.Grid`) of the current prefill, set by the engine for
    #: methods that place tokens spatially (None where the model's adapter gives no layout).
    _layout: list | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------- to override
    def validate(self) -> None:
        """Raise ValueError naming the knob when a setting is out of range."""

    def validate_for(self, num_layers: int) -> None:
        """Checks that need the model's depth, run when the method is applied."""

    @property
    def query_rows(self) -> str:
        """Which query rows' attention scores tokens: 'last' prompt token, 'text' after the image, 'all'."""
        return "last"

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens to keep [B] when entering `layer`, given `visual` [B] held; None: keep all."""
        return None

    def tokens_before_decoder(self, visual: int) -> int:
        """Visual tokens per image that reach the decoder (methods that compress before it say fewer)."""
        return visual

    def compress(
        self, saliency: torch.Tensor, keys: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Before the decoder: (kept [images, P], rewritten [images, P], features [images, P, d_v]).

        saliency: the vision tower's [CLS] attention to each patch; keys: the patches' keys at that layer;
        features: the projector's inputs. Only methods with `compresses_vision` implement it.
        """
        raise NotImplementedError

    def decode_budget(self, layer: int, step: int, visual_after_prefill: torch.Tensor) -> torch.Tensor | None:
        """Visual tokens layer `layer` may hold for decode forward `step` (0-based); None: no limit."""
        return None

    def select(
        self, scores: torch.Tensor | None, candidates: torch.Tensor, keep: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """BoolTensor [B, S]: which candidate slots [B, S] to keep, keep[b] of them per sample.

        scores: attention received [B, S] (None when `needs_scores` is False); patches: each candidate's
        index among the sample's candidates (its patch in raster order while nothing was dropped before).
        """
        return top_k_mask(scores, candidates, keep)

    # ----------------------------------------------------------------------------------- the API
    def knobs(self) -> dict:
        """The method's settings (its constructor arguments), e.g. for JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def __call__(self, model: nn.Module) -> Session:
        """A context manager that applies this method to `model` and restores it on exit."""
        from st3.engine.session import Session

        return Session(self, model)

    @property
    def trace(self) -> Trace:
        """The record of the last forward or generate call made under this method."""
        if self._trace is None:
            raise RuntimeError(f"{type(self).__name__} has no trace yet: run the model inside `with method(model):`")
        return self._trace


def check(condition: bool, knob: str, message: str) -> None:
    """Raise a ValueError naming `knob` unless `condition` holds."""
    if not condition:
        raise ValueError(f"{knob}: {message}")


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method findable as `st3.get(name)`."""

    def wrap(cls: M) -> M:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get(name: str, **knobs) -> Method:
    """Build the registered method `name` with `knobs`."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods())}") from None
    return cls(**knobs)
