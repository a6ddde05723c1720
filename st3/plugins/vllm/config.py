"""The plugin's settings, read from vLLM's own `hf_overrides` and checked at engine start.

    --hf-overrides '{"architectures": ["St3LlavaForConditionalGeneration"],
                     "st3": {"method": "spread", "keep": 0.5, "spatial": 2.0}}'

`st3.method`: a rule that acts before the language model (`selection.RULES`); `st3.keep`: the visual tokens
kept per image, an integer count or a share in (0, 1] of the image's tokens (1.0: every token, an unpruned
baseline through the same code); every other key is a knob of the
rule, validated by st3's own class. A bad setting raises a ValueError naming it (`st3.keep: ...`) when the
engine starts, never a silent fallback. Imports neither vLLM nor transformers (tested without them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from st3.plugins.vllm import selection

KEY = "st3"
"""The `hf_overrides` key (an attribute of the model's config once vLLM applied the overrides)."""


@dataclass(frozen=True)
class Pruning:
    """A validated plugin setting: which rule, how many tokens per image, its knobs."""

    method: str
    keep: int | float
    knobs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, setting: Any) -> Pruning:
        """From the `st3` override: a dict {"method": ..., "keep": ..., knob: value, ...}."""
        if not isinstance(setting, dict):
            raise ValueError(
                f'st3: must be a dict such as {{"method": "spread", "keep": 0.5}}, got {type(setting).__name__}'
            )
        rest = dict(setting)
        method = rest.pop("method", None)
        if not isinstance(method, str):
            raise ValueError(f"st3.method: required, a name among {', '.join(selection.RULES)}; got {method!r}")
        selection.rule(method)
        if "keep" not in rest:
            raise ValueError("st3.keep: required, visual tokens kept per image (an integer, or a share in (0, 1])")
        keep = rest.pop("keep")
        if isinstance(keep, bool) or not isinstance(keep, int | float):
            raise ValueError(f"st3.keep: must be an integer or a share in (0, 1], got {keep!r}")
        if isinstance(keep, float) and not 0.0 < keep <= 1.0:
            raise ValueError(f"st3.keep: a share must lie in (0, 1], got {keep}")
        if isinstance(keep, int) and keep < 1:
            raise ValueError(f"st3.keep: must be >= 1 token per image, got {keep}")
        pruning = cls(method, keep, rest)
        pruning.selector(pruning.tokens(1 << 20))  # validates the knobs now (errors name them)
        return pruning

    @classmethod
    def of(cls, hf_config: Any) -> Pruning:
        """The setting of a model config that vLLM built with the plugin's architecture."""
        setting = getattr(hf_config, KEY, None)
        if setting is None:
            raise ValueError(
                f'st3: missing; pass it in hf_overrides, e.g. {{"{KEY}": {{"method": "spread", "keep": 0.5}}}} '
                "(docs/vllm.md)"
            )
        return cls.parse(setting)

    @property
    def rule(self) -> selection.Rule:
        return selection.rule(self.method)

    def tokens(self, visual: int) -> int:
        """Tokens kept of an image's `visual` tokens; an integer budget above them is refused."""
        if isinstance(self.keep, float):
            return max(1, min(visual, math.floor(self.keep * visual + 0.5)))
        if self.keep > visual:
            raise ValueError(f"st3.keep: {self.keep} is more than an image's {visual} visual tokens")
        return self.keep

    def selector(self, keep: int) -> object:
        """st3's selector (or VisionZip) for these knobs at `keep` tokens per image."""
        return selection.build(self.method, self.knobs, keep)
