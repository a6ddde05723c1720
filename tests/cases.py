"""The methods every generic test runs, built from the registry so that a new method needs no test edit.

`CASES` maps a case name to a builder of a fresh method configured for the tiny test models (6 layers,
16 to 36 visual tokens per sample). It holds the hand-picked `SETTINGS` below (knobs that reach code paths
a default never does: text-query scoring, other curves, eviction rules, compositions) and, for every
registered method that no setting builds, that method with its budget knob matched by `st3.match` to
half the visual tokens: registering a method is all it takes to put it through every generic test.
`REGISTERED` picks one case per registered name, for the properties that are checked once per method.

`SELECTORS` maps every registered selector to a case that runs it (as a method's prefill rule or as VTA's
eviction rule), adding a case where no setting uses it: a new selector joins every family row by itself too.

`noop(name)` is the method's no-op setting: its budget knob at "keep everything" (again `st3.match`) and
its decode schedule, if any, annealing to 1 (nothing evicted). A method for which that is not a no-op must
be declared in `NO_NOOP` with the reason; the no-op test fails, saying so, until it is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch

import st3
from st3.accounting import Shape
from st3.methods import Method
from st3.plan import plan

#: The decoder of `st3.testing.tiny_llava()` (checked against the adapter in test_properties).
TINY = Shape(num_layers=6, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
#: Visual tokens and other prompt tokens of the LLaVA test batch's first sample (conftest.BATCH[0]).
VISUAL, TEXT = 36, 10
NEW_TOKENS = 6

_GUIDES: WeakKeyDictionary = WeakKeyDictionary()


def guide_for(model):
    """SGL's guide for a tiny test model: the same family and vision tower config with a 2-layer decoder of other
    random weights, eager (built once per model, the global RNG untouched)."""
    if model not in _GUIDES:
        config = copy.deepcopy(model.config)
        text = config.text_config
        text.num_hidden_layers = 2
        if isinstance(getattr(text, "layer_types", None), list):  # one entry per layer (windows, Gemma 3)
            text.layer_types = text.layer_types[:2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            guide = type(model)(config).eval().to(model.dtype)
        guide.set_attn_implementation("eager")
        _GUIDES[model] = guide
    return _GUIDES[model]


def with_guide(method: Method) -> Method:
    """`method` with `guide_for` as its guide where it takes one (SGL: a registry default cannot name a model)."""
    return dataclasses.replace(method, guide=guide_for) if "guide" in method.knobs() else method


#: Settings scaled to the tiny model so that every one prunes (prefill, and decode where it anneals).
SETTINGS: dict[str, Callable[[], Method]] = {
    "st3": lambda: st3.ST3(start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2),
    "fastv": lambda: st3.FastV(layer=2, ratio=0.5),
    "fastv-all-rows": lambda: st3.FastV(layer=1, ratio=0.7, query="all"),
    "fastv-paper": lambda: st3.FastV(layer=2, ratio=0.3, variant="paper"),  # ceil: 26 of 36, round: 25
    "pyramiddrop": lambda: st3.PyramidDrop(keep=0.5),
    "pyramiddrop-paper": lambda: st3.PyramidDrop(keep=0.5, variant="paper"),
    "vtw": lambda: st3.VTW(layer=3),
    "sgl": lambda: st3.SGL(guide=guide_for, layer=2, keep=0.5),
    "random": lambda: st3.Random(keep=12, layer=1, seed=3),
    "lattice": lambda: st3.Lattice(keep=10, layer=0),
    "visionzip": lambda: st3.VisionZip(dominant=7, contextual=4),
    "visionzip-paper": lambda: st3.VisionZip(dominant=7, contextual=4, variant="paper"),
    "st3-text-query": lambda: st3.ST3(start_layer=2, stride=1, ratio=0.3, min_keep=2, query="text", anneal_every=1),
    "st3-layer0": lambda: st3.ST3(start_layer=0, stride=3, ratio=0.6, min_keep=2, anneal_curve="linear"),
    "st3-exponential": lambda: st3.ST3(start_layer=1, stride=1, ratio=0.2, anneal_curve="exponential", anneal_every=1),
    # compositions: schedule x selector (+ decode schedule)
    "divprune": lambda: st3.get("divprune", keep=10),
    "divprune-layer2-keys": lambda: st3.get(
        "divprune", keep=12, layer=2, selector=st3.selectors.DivPrune(features="keys")
    ),
    "dart": lambda: st3.get("dart", keep=12, layer=2, selector=st3.selectors.DART(pivots=3)),
    "dart-union": lambda: st3.get("dart", keep=12, layer=2, variant="union"),
    "cdpruner": lambda: st3.get("cdpruner", keep=9),
    "cdpruner-paper": lambda: st3.get("cdpruner", keep=9, selector=st3.selectors.CDPruner(variant="paper")),
    "stratified": lambda: st3.get("stratified", keep=10),
    "st3+stratified-diverse": lambda: st3.get(
        "st3+stratified", start_layer=0, stride=2, ratio=0.5, min_keep=2, anneal_final=1.0,
        selector=st3.selectors.Stratified(within="diverse"),
    ),
    "spread": lambda: st3.get("spread", keep=10),
    "st3+spread-keys": lambda: st3.get(
        "st3+spread", start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_final=1.0,
        selector=st3.selectors.Spread(features="keys", spatial=1.0),
    ),
    "st3+dart-accumulated": lambda: st3.get(
        "st3+dart", start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2,
        anneal_evict="accumulated",
    ),
    "st3+divprune-protected": lambda: st3.get(
        "st3+divprune", start_layer=1, stride=2, ratio=0.4, min_keep=2, anneal_steps=4, anneal_every=1,
        anneal_evict="protected", anneal_delay=1,
    ),
    "st3+cdpruner-diverse": lambda: st3.get(
        "st3+cdpruner", start_layer=0, stride=3, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=2,
        anneal_evict="diverse",
    ),
    "st3+raster-coverage": lambda: st3.get(
        "st3+raster", start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=4, anneal_every=1,
        anneal_evict="coverage", anneal_protect=0.3,
    ),
    "st3+sparsevlm-raters": lambda: st3.ST3(
        start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2,
        selector=st3.selectors.SparseVLM(),
    ),
    "fastv+vta": lambda: st3.get("fastv+vta", layer=2, ratio=0.5, decode=st3.VTA(steps=4, every=1, min_keep=2)),
    "pyramiddrop+vta-text": lambda: st3.PyramidDrop(
        keep=0.5, selector=st3.selectors.Attention(query="text"), decode=st3.VTA(steps=6, every=2, evict="accumulated")
    ),
}

#: Registered methods with no no-op setting (budget knob at everything + annealing to 1), with the reason.
NO_NOOP: dict[str, str] = {
    "psigmoid": "a sigmoid never reaches 1: at midpoint=1 the deepest layers still prune (about a sixth of the tokens)",
}


#: How far a matched budget may miss its target: VTW moves a whole layer's tokens at a time.
TINY_STEP = VISUAL / TINY.num_layers


def matched(name: str, target: float, tolerance: float = TINY_STEP) -> Method:
    """The registered method `name` with its budget knob set to keep `target` visual tokens per layer."""
    return st3.match(name, target, shape=TINY, visual=VISUAL, text=TEXT, new_tokens=NEW_TOKENS, tolerance=tolerance)


def _registered_cases() -> tuple[dict[str, Callable[[], Method]], dict[str, str]]:
    """(CASES, REGISTERED): the settings plus a matched case per registered method no setting builds."""
    cases = dict(SETTINGS)
    by_class = {}
    for case, build in SETTINGS.items():
        by_class.setdefault(type(build()), case)
    registered = {}
    for name in st3.methods():
        if name in SETTINGS:
            registered[name] = name
        elif type(st3.get(name)) in by_class:
            registered[name] = by_class[type(st3.get(name))]
        else:
            cases[name] = lambda name=name: matched(name, VISUAL / 2)
            registered[name] = name
    return cases, registered


CASES, _CASE_OF = _registered_cases()
#: One case per registered method: {registered name: builder of its case}.
REGISTERED: dict[str, Callable[[], Method]] = {name: CASES[case] for name, case in _CASE_OF.items()}


def _selector_cases() -> dict[str, str]:
    """{selector name: a case that runs it}; a selector no case runs gets one: `keep` at layer 1 choosing by it, or
    (a rule that reads decode-time attention) FastV then VTA evicting by it."""
    runs: dict[str, str] = {}
    for case, build in CASES.items():
        method = build()
        for rule in (method.rule, method.eviction_rule) if method.selectable else (method.eviction_rule,):
            runs.setdefault(rule.name, case)
    for name in st3.selectors.names():
        if name in runs:
            continue
        if "received" in st3.selectors.get(name).reads:
            vta = st3.VTA(steps=4, every=1, min_keep=2, evict=name)
            CASES[runs.setdefault(name, f"fastv+vta[{name}]")] = lambda vta=vta: st3.FastV(layer=2, decode=vta)
        else:
            CASES[runs.setdefault(name, f"keep[{name}]")] = lambda name=name: st3.Keep(keep=12, layer=1, selector=name)
    return runs


#: Every registered selector: the case that runs it.
SELECTORS: dict[str, str] = _selector_cases()


def noop(name: str) -> Method:
    """The registered method `name` set to prune nothing on the tiny model (see the module docstring)."""
    method = with_guide(matched(name, VISUAL, tolerance=0.0))
    if "anneal_final" in method.knobs():
        method = dataclasses.replace(method, anneal_final=1.0)
    elif method.decode is not None:
        method = dataclasses.replace(method, decode=dataclasses.replace(method.decode, final=1.0))
    planned = plan(method, TINY, visual=VISUAL, text=TEXT, new_tokens=NEW_TOKENS)
    kept = planned.prefill_visual + [n for step in planned.decode_visual for n in step]
    if min(kept) < VISUAL:
        raise AssertionError(
            f"{name}: its budget knob at 'keep everything' ({method.knobs()}) still prunes (planned counts "
            f"{planned.prefill_visual}, then {planned.decode_visual}); give it a no-op setting, or declare it "
            "in tests/cases.py NO_NOOP with the reason"
        )
    return method


def generate(model, inputs: dict, method: Method | None = None, **extra):
    """Greedy generation of NEW_TOKENS with logits, under `method` (None: the model alone)."""
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True, **extra}  # fmt: skip
    with torch.no_grad():
        if method is None:
            return model.generate(**inputs, **kwargs)
        with method(model):
            return model.generate(**inputs, **kwargs)


def new_tokens(out, inputs: dict) -> torch.Tensor:
    return out.sequences[:, inputs["input_ids"].shape[1] :]
