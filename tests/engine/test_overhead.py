"""The engine's own per-step cost: no device-to-host sync while decoding, bookkeeping of constant size.

Timing tests would be flaky on a shared machine; these count what makes a GPU decode step slow when it
is launch-bound: calls that wait for the device, and the number of torch operations issued per step.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from cases import SETTINGS as METHODS
from cases import with_guide
from conftest import BATCH, single

import st3
from st3.bench.ops import Ops, decode_ops
from st3.engine.cache import PrunableLayer, gather, pack_index
from st3.engine.forward import Engine
from st3.testing import tiny_inputs

NEW_TOKENS = 10
#: Tensor methods that copy a value to the host, i.e. wait for the device (`nonzero` sizes its output).
SYNCING = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")


class Syncs:
    """Counts syncing tensor calls made while `active`, per decode forward (a list of counts)."""

    def __init__(self) -> None:
        self.per_forward: list[int] = []
        self.active = False
        self.reorder_syncs = 0
        self.beam_steps: list[torch.Tensor] = []  # distinct beam index tensors the cache was reordered with

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
        originals_fn = torch.nonzero

        def counting(fn):
            def wrapper(*args, **kwargs):
                if self.active == "reorder":
                    self.reorder_syncs += 1
                elif self.active:
                    self.per_forward[-1] += 1
                return fn(*args, **kwargs)

            return wrapper

        try:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, counting(fn))
            torch.nonzero = counting(originals_fn)
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
            torch.nonzero = originals_fn


#: Every registered method at its defaults, the no-op, and every configuration of the correctness tests
#: (each eviction rule, each selector, the compositions), all of which evict while decoding on the tiny model.
CONFIGURATIONS = {
    "noop": lambda: st3.ST3(ratio=0.0, anneal_final=1.0),
    **{f"registry-{name}": (lambda name=name: with_guide(st3.get(name))) for name in st3.methods()},
    **METHODS,
}


@pytest.fixture()
def syncs(monkeypatch):
    """Syncs counted inside every decode forward of the engine and every batch operation on its cache;
    `evicted` counts, per decode forward, the layers that evicted."""
    counter = Syncs()
    counter.evicted = []
    decode, evict = Engine._decode, Engine._evict

    def counted_decode(self, *args, **kwargs):
        counter.per_forward.append(0)
        counter.evicted.append(0)
        counter.active = True
        try:
            return decode(self, *args, **kwargs)
        finally:
            counter.active = False

    def noted_evict(self, *args, **kwargs):
        counter.evicted[-1] += 1
        return evict(self, *args, **kwargs)

    reorder = PrunableLayer.reorder_cache

    def counted_reorder(self, beam_idx):
        if not any(seen is beam_idx for seen in counter.beam_steps):  # kept alive: ids are not reused
            counter.beam_steps.append(beam_idx)
        counter.active = "reorder"
        try:
            return reorder(self, beam_idx)
        finally:
            counter.active = False

    monkeypatch.setattr(Engine, "_decode", counted_decode)
    monkeypatch.setattr(Engine, "_evict", noted_evict)
    monkeypatch.setattr(PrunableLayer, "reorder_cache", counted_reorder)
    with counter.installed():
        yield counter


def generate(model, inputs, method, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    with torch.no_grad(), method(model):
        return model.generate(**inputs, **kwargs)


ANNEALING = dict(start_layer=1, stride=2, ratio=0.5, min_keep=2, anneal_steps=6, anneal_every=2)


#: The configurations whose decode eviction syncs: their rule ('diverse', a greedy max-min subset) sizes its
#: loop on the host at each evicting layer (at most one sync each, in st3.selectors.diversity), and it is not exact by
#: construction, so the kept counts of an evicting step are checked after it, all layers in one sync.
#: Every other rule is made of top-k masks, whose counts the host knows: no sync in any decode step.
#: `make test` counts cases.py's configurations (a case of nearly every registered method, the st3+ compositions
#: with their own knobs); the `slow` run (CI) counts every registered method at its registry defaults too.
CONFIGURATION_PARAMS = [
    pytest.param(name, marks=pytest.mark.slow if name.startswith("registry-") else ())
    for name in sorted(CONFIGURATIONS)
]

SYNCS_WHEN_EVICTING = {"st3+cdpruner-diverse"}


@pytest.mark.parametrize("name", CONFIGURATION_PARAMS)
def test_at_most_one_sync_per_decode_step(name, model, inputs, syncs):
    method = CONFIGURATIONS[name]()
    generate(model, inputs, method)  # a padded batch of three: masks with padding, per-sample budgets
    assert len(syncs.per_forward) == NEW_TOKENS - 1
    if name in METHODS and method.annealing is not None and method.annealing.final < 1:
        assert any(syncs.evicted), "the schedule must evict for this test to mean something"
    assert (name in SYNCS_WHEN_EVICTING) == (not method.evicts_exactly)
    bound = [layers + (layers > 0) if name in SYNCS_WHEN_EVICTING else 0 for layers in syncs.evicted]
    assert all(n <= most for n, most in zip(syncs.per_forward, bound)), (syncs.per_forward, bound)
    assert all(n == 0 for n, layers in zip(syncs.per_forward, syncs.evicted) if not layers), "none without eviction"


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_host_budgets_equal_the_schedule(name):
    """The engine's host-side budgets are the decode schedule's own, exactly, at every step and count."""
    method = CONFIGURATIONS[name]()
    counts = [0, 1, 2, 3, 7, 24, 99, 144, 576, 2880]
    for step in range(80):
        host = method.host_decode_budget(0, step, counts)
        device = method.decode_budget(0, step, torch.tensor(counts))
        assert host == (None if device is None else device.tolist()), (step, host, device)


def test_a_miscounting_rule_is_caught_at_the_end_of_its_step(model, inputs, monkeypatch):
    method = METHODS["st3+cdpruner-diverse"]()  # evicts by DivPrune over the cached keys: not exact, so checked
    rule = st3.selectors.DivPrune
    select = rule.select
    monkeypatch.setattr(rule, "select", lambda self, view: select(self, view) & (view.patches % 2 == 0))
    with pytest.raises(RuntimeError, match="DivPrune kept"):
        generate(model, inputs, method)


def test_beam_reordering_syncs_once_per_step(model, inputs, syncs):
    method = st3.ST3(**ANNEALING)
    generate(model, inputs, method, num_beams=2)
    # the reorder of every layer's host counts reads the beam index once per step, not once per layer
    layers = model.config.text_config.num_hidden_layers
    assert layers > 1
    assert syncs.per_forward == [0] * (NEW_TOKENS - 1)
    assert 1 <= len(syncs.beam_steps) <= NEW_TOKENS
    assert syncs.reorder_syncs == len(syncs.beam_steps)


def test_the_sync_counter_sees_a_sync(syncs):
    syncs.per_forward.append(0)
    syncs.active = True
    bool(torch.ones(2).any())
    torch.ones(3).nonzero()
    syncs.active = False
    assert syncs.per_forward == [2]


# ---------------------------------------------------------------------------------- operations
def ops_per_decode_forward(model, inputs, method) -> list[int]:
    """Torch operations issued by each decode forward of the decoder stack (layers included).

    The gather's per-shape block numbers (`cache._BLOCKS`) are forgotten first: built on a shape's first
    eviction (two operations), they would otherwise make the count depend on which tests ran before."""
    from st3.engine import cache

    cache._BLOCKS.clear()
    return [ops.total() for ops in decode_ops(model, inputs, method, NEW_TOKENS)]


def test_noop_decode_issues_no_more_operations_than_vanilla(model, inputs):
    vanilla = ops_per_decode_forward(model, single(inputs, 0), None)
    noop = ops_per_decode_forward(model, single(inputs, 0), st3.ST3(ratio=0.0, anneal_final=1.0))
    assert len(vanilla) == len(noop) == NEW_TOKENS - 1
    # the same decoder layers run; the engine adds a couple of operations per forward (rotary, positions),
    # none per layer (the model has 6 layers: one per layer would be 6 more)
    layers = model.config.text_config.num_hidden_layers
    assert max(noop) < max(vanilla) + layers


@pytest.mark.parametrize("name", CONFIGURATION_PARAMS)
def test_operations_per_step_do_not_grow_with_batch_or_tokens(name, model, inputs):
    make = CONFIGURATIONS[name]
    one = ops_per_decode_forward(model, single(inputs, 1), make())
    two = ops_per_decode_forward(model, tiny_inputs(model, ((2, 9), (2, 9))), make())
    three = ops_per_decode_forward(model, inputs, make())
    six = ops_per_decode_forward(model, tiny_inputs(model, BATCH * 2), make())
    # no per-sample or per-token Python loop: the same operations for 1 and 2 samples, and for a padded
    # batch of 3 and of 6 (padding adds masks, one per distinct set of slots: per layer at most)
    assert len(one) == len(three) == NEW_TOKENS - 1
    assert one == two
    assert three == six
    if make().annealing is None:  # nothing evicts while decoding: every step costs the same, however long
        assert len(set(three)) == 1, three


def test_gather_is_a_constant_number_of_operations():
    for batch in (1, 8):
        x = torch.randn(batch, 2, 10, 4)
        index = torch.stack([torch.randperm(10)[:6] for _ in range(batch)])
        with Ops() as ops:
            out = gather(x, index, 2)
        assert ops.count <= 8, ops.names
        for b in range(batch):
            assert torch.equal(out[b], x[b].index_select(1, index[b]))
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = pack_index(keep, width=3)
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert torch.equal(pack_index(keep)[0], index)
    # with the kept counts known on the host: the same index, and no filler mask where no row needs filler
    by_host, host_valid = pack_index(keep, counts=[3, 1])
    assert torch.equal(by_host, index) and torch.equal(host_valid, valid)
    even = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(pack_index(even, counts=[2, 2])[0], pack_index(even)[0])
    assert pack_index(even, counts=[2, 2])[1] is None


def test_the_overhead_bench_reports_every_configuration(tmp_path, capsys):
    """The bench's output structure (its figures are measurements, recorded in benchmarks/README)."""
    import json

    from st3.bench.harness import CLOCKS
    from st3.bench.overhead import TARGETS, main

    path = tmp_path / "overhead.json"
    argv = ["--layers", "4", "--repeats", "2", "--warmup", "0", "--new-tokens", "3", "-m", "noop", "-m", "fastv"]
    result = main([*argv, "--clock", "thread", "--json", str(path)])
    assert json.loads(path.read_text()) == result
    assert list(result["rows"]) == ["vanilla", "noop", "fastv"]
    assert result["meta"]["clock"] == "thread" and result["meta"]["layers"] == 4 and result["meta"]["repeats"] == 2
    vanilla = result["rows"]["vanilla"]
    for label, row in result["rows"].items():
        assert set(row["clocks"]) == set(CLOCKS)
        assert len(row["samples_long_s"]) == len(row["samples_short_s"]) == 2
        assert {k: row[k] for k in row["clocks"]["thread"] if k in row} == row["clocks"]["thread"]  # the chosen one
        for name, summary in row["clocks"].items():
            assert summary["decode_ms_min"] <= summary["decode_ms_per_step"] <= summary["decode_ms_max"]
            if label != "vanilla":  # ratios are to vanilla's medians on the same clock
                base = vanilla["clocks"][name]
                assert math.isclose(summary["decode_ratio"] * base["decode_ms_per_step"], summary["decode_ms_per_step"])
                assert math.isclose(summary["prefill_ratio"] * base["prefill_ms"], summary["prefill_ms"])
        if label != "vanilla":
            assert row["decode_target"] == TARGETS[label]
    table = capsys.readouterr().out
    assert table.index("thread clock") < table.index("wall clock")
    assert all(f"| {label} |" in table for label in result["rows"])
