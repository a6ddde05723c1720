"""Selectors, one by one: each rule against a straightforward re-computation, and batch independence."""

from __future__ import annotations

import pytest
import torch
from conftest import single

import st3
from st3.selectors import View
from st3.selectors.cdpruner import dpp_greedy

S = st3.selectors


def view(hidden: torch.Tensor, keep: list[int], keys: torch.Tensor | None = None, text=None) -> View:
    batch, slots, _ = hidden.shape
    candidates = torch.ones(batch, slots, dtype=torch.bool)
    if text is not None:
        candidates = ~text
    keys = hidden[:, None] if keys is None else keys
    return View(
        layer=0,
        candidates=candidates,
        keep=torch.tensor(keep),
        patches=torch.where(candidates, candidates.long().cumsum(-1) - 1, -1),
        attention=lambda rows=None: torch.rand(batch, slots),
        hidden=lambda: hidden,
        keys=lambda: keys,
        text=(lambda: text) if text is not None else (lambda: None),
    )


def test_divprune_adds_the_token_farthest_from_those_chosen():
    torch.manual_seed(0)
    features = torch.randn(1, 12, 5)
    kept = S.DivPrune().select(view(features, [5]))
    unit = torch.nn.functional.normalize(features[0], dim=-1)
    distance = 1 - unit @ unit.T
    off = distance + torch.eye(12) * 9
    chosen = [int(off.amin(-1).argmax())]
    while len(chosen) < 5:
        rest = [i for i in range(12) if i not in chosen]
        chosen.append(max(rest, key=lambda i: float(distance[i, chosen].min())))
    assert kept[0].nonzero().squeeze(-1).tolist() == sorted(chosen)


def test_divprune_drops_duplicates_first():
    base = torch.randn(4, 6)
    features = torch.cat([base, base[:2] * 2.0])[None]  # two scaled copies: cosine-identical to tokens 0, 1
    kept = S.DivPrune().select(view(features, [4]))
    assert not (kept[0, 0] and kept[0, 4]) and not (kept[0, 1] and kept[0, 5])


def test_dart_keeps_key_norm_pivots_and_the_least_duplicated():
    torch.manual_seed(1)
    hidden = torch.randn(1, 10, 6)
    keys = torch.randn(1, 2, 10, 3)
    kept = S.DART(pivots=2, variant="union").select(view(hidden, [5], keys))
    norms = keys[0].pow(2).sum(-1).sum(0)
    pivots = norms.topk(2).indices.tolist()
    unit = torch.nn.functional.normalize(hidden[0], dim=-1)
    duplication = (unit @ unit[pivots].T).amax(-1)
    rest = [i for i in duplication.argsort().tolist() if i not in pivots][:3]
    assert kept[0].nonzero().squeeze(-1).tolist() == sorted(pivots + rest)


def test_dpp_greedy_adds_the_item_that_raises_the_log_determinant_most():
    torch.manual_seed(2)
    x = torch.randn(9, 4, dtype=torch.float64)
    kernel = x @ x.T + 0.1 * torch.eye(9, dtype=torch.float64)
    kept = dpp_greedy(kernel[None], torch.ones(1, 9, dtype=torch.bool), torch.tensor([4]))
    chosen: list[int] = []
    for _ in range(4):
        rest = [i for i in range(9) if i not in chosen]
        chosen.append(max(rest, key=lambda i: float(torch.logdet(kernel[chosen + [i]][:, chosen + [i]]))))
    assert kept[0].nonzero().squeeze(-1).tolist() == sorted(chosen)


def test_cdpruner_choice_does_not_depend_on_batch_mates():
    torch.manual_seed(3)
    text = torch.zeros(1, 14, dtype=torch.bool)
    text[:, 10:] = True
    sample = torch.randn(1, 14, 8)
    others = [torch.randn(2, 14, 8) * scale for scale in (0.1, 30.0)]
    alone = S.CDPruner().select(view(sample, [4], text=text))
    for mates in others:
        batch = torch.cat([sample, mates])
        kept = S.CDPruner().select(view(batch, [4, 3, 5], text=text.expand(3, -1)))
        assert torch.equal(kept[0], alone[0])


def test_cdpruner_relevance_moves_the_choice():
    torch.manual_seed(4)
    text = torch.zeros(1, 14, dtype=torch.bool)
    text[:, 10:] = True
    hidden = torch.randn(1, 14, 8)
    diverse = S.CDPruner(variant="paper", theta=0.0).select(view(hidden, [3], text=text))
    relevant = S.CDPruner(variant="paper", theta=0.95).select(view(hidden, [3], text=text))
    official = S.CDPruner().select(view(hidden, [3], text=text))  # kernel r S r of the negated relevance
    assert not torch.equal(diverse, relevant) and not torch.equal(diverse, official)


def test_cdpruner_in_the_model_is_batch_independent(model, inputs):
    """Sample 1's kept patches are the same alone, in the batch, and with its batch-mates reordered."""
    method = st3.get("cdpruner", keep=9)

    def kept(batch_inputs, sample):
        with torch.no_grad(), method(model):
            model(**batch_inputs)
        positions = method.trace.prefill_visual_positions[0][sample]
        ids = batch_inputs["input_ids"][sample]
        first = int((ids == model.config.image_token_id).nonzero().min())
        return (positions - first).tolist()

    order = torch.tensor([2, 1, 0])
    swapped = {k: v[order] for k, v in inputs.items()}
    assert kept(inputs, 1) == kept(single(inputs, 1), 0) == kept(swapped, 1)


#: Methods whose schedule cannot average 192 of 576 visual tokens per layer through the budget knob, and why.
OUT_OF_REACH = {"sgl": "one pruning layer at int(0.4 x 32) = 12: keep=0 still averages 216 of 576 per layer"}


@pytest.mark.parametrize("name", st3.methods())
def test_every_registered_method_and_composition_matches_a_budget(name):
    step = 576 / 32 if name == "vtw" else 8.0  # VTW's average moves a whole layer's tokens at a time
    if name in OUT_OF_REACH:
        with pytest.raises(st3.budget.OutOfReach, match="the closest is 216"):
            st3.match(name, 192, tolerance=step)
        return
    matched = st3.match(name, 192, tolerance=step)
    assert type(matched) is type(st3.get(name))


def test_a_selector_composes_with_every_selectable_schedule():
    for schedule in (st3.ST3, st3.FastV, st3.PyramidDrop, st3.Random, st3.Keep):
        method = schedule(selector="divprune")
        assert isinstance(method.selector, S.DivPrune)
    with pytest.raises(ValueError, match="selector"):
        st3.VTW(selector=S.DART())
    with pytest.raises(ValueError, match="decode"):
        st3.ST3(decode=st3.VTA())
    with pytest.raises(ValueError, match="evict"):
        st3.VTA(evict="oldest")
    assert st3.get("fastv+vta").knobs()["decode"]["evict"] == "current"


def test_dpp_greedy_fills_budgets_above_the_kernel_rank():
    torch.manual_seed(5)
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    kept = dpp_greedy(x @ x.transpose(1, 2), torch.ones(2, 20, dtype=torch.bool), torch.tensor([12, 7]))
    assert kept.sum(-1).tolist() == [12, 7]


def test_dart_choice_does_not_flip_under_tiny_noise():
    """Keys with one norm (Qwen3's k_norm) and 1e-7 noise, as eager vs sdpa or padded vs alone give: the kept
    set must not move (it did before scores were rounded: pivots went to whichever noise was largest)."""
    torch.manual_seed(3)
    hidden = torch.randn(1, 24, 8)
    keys = torch.nn.functional.normalize(torch.randn(1, 2, 24, 4), dim=-1)
    for variant in ("official", "union"):
        chosen = set()
        for seed in range(6):
            noise = torch.Generator().manual_seed(seed)
            jitter = 1e-7 * torch.randn(keys.shape, generator=noise)
            kept = S.DART(pivots=3, variant=variant).select(
                view(hidden + 1e-7 * torch.randn(hidden.shape, generator=noise), [8], keys + jitter))  # fmt: skip
            chosen.add(tuple(kept[0].nonzero().squeeze(-1).tolist()))
        assert len(chosen) == 1, variant
    assert {0, 1, 2} <= set(next(iter(chosen)))  # equal L2 norms (union): the pivots are the first positions


def grid_view(features: torch.Tensor, keep: int, side: int) -> View:
    from st3.adapters.base import Grid

    v = view(features, [keep])
    v.grids = [[Grid(1, side, side)]]
    return v


def test_stratified_blocks_tile_the_grid_one_kept_token_each():
    from st3.selectors.layout import lattice_blocks

    blocks = lattice_blocks(18, 18, 36)
    assert sorted(set(blocks)) == list(range(36))
    assert all(blocks.count(b) == 9 for b in range(36))  # 3 x 3 patches each
    assert blocks[0] == blocks[2 * 18 + 2] != blocks[3]  # a block is a rectangle
    assert sorted(set(lattice_blocks(18, 18, 71)) - {-1}) == list(range(71))
    kept = S.Stratified().select(grid_view(torch.randn(1, 324, 16), 36, 18))
    labels = torch.tensor(blocks)
    assert kept.sum() == 36 and sorted(labels[kept[0]].tolist()) == list(range(36))


def test_stratified_keeps_the_object_a_lattice_misses():
    """Objects centred between lattice points: the regular lattice keeps none of them, the salient spread each."""
    from st3.selectors.layout import lattice

    torch.manual_seed(0)
    background = torch.randn(16)
    features = background + 0.05 * torch.randn(1, 324, 16)
    objects = [r * 18 + c for r in (2, 8, 14) for c in (2, 8, 14)]  # one per 6 x 6 cell, off the lattice
    for i, patch in enumerate(objects):
        features[0, patch] = torch.randn(16) + 3.0 * (i % 2)
    assert not set(objects) & set(lattice(18, 18, 36))
    for within in ("salient", "diverse"):
        kept = S.Stratified(within=within).select(grid_view(features, 36, 18))
        assert set(objects) <= set(kept[0].nonzero().squeeze(-1).tolist()), within
        assert kept.sum() == 36


def test_stratified_jitter_is_one_seeded_token_per_block_and_refuses_unknown_rules():
    kept = [S.Stratified(within="jitter", seed=s).select(grid_view(torch.randn(1, 36, 4), 4, 6)) for s in (0, 0, 1)]
    assert torch.equal(kept[0], kept[1]) and kept[0].sum() == 4
    quadrants = [(p // 6 // 3) * 2 + (p % 6) // 3 for p in kept[0][0].nonzero().squeeze(-1).tolist()]
    assert sorted(quadrants) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="within"):
        S.Stratified(within="centre")


def test_stratified_without_a_grid_cuts_prompt_order_into_runs():
    from st3.selectors.layout import strata

    assert strata(None, 10, 3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    kept = S.Stratified().select(view(torch.randn(2, 12, 4), [3, 4]))
    assert kept.sum(-1).tolist() == [3, 4]


def scene_features(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """An 18 x 18 grid of near-identical background features with nine distinct objects, one per 6 x 6 cell,
    each 2 x 2 patches centred between lattice points; returns the features and the objects' patches."""
    torch.manual_seed(seed)
    features = torch.randn(16) + 0.05 * torch.randn(1, 324, 16)
    objects = []
    for i, (r, c) in enumerate((r, c) for r in (2, 8, 14) for c in (2, 8, 14)):
        colour = torch.randn(16) + 3.0 * (i % 2)
        for patch in (r * 18 + c, r * 18 + c + 1, (r + 1) * 18 + c, (r + 1) * 18 + c + 1):
            features[0, patch] = colour + 0.05 * torch.randn(16)
            objects.append(patch)
    return features, objects


def cells(patches: list[int]) -> set[tuple[int, int]]:
    return {(p // 18 // 6, p % 18 // 6) for p in patches}


def test_spread_sees_every_object_and_every_region():
    """At 36 tokens of 324, Spread keeps a token of each of nine objects and tokens in every 6 x 6 cell;
    features alone (DivPrune) leave cells unseen, space alone (the lattice) misses every object."""
    from st3.selectors.layout import lattice

    features, objects = scene_features()
    kept = S.Spread().select(grid_view(features, 36, 18))[0].nonzero().squeeze(-1).tolist()
    assert len(kept) == 36
    assert cells(set(kept) & set(objects)) == cells(objects)  # every object has a kept patch
    assert len(set(kept) & set(objects)) < 36 // 2  # and the rest of the budget goes elsewhere
    corners = {(r, c) for r in range(0, 18, 3) for c in range(0, 18, 3)}
    blocks = {(p // 18 // 3 * 3, p % 18 // 3 * 3) for p in kept}
    assert len(blocks) >= 0.75 * len(corners)  # spread over the 3 x 3-patch blocks of the grid
    divprune = S.DivPrune().select(view(features, [36]))[0].nonzero().squeeze(-1).tolist()
    assert len({(p // 18 // 3, p % 18 // 3) for p in divprune}) < len(blocks)
    assert not set(objects) & set(lattice(18, 18, 36))


def test_spread_without_the_space_term_is_divprune():
    features = torch.randn(1, 49, 8)
    for keep in (1, 5, 20):
        spread = S.Spread(spatial=0.0).select(grid_view(features, keep, 7))
        assert torch.equal(spread, S.DivPrune().select(view(features, [keep]))), keep


def test_spread_shares_the_budget_among_images_and_frames_and_ignores_batch_mates():
    from st3.adapters.base import Grid

    torch.manual_seed(3)
    features = torch.randn(2, 40, 8)
    both = view(features, [10, 7])
    both.grids = [[Grid(1, 4, 4), Grid(2, 3, 4)], [Grid(1, 5, 8)]]  # 16 + 24 tokens; one image of 40
    kept = S.Spread().select(both)
    assert kept[0, :16].sum() == 4 and kept[0, 16:28].sum() == 3 and kept[0, 28:].sum() == 3
    assert kept[1].sum() == 7
    for b in range(2):
        alone = view(features[b : b + 1], [[10, 7][b]])
        alone.grids = [both.grids[b]]
        assert torch.equal(S.Spread().select(alone)[0], kept[b])


def test_spread_without_a_grid_spreads_along_prompt_order_and_refuses_bad_knobs():
    features = torch.ones(1, 12, 4)  # identical features: only the position separates them
    kept = S.Spread().select(view(features, [3]))[0].nonzero().squeeze(-1).tolist()
    assert kept == [0, 6, 11] or kept == [0, 5, 11]
    with pytest.raises(ValueError, match="spatial"):
        S.Spread(spatial=-1.0)
    with pytest.raises(ValueError, match="features"):
        S.Spread(features="pixels")


# ------------------------------------------------------------------------------ every registered selector
#: (rows, cols, text rows after the image) per sample: a left-padded batch of three with grids of their own.
SAMPLES = ((4, 4, 3), (4, 6, 2), (6, 6, 5))


def synthetic_view(samples, keep: list[int], decoding: bool = False, seed: int = 0) -> View:
    """A left-padded batch whose every read is a function of the sample's own rows (so batch-mates cannot
    matter): features, keys, attention (rows' mean of a fixed score), accumulated attention, text and grids."""
    from st3.adapters import Grid

    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randn(r * c + t, 8, generator=generator) for r, c, t in samples]
    width = max(len(x) for x in rows)
    hidden = torch.zeros(len(rows), width, 8)
    candidates = torch.zeros(len(rows), width, dtype=torch.bool)
    text = torch.zeros_like(candidates)
    for b, ((_, _, t), x) in enumerate(zip(samples, rows)):
        hidden[b, width - len(x) :] = x
        candidates[b, width - len(x) : width - t] = True
        text[b, width - t :] = True
    valid = candidates | text
    received = hidden[..., 1].softmax(-1)

    def attention(query=None):
        return torch.where(valid, hidden[..., 0].exp(), 0.0)

    return View(
        layer=1, candidates=candidates, keep=torch.tensor(keep), attention=attention,
        hidden=(lambda: None) if decoding else (lambda: hidden), keys=lambda: hidden[:, None, :, :4],
        text=(lambda: None) if decoding else (lambda: text), valid=valid,
        received=received, decoding=decoding, grids=[[Grid(1, r, c)] for r, c, _ in samples],
    )  # fmt: skip


@pytest.mark.parametrize("name", st3.selectors.names())
def test_every_selector_keeps_exactly_its_budget_and_everything_at_full_budget(name):
    rule = st3.selectors.get(name)
    decoding = "received" in rule.reads
    keep = [5, 9, 40]  # the last above its sample's 36 candidates: all of them
    view = synthetic_view(SAMPLES, keep, decoding)
    kept = rule.select(view) & view.candidates
    assert kept.sum(-1).tolist() == [min(k, n) for k, n in zip(keep, view.candidates.sum(-1).tolist())]
    assert torch.equal(kept[2], view.candidates[2])


@pytest.mark.parametrize("name", st3.selectors.names())
def test_every_selector_is_independent_of_its_batch_mates(name):
    """A sample's choice is the same alone (no padding) and between other samples."""
    rule = st3.selectors.get(name)
    decoding = "received" in rule.reads
    batch = synthetic_view(SAMPLES, [5, 9, 13], decoding)
    chosen = rule.select(batch) & batch.candidates
    for b in range(len(SAMPLES)):
        width = int(batch.valid[b].sum())
        alone = View(
            layer=1, candidates=batch.candidates[b : b + 1, -width:], keep=batch.keep[b : b + 1],
            attention=lambda query=None, b=b, width=width: batch.attention(query)[b : b + 1, -width:],
            hidden=(lambda: None) if decoding else (lambda b=b, width=width: batch.hidden()[b : b + 1, -width:]),
            keys=lambda b=b, width=width: batch.keys()[b : b + 1, :, -width:],
            text=(lambda: None) if decoding else (lambda b=b, width=width: batch.text()[b : b + 1, -width:]),
            valid=batch.valid[b : b + 1, -width:], received=batch.received[b : b + 1, -width:],
            decoding=decoding, grids=batch.grids[b : b + 1],
        )  # fmt: skip
        assert torch.equal((rule.select(alone) & alone.candidates)[0], chosen[b, -width:]), b


def test_every_selector_runs_in_the_family_matrix():
    """Each registered selector is some case's rule (tests/cases.py adds one where none is), so it goes through
    the masked reference, batch == one by one and eager == sdpa on every family."""
    from cases import CASES, SELECTORS

    assert sorted(SELECTORS) == st3.selectors.names()
    for name, case in SELECTORS.items():
        method = CASES[case]()
        assert name in {method.rule.name, method.eviction_rule.name}, (name, case)
