"""P-Sigmoid (arXiv 2412.00556's schedule form, st3's parametrisation): the share of visual tokens kept falls along a
sigmoid of depth.

    st3.get("psigmoid", midpoint=0.4, steepness=12.0)        # half the way down by 40 % of the depth
    st3.match("psigmoid", budget=0.33, model=model, inputs=inputs)   # midpoint fitted to a third

The paper (whose code is not public, and whose formula could not be read here) fits a parametric sigmoid to
per-layer counts and tunes its parameters on validation data; st3 states its own form. With L layers, the share
entering layer l (from `start_layer` on) is

    s(l) = floor + (1 - floor) * sigmoid(steepness * (midpoint - l / L))

and a sample holding n visual tokens at the prompt keeps about n * s(l) of them: entering `start_layer` it keeps
ceil(held * s(start_layer)), entering each later layer ceil(held * s(l) / s(l - 1)) (the product telescopes; each ceil
can leave one token more). Layers before `start_layer` keep every token (FastV's finding: the first layers attend to
the image broadly). `midpoint` is the budget knob (`st3.match` bisects it); `st3 search --form psigmoid` chooses
`steepness` and `floor` on the scenes validation split at a target budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from st3.methods.base import Method, check, register, share


@register("psigmoid")
@dataclass(kw_only=True)
class PSigmoid(Method):
    """P-Sigmoid (arXiv 2412.00556), st3's form: from `start_layer` on, the share of the visual tokens kept entering
    layer l is floor + (1 - floor) * sigmoid(steepness * (midpoint - l / L)) (default rule: attention)."""

    budget_knob: ClassVar[str] = "midpoint"

    midpoint: float = 0.5
    """Depth (a share of the layers, in [0, 1]) where the kept share is halfway between 1 and `floor`; lower
    prunes earlier (the knob `st3.match` searches)."""
    steepness: float = 10.0
    """How sharply the share falls around the midpoint, in (0, 1000] (large: one cut, as FastV; small: a gentle
    slope)."""
    floor: float = 0.0
    """The share the deepest layers tend to, in [0, 1)."""
    start_layer: int = 2
    """First layer that prunes (as set for a 32-layer model; st3 eval scales it to the model's depth)."""
    min_keep: int = 1
    """Visual tokens a sample keeps at least."""

    def validate(self) -> None:
        check(0.0 <= self.midpoint <= 1.0, "midpoint", f"must be in [0, 1], got {self.midpoint}")
        check(0.0 < self.steepness <= 1e3, "steepness", f"must be in (0, 1000], got {self.steepness}")
        check(0.0 <= self.floor < 1.0, "floor", f"must be in [0, 1), got {self.floor}")
        check(self.start_layer >= 0, "start_layer", f"must be >= 0, got {self.start_layer}")
        check(self.min_keep >= 0, "min_keep", f"must be >= 0, got {self.min_keep}")

    def validate_for(self, num_layers: int) -> None:
        beyond = f"{self.start_layer} is beyond the model's last layer ({num_layers - 1})"
        check(self.start_layer < num_layers, "start_layer", beyond)

    def depth_knobs(self) -> dict[str, int]:
        return {"start_layer": self.start_layer}

    def kept_share(self, layer: int, num_layers: int) -> float:
        """s(layer): the share of the prompt's visual tokens kept entering `layer` (1 before `start_layer`)."""
        if layer < self.start_layer:
            return 1.0
        sigmoid = 0.5 * (1.0 + math.tanh(self.steepness * (self.midpoint - layer / num_layers) / 2))  # no overflow
        return self.floor + (1.0 - self.floor) * sigmoid

    def prefill_keep(self, layer: int, num_layers: int, visual: torch.Tensor) -> torch.Tensor | None:
        if layer < self.start_layer:
            return None
        held = self.kept_share(layer - 1, num_layers) if layer else 1.0  # the share held entering `layer`
        return share(visual, self.kept_share(layer, num_layers) / held if held > 0.0 else 0.0, self.min_keep)
