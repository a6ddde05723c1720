"""Every transformers calling convention or internal st3 depends on, in one place.

st3 replaces a decoder stack's forward and fills its own cache layers, so it relies on a few conventions
that transformers changes between minor releases. Each entry says which version changed what; the
supported range is the one `pyproject.toml` declares and CI tests at both ends.
"""

from __future__ import annotations

import inspect

import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = [
    "CACHE_KWARG",
    "LOAD_KWARGS",
    "DynamicCache",
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "ENGINE_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "cache_in",
    "check_engine_version",
    "cache_kwargs",
    "cache_of",
    "causal_mask",
    "mask_from_allowed",
    "decoder_output",
    "rotary",
    "take_cache",
]

TRANSFORMERS_VERSION: str = transformers.__version__

# 5.25 made `from_pretrained` kernelize a model by default (`use_kernels` None -> True: hub kernels replace layer
# forwards, and without the `kernels` package loading fails). st3's own loaders ask for transformers' own layers,
# as 5.23 and 5.24 load them by default: the layers the exactness proofs run on. (The keyword exists in both.)
LOAD_KWARGS: dict = {"use_kernels": False}

# The oldest transformers the engine is tested on (CI's "oldest" stage installs exactly this). pyproject.toml
# declares a lower floor so that st3[vllm] resolves beside vLLM, which caps transformers below it; the vLLM
# plugin runs only the selectors, which import no transformers. Below this floor the engine refuses to apply.
ENGINE_TRANSFORMERS: str = "5.23"


def check_engine_version() -> None:
    """Refuse to apply a method on a transformers older than the engine is tested on, saying what to do."""
    if Version(Version(TRANSFORMERS_VERSION).base_version) < Version(ENGINE_TRANSFORMERS):
        raise RuntimeError(
            f"st3's engine needs transformers >= {ENGINE_TRANSFORMERS} (the oldest CI tests it on); "
            f"{TRANSFORMERS_VERSION} is installed (vLLM's releases cap it lower: the vLLM plugin does not use the "
            f"engine). Install 'transformers>={ENGINE_TRANSFORMERS}' in an environment without vLLM."
        )


# 5.24 renamed the cache keyword of every model, decoder layer, attention module and `create_causal_mask`
# from `past_key_values` to `cache` (the old name is deprecated until 5.40). Read it off the mask function,
# whose fourth parameter is the cache in every release st3 supports.
CACHE_KWARG: str = list(inspect.signature(create_causal_mask).parameters)[3]
_CACHE_NAMES = ("cache", "past_key_values")
if CACHE_KWARG not in _CACHE_NAMES:  # pragma: no cover - a release outside the declared range
    raise ImportError(
        f"st3 does not know transformers {TRANSFORMERS_VERSION}'s cache keyword ({CACHE_KWARG!r}); "
        "install a version inside the range st3 declares (see pyproject.toml)"
    )


def cache_in(kwargs: dict):
    """The cache in a forward's keyword arguments, under either name (left in place)."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


def take_cache(kwargs: dict):
    """Pop the cache from a forward's keyword arguments, passed under either name (5.24: `cache`)."""
    found = [kwargs.pop(name) for name in _CACHE_NAMES if kwargs.get(name) is not None]
    for name in _CACHE_NAMES:
        kwargs.pop(name, None)
    if len(found) > 1 and found[0] is not found[1]:
        raise ValueError("two different caches were passed (as `cache` and `past_key_values`); pass one")
    return found[0] if found else None


def cache_kwargs(cache) -> dict:
    """`{keyword: cache}` for a decoder layer call, under the installed keyword."""
    return {CACHE_KWARG: cache}


# `allow_is_causal_skip=` (5.x): when the caller knows the padding mask has padding, turning the skip off
# saves sdpa's check of the whole mask (a device sync) and builds the same mask.
_SKIP_KWARG = "allow_is_causal_skip" in inspect.signature(create_causal_mask).parameters


def causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx: int, padded: bool = False):
    """The attention mask of layer `layer_idx`, sized from that layer's own cache.

    `create_causal_mask(..., layer_idx=)` exists since 5.0; the cache parameter is passed by position
    because its name changed in 5.24. `padded`: the caller knows `attention_mask` masks some key.
    """
    extra = {"allow_is_causal_skip": False} if padded and _SKIP_KWARG else {}
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx=layer_idx, **extra)


#: Attention implementations whose mask st3 builds from an evaluated [B, Q, K] boolean (`mask_from_allowed`).
ALLOWED_MASK_BACKENDS = ("eager", "sdpa")


def mask_from_allowed(config, inputs_embeds, allowed):
    """The attention mask, in the installed backend's format, that lets query row q see key k iff `allowed[b, q, k]`.

    Built by transformers' own mask interface (bool for sdpa, additive float for eager) from an index-based mask
    function that reads the evaluated tensor, so the format is whatever that release uses.
    """
    backend = config._attn_implementation
    if backend not in ALLOWED_MASK_BACKENDS:
        raise ValueError(
            f"st3 builds this decoder's masks (sliding windows, bidirectional image blocks) for "
            f"{' and '.join(ALLOWED_MASK_BACKENDS)} attention only, not {backend!r}: "
            "call model.set_attn_implementation('sdpa')"
        )
    batch, queries, keys = allowed.shape
    return ALL_MASK_ATTENTION_FUNCTIONS[backend](
        batch_size=batch, q_length=queries, kv_length=keys, mask_function=lambda b, h, q, k: allowed[b, q, k],
        attention_mask=None, allow_is_causal_skip=False, dtype=inputs_embeds.dtype, config=config, use_vmap=False,
        device=allowed.device,
    )  # fmt: skip


def decoder_output(last_hidden_state, cache) -> BaseModelOutputWithPast:
    """The decoder stack's output object; its cache field is `cache` from 5.24, `past_key_values` before."""
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, **{CACHE_KWARG: cache})


def cache_of(output):
    """The cache held by a model output, read without 5.24's deprecation warning for `.past_key_values`."""
    return output.get(CACHE_KWARG)


def rotary(rotary_emb, hidden, position_ids, layer_type: str | None = None):
    """(cos, sin) from a model's rotary module: `rotary_emb(x, position_ids)` throughout 5.x; a module with
    frequencies per layer type (Gemma 3) takes the type as a third argument."""
    if layer_type is None:
        return rotary_emb(hidden, position_ids)
    return rotary_emb(hidden, position_ids, layer_type)
