"""Applying a method to a model: install the engine on enter, restore the model exactly on exit.

While a method is applied, on this model instance only: the decoder stack's `forward` attribute is the
engine's loop, and removable hooks read inputs (a forward pre-hook on the top-level model for
`input_ids`; for methods that compress before the decoder, pre-hooks on one vision encoder layer and the
projector). No class, module or global is patched. A method that chooses only before the decoder gets the
stock-decoder path (`st3.engine.stock`): the stack's `forward` attribute chooses the survivors and then calls
the stack's own forward, and the model's `prepare_inputs_for_generation` attribute rewrites generate's mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from torch import nn

from st3 import compat
from st3.adapters import adapter_for
from st3.engine.forward import Engine
from st3.engine.stock import MODES, StockDecoder

if TYPE_CHECKING:
    from st3.methods.base import Method

_ACTIVE: WeakKeyDictionary[nn.Module, Session] = WeakKeyDictionary()
_ABSENT = object()


class Session:
    """Context manager returned by `method(model)`."""

    def __init__(self, method: Method, model: nn.Module, decoder: str = "auto"):
        compat.check_engine_version()
        self.method = method
        self.model = model
        self.adapter = adapter_for(model)
        self.adapter.check_method(method)
        num_layers = self.adapter.shape.num_layers
        method.validate_for(num_layers)
        if decoder not in MODES:
            raise ValueError(f"decoder: must be one of {', '.join(MODES)}, got {decoder!r}")
        self.engine = Engine(self.adapter, method)
        self.stock: StockDecoder | None = None
        # The model's own masks count windows and image blocks in sequence slots; after pruning only st3's loop
        # evaluates them on original columns, so such decoders stay on it (docs/fast-paths.md).
        plain = self.adapter.causal_only()
        if decoder == "stock" and not plain:
            raise ValueError(
                f"decoder: 'stock' cannot run {type(model).__name__} exactly: its layers have sliding windows or "
                "bidirectional image blocks, which the model's own mask counts in slots of the shortened prompt, not "
                "in original columns; use decoder='auto' or 'engine' (st3's loop, a DynamicCache, no torch.compile)"
            )
        if decoder != "engine" and plain and method.chooses_before_decoder(num_layers):
            self.stock = StockDecoder(self.engine, decoder)
        elif decoder == "stock":
            raise ValueError(
                f"{type(method).__name__} prunes inside the decoder or while decoding, so it needs st3's own decoder "
                "loop (a DynamicCache, no torch.compile); decoder='stock' serves methods that choose only before "
                "the decoder (docs/fast-paths.md)"
            )
        self._saved_forward = _ABSENT
        self._saved_prepare = _ABSENT
        self._hooks: list = []

    def __enter__(self) -> nn.Module:
        active = _ACTIVE.get(self.model)
        if active is not None:
            raise RuntimeError(
                f"{type(active.method).__name__} is already applied to this model; exit its `with` block "
                "before applying another method"
            )
        lm = self.adapter.language_model
        if self.stock is None and _compiled(self.model, lm):
            raise ValueError(
                f"{type(self.method).__name__} prunes inside the decoder or while decoding: st3's loop does not run "
                "under torch.compile (shapes change at every pruning layer and eviction). Apply it to the model "
                "uncompiled, or use a method that chooses only before the decoder (docs/fast-paths.md)"
            )
        self._saved_forward = lm.__dict__.get("forward", _ABSENT)
        if self.stock is not None:
            self.stock.stock = lm.forward  # the stack's own forward (or what the user set), called as is
            self._saved_prepare = self.model.__dict__.get("prepare_inputs_for_generation", _ABSENT)
            self.model.prepare_inputs_for_generation = self.stock.prepare(self.model.prepare_inputs_for_generation)
        lm.forward = self.engine.forward if self.stock is None else self.stock.forward
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self.engine.capture_inputs, with_kwargs=True))
            if self.method.compresses_vision:
                self._hooks.extend(self.adapter.capture_vision(self.engine.vision, self.method.saliency_start))
        except BaseException:
            self._remove_hooks()
            self._restore_forward()
            raise
        _ACTIVE[self.model] = self
        return self.model

    def __exit__(self, *exc_info) -> bool:
        self._remove_hooks()
        self._restore_forward()
        _ACTIVE.pop(self.model, None)
        return False

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _restore_forward(self) -> None:
        lm = self.adapter.language_model
        if self._saved_forward is _ABSENT:
            lm.__dict__.pop("forward", None)
        else:
            lm.forward = self._saved_forward
        self._saved_forward = _ABSENT
        if self.stock is not None:
            if self._saved_prepare is _ABSENT:
                self.model.__dict__.pop("prepare_inputs_for_generation", None)
            else:
                self.model.prepare_inputs_for_generation = self._saved_prepare
            self._saved_prepare = _ABSENT


def _compiled(*modules: nn.Module) -> bool:
    """Whether a module's `forward` was replaced by `torch.compile(module.forward)` on the instance."""
    return any(hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable") for m in modules)
