"""Applying a method to a model: install the engine on enter, restore the model exactly on exit.

While a method is applied, on this model instance only: the decoder stack's `forward` attribute is the
engine's loop, and removable hooks read inputs (a forward pre-hook on the top-level model for
`input_ids`; for methods that compress before the decoder, pre-hooks on one vision encoder layer and the
projector). No class, module or global is patched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from torch import nn

from st3 import compat
from st3.adapters import adapter_for
from st3.engine.forward import Engine

if TYPE_CHECKING:
    from st3.methods.base import Method

_ACTIVE: WeakKeyDictionary[nn.Module, Session] = WeakKeyDictionary()
_ABSENT = object()


class Session:
    """Context manager returned by `method(model)`."""

    def __init__(self, method: Method, model: nn.Module):
        compat.check_engine_version()
        self.method = method
        self.model = model
        self.adapter = adapter_for(model)
        self.adapter.check_method(method)
        method.validate_for(self.adapter.shape.num_layers)
        self.engine = Engine(self.adapter, method)
        self._saved_forward = _ABSENT
        self._hooks: list = []

    def __enter__(self) -> nn.Module:
        active = _ACTIVE.get(self.model)
        if active is not None:
            raise RuntimeError(
                f"{type(active.method).__name__} is already applied to this model; exit its `with` block "
                "before applying another method"
            )
        lm = self.adapter.language_model
        self._saved_forward = lm.__dict__.get("forward", _ABSENT)
        lm.forward = self.engine.forward
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
