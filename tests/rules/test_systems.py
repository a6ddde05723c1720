"""st3's FasterVLM and VTC-CLS choose what the authors' released code chose (tests/fixtures/systems/, issue 34),
and the LLaVA adapter's [CLS] saliency is the tower's own attention, at one layer or summed over several."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import st3
from st3.accounting import Shape, prefill_flops
from st3.adapters import adapter_for
from st3.adapters.llava import cls_saliency
from st3.methods.sgl import aggregate
from st3.models import ModelSpec, llava_config
from st3.plan import plan
from st3.selectors import SparseVLM as SparseVLMRule
from st3.selectors import View
from st3.selectors.base import quantised, top_k_mask
from st3.selectors.sparsevlm import dpc_knn, raters, recycle, recycled_counts
from st3.testing import IMAGE_TOKEN, PAD_TOKEN, tiny_inputs, tiny_llava, tiny_qwen_inputs, tiny_qwen_vl

HERE = Path(__file__).parents[1] / "fixtures" / "systems"
# Loaded under a name of its own: the peer fixtures' module is also called `inputs` (tests/fixtures/peers).
_SPEC = importlib.util.spec_from_file_location("systems_inputs", HERE / "inputs.py")
inputs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(inputs)

FEATURE_LAYER = 22  # LLaVA-1.5's hidden_states[-2]: the output of encoder layer 22 of CLIP-L's 24


def _fixture(name: str) -> dict:
    data = json.loads((HERE / f"{name}.json").read_text())
    attention = inputs.cls_attention(data["inputs"]["seed"], images=data["inputs"]["images"])
    assert inputs.checksum(attention) == data["inputs"]["checksum"], "inputs no longer rebuild as recorded"
    return data | {"attention": attention}


def _layer_rows(attention: torch.Tensor, layers) -> list[torch.Tensor]:
    """Per layer, the [CLS] row over the patches with heads averaged: [images, P] each."""
    return [attention[:, layer, :, 1:].mean(1) for layer in layers]


def _kept(method: st3.Method, saliency: torch.Tensor) -> list[list[int]]:
    features = torch.zeros(*saliency.shape, 3)
    keep, rewritten, out = method.compress(saliency, features, features)
    assert not rewritten.any() and out is features  # nothing merged: the kept patches go through as they are
    return [row.nonzero().squeeze(-1).tolist() for row in keep]


def test_fastervlm_keeps_the_official_patches():
    data = _fixture("fastervlm")
    (saliency,) = _layer_rows(data["attention"], [FEATURE_LAYER])
    expected = torch.tensor(data["scores_head_mean"]["values"])
    torch.testing.assert_close(saliency[data["scores_head_mean"]["image"]], expected, rtol=1e-5, atol=1e-9)
    for case in data["cases"]:
        kept = _kept(st3.FasterVLM(keep=case["visual_token_num"]), saliency)
        assert kept[case["image"]] == case["kept"], case["visual_token_num"]


def test_vtccls_keeps_the_official_patches():
    data = _fixture("vtccls")
    for case in data["cases"]:
        saliency = cls_saliency(_layer_rows(data["attention"], range(case["layer"], FEATURE_LAYER + 1)))
        method = st3.VTCCLS(keep=case["token_num"], start=case["layer"] - 24)  # the same layer, from the end
        assert _kept(method, saliency)[case["image"]] == case["kept"], (case["layer"], case["token_num"])
    for layer, values in data["scores_layer_sum"]["values"].items():
        saliency = cls_saliency(_layer_rows(data["attention"], range(int(layer), FEATURE_LAYER + 1)))
        torch.testing.assert_close(saliency[0], torch.tensor(values), rtol=1e-5, atol=1e-9)


def test_vtccls_from_the_feature_layer_is_fastervlm():
    data = _fixture("vtccls")
    (saliency,) = _layer_rows(data["attention"], [FEATURE_LAYER])
    assert _kept(st3.VTCCLS(keep=64, start=FEATURE_LAYER), saliency) == _kept(st3.FasterVLM(keep=64), saliency)


def _deep_tower_llava() -> LlavaForConditionalGeneration:
    """The tiny LLaVA with a 4-layer tower (feature layer 2), eager, so the tower returns its attention maps."""
    spec = ModelSpec(
        "tiny-llava", 64, 2, 4, 2, 128, 128, 48, patch_size=8, vision_hidden=32, vision_layers=4, vision_heads=2,
        vision_intermediate=64, feature_layer=-2, max_positions=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(spec, image_token=IMAGE_TOKEN, pad_token=PAD_TOKEN)).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize(("start", "layers"), [(None, [2]), (1, [1, 2]), (-4, [0, 1, 2]), (-2, [2])])
@torch.no_grad()
def test_adapter_saliency_is_the_towers_cls_attention(start, layers):
    model = _deep_tower_llava()
    adapter = adapter_for(model)
    assert list(adapter.saliency_layers(start)) == layers
    pixels = tiny_inputs(model)["pixel_values"]
    store: dict = {}
    hooks = adapter.capture_vision(store, start)
    try:
        out = model.model.vision_tower(pixels, output_attentions=True)
        model.model.multi_modal_projector(out.last_hidden_state)  # the projector's input is captured too
    finally:
        for hook in hooks:
            hook.remove()
    saliency, _, _ = adapter.vision_saliency(store)
    expected = cls_saliency(_layer_rows(torch.stack(out.attentions, 1)[:, :, :, 0], layers))
    torch.testing.assert_close(saliency, expected, rtol=1e-5, atol=1e-7)


def test_vtccls_start_after_the_feature_layer_is_refused():
    model = _deep_tower_llava()
    with pytest.raises(ValueError, match="^start: 3 is beyond the vision tower's feature layer \\(2 of 4 layers\\)"):
        st3.VTCCLS(keep=4, start=3)(model)


@pytest.mark.parametrize("method", [st3.FasterVLM(keep=8), st3.VTCCLS(keep=8)])
def test_cls_rankers_are_refused_without_a_cls_token(method):
    model = tiny_qwen_vl("qwen2-vl", layers=2)
    with pytest.raises(ValueError, match=r"no \[CLS\] token to rank patches by\. Use a method that prunes inside"):
        method(model)


def test_cls_rankers_validate_keep():
    for cls in (st3.FasterVLM, st3.VTCCLS):
        with pytest.raises(ValueError, match="^keep: must be >= 0"):
            cls(keep=-1)


# ---------------------------------------------------------------------------------------------- SparseVLM
def _sparsevlm_run(data: dict, run: dict, decoder: inputs.ToyDecoder, embeds: torch.Tensor):
    """Replay an official run on the toy decoder with st3's rule choosing and st3's recycling merging at each
    pruning layer; the rows entering the next layer are the official order (its kept tokens, then the merged
    tokens, then the text), the merged ones st3's own. Yields (step, st3's kept ids, its scores, its raters, its
    clusters: [(id, member ids)] in order)."""
    prefix, visual = data["inputs"]["prefix"], data["inputs"]["visual"]
    ids: list = [None] * prefix + list(range(visual)) + [None] * data["inputs"]["text"]
    columns = list(range(len(ids)))  # merged rows get -1: they have no column of the prompt
    prompt_visual = torch.tensor([isinstance(i, int) for i in ids])[None]
    prompt = (embeds, prompt_visual, torch.ones_like(prompt_visual))
    steps = {int(step["layer"]): step for step in run["steps"]}
    hidden = embeds
    for layer in range(max(steps) + 1):
        out, attention = decoder(layer, hidden)
        step = steps.get(layer)
        if step is not None:
            candidates = torch.tensor([i is not None for i in ids])[None]
            probs = attention[0].mean(0)  # [S, S], heads averaged

            def received(query, probs=probs):
                return probs[query[0]].mean(0)[None]

            view = View(
                layer=layer + 1, candidates=candidates, keep=torch.tensor([len(step["kept"])]), attention=received,
                hidden=lambda h=out: h, keys=lambda: None, valid=torch.ones_like(candidates),
                columns=torch.tensor(columns)[None], prompt=lambda: prompt,
            )  # fmt: skip
            rule = SparseVLMRule()
            kept = rule.select(view)
            chosen = raters(view)[0]
            merged, members = recycle(out, rule.score(view), candidates & ~kept)
            names = [f"m{layer}.{c}" for c in range(members.shape[1])]
            clusters = [(n, [ids[s] for s in m.nonzero().squeeze(-1).tolist()]) for n, m in zip(names, members[0])]
            kept_ids = [ids[s] for s in kept[0].nonzero().squeeze(-1).tolist()]
            yield step, kept_ids, probs[chosen].mean(0), chosen, clusters
            rows = [s for s, i in enumerate(ids) if i is None and s < prefix]
            rows += [s for s in kept[0].nonzero().squeeze(-1).tolist()]
            text = [s for s, i in enumerate(ids) if i is None and s >= prefix]
            hidden = torch.cat([out[0, rows], merged[0], out[0, text]])[None]
            ids = [ids[s] for s in rows] + names + [None] * len(text)
            columns = [columns[s] for s in rows] + [-1] * len(names) + [columns[s] for s in text]
        else:
            hidden = out


@pytest.mark.parametrize("retain", ["192", "128", "96", "64"])
def test_sparsevlm_chooses_and_recycles_the_official_tokens_at_every_pruning_layer(retain):
    """On the fixture's toy decoder, at every pruning layer of the four v1.5 runs, st3 picks the official raters,
    keeps the official tokens with the official scores, and recycles them as the official: the same clusters (ids
    of members, earlier merged tokens included) in the same order, whose means are the rows that go on (so the
    next layer's choice is checked on st3's own merged rows)."""
    data = json.loads((HERE / "sparsevlm.json").read_text())
    seed = data["inputs"]["seed"]
    embeds, decoder = inputs.sparsevlm_embeds(seed), inputs.ToyDecoder(seed)
    assert inputs.checksum(embeds) == data["inputs"]["checksum_embeds"], "inputs no longer rebuild as recorded"
    run = data["v1.5"]["runs"][retain]
    method = st3.SparseVLM(retain=int(retain), recycle=True)
    assert method.plan(32) == tuple((int(s["layer"]) + 1, len(s["kept"])) for s in run["steps"])  # the counts
    done = 0
    for step, kept, scores, chosen, clusters in _sparsevlm_run(data, run, decoder, embeds):
        text_start = len(chosen) - data["inputs"]["text"]  # the text rows are last, whatever left before them
        assert (chosen.nonzero().squeeze(-1) - text_start).tolist() == run["raters"]
        assert sorted(map(str, kept)) == sorted(map(str, step["kept"])), step["layer"]
        if "raters_attention_mean" in step:
            visual = scores[: len(step["raters_attention_mean"]) + data["inputs"]["prefix"]]
            official = torch.tensor(step["raters_attention_mean"])
            torch.testing.assert_close(visual[data["inputs"]["prefix"] :], official, rtol=1e-4, atol=1e-8)
        official = [(c["id"], sorted(map(str, c["members"]))) for c in step["clusters"]]
        assert [(name, sorted(map(str, members))) for name, members in clusters] == official, step["layer"]
        pruned = run["entering"][step["layer"]] - len(step["kept"])
        assert recycled_counts(pruned) == (len(step["recycled"]), len(step["clusters"]))
        done += 1
    assert done == 3
    # the visual tokens each layer computes on, the counts plus the merged rows, are what st3's planner predicts
    shape = Shape(num_layers=32, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4, head_dim=16)
    assert plan(method, shape, visual=576).prefill_visual == run["entering"]


def test_sparsevlm_knobs_are_checked():
    with pytest.raises(ValueError, match=r"^retain: must be one of \[64, 96, 128, 192\]"):
        st3.SparseVLM(retain=100)
    with pytest.raises(ValueError, match="^counts: layers must increase"):
        st3.Schedule(counts=((7, 100), (3, 200)))
    with pytest.raises(ValueError, match="^counts: must be \\(layer, count\\) pairs"):
        st3.Schedule(counts=((3, 100, 1),))
    with pytest.raises(ValueError, match="^counts: layers \\[9\\] are beyond the model's last layer \\(5\\)"):
        st3.Schedule(counts=((2, 10), (9, 5)))(tiny_llava())


def test_schedule_keeps_the_given_counts_scaled_and_capped():
    method = st3.Schedule(counts=((1, 30), (4, 10)), scale=0.5)
    visual = torch.tensor([36, 12])
    assert method.prefill_keep(1, 6, visual).tolist() == [15, 12]
    assert method.prefill_keep(4, 6, visual).tolist() == [5, 5]
    assert method.prefill_keep(2, 6, visual) is None
    assert st3.SparseVLM().plan(6) == ((1, 300), (2, 200), (3, 110))  # the default layers scaled, increasing


@torch.no_grad()
def test_sparsevlm_raters_in_the_engine_are_chosen_once_from_the_prompt():
    """In a real run the raters at every pruning layer are the same prompt columns, the ones chosen from the
    embeddings before the decoder (the view's own rows at layer 0), though visual rows left in between."""
    seen = []

    class Spy(SparseVLMRule):
        def select(self, view):
            chosen = raters(view)
            seen.append([view.columns[b][chosen[b]].tolist() for b in range(len(chosen))])
            if view.layer == 0:  # the fallback reads the rows themselves: before the decoder, the embeddings
                fallback = dataclasses.replace(view, prompt=lambda: None, columns=None)
                alone = raters(fallback)
                assert [view.columns[b][alone[b]].tolist() for b in range(len(alone))] == seen[-1]
            return super().select(view)

    model = tiny_llava()
    batch = tiny_inputs(model, ((4, 6), (2, 9)))
    with st3.Schedule(counts=((0, 30), (2, 20), (4, 10)), selector=Spy())(model):
        model(**batch)
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    assert all(len(columns) > 0 for columns in seen[0])  # every sample has raters


def test_sparsevlm_recycling_needs_its_raters_and_st3s_loop():
    """Recycling ranks the pruned tokens by the raters' scores (another selector is refused), and it merges rows
    inside the decoder, so the stock decoder never runs it (even where only layer 0 prunes)."""
    with pytest.raises(ValueError, match=r"^recycle: recycles by the raters' scores"):
        st3.SparseVLM(recycle=True, selector="divprune")
    early = ((0, 10),)
    assert st3.SparseVLM(counts=early).chooses_before_decoder(6)
    assert not st3.SparseVLM(counts=early, recycle=True).chooses_before_decoder(6)
    with pytest.raises(ValueError, match="prunes inside the decoder"):
        st3.SparseVLM(counts=early, recycle=True)(tiny_llava(), decoder="stock")


def test_dpc_knn_clusters_by_density_peaks():
    """Three tight groups far apart make three clusters (each group's densest row a centre: its nearest denser
    row is in another group); with one cluster every row joins it; `recycle` clusters the top 30 % (+1) of the
    pruned rows by score and a merged row is its members' mean (over a count + 1e-6, as the official)."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(n, 8) * 0.01 + offset for n, offset in ((5, 0.0), (4, 3.0), (3, -6.0))])
    groups = [g.tolist() for g in dpc_knn(x, 3)]
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert [g.tolist() for g in dpc_knn(x, 1)] == [list(range(12))]
    scores = torch.arange(12.0)[None]  # the last rows score highest
    pruned = torch.ones(1, 12, dtype=torch.bool)
    pruned[0, -1] = False  # kept
    merged, members = recycle(x[None], scores, pruned)  # 11 pruned: the top int(3.3) + 1 = 4 recycled, 1 cluster
    assert members.shape == (1, 1, 12) and members[0, 0].nonzero().squeeze(-1).tolist() == [7, 8, 9, 10]
    torch.testing.assert_close(merged[0, 0], x[7:11].sum(0) / (4 + 1e-6))


# ---------------------------------------------------------------------------------------------------- SGL
def _sgl_family(family: str):
    """(model, its batch of 3 left-padded samples with different visual token counts) of a tiny family."""
    if family == "llava":
        model = tiny_llava()
        return model, tiny_inputs(model, ((4, 6), (2, 9), (5, 3)))
    model = tiny_qwen_vl(family, layers=6)
    return model, tiny_qwen_inputs(model, ((3, 5, "image", (1, 8, 8)), (2, 7, "image", (1, 8, 12))))


@torch.no_grad()
def _guide_kept(guide, inputs: dict, keep: float) -> list[list[int]]:
    """SGL done by hand, one sample at a time from the guide's own eager attention maps: per sample, the columns of
    the floor(keep x n) visual tokens that received the most attention (summed over layers, heads and the rows
    from the last visual token on), in column order."""
    ids = inputs["input_ids"]
    out = guide(**inputs, output_attentions=True, use_cache=False)
    visual_ids = torch.tensor(adapter_for(guide).visual_token_ids())
    kept = []
    for b in range(ids.shape[0]):
        columns = torch.isin(ids[b], visual_ids).nonzero().squeeze(-1).tolist()
        scores = {c: 0.0 for c in columns}
        for layer in out.attentions:
            for c in columns:
                scores[c] += float(layer[b, :, columns[-1] :, c].double().sum())
        count = math.floor(len(columns) * keep + 1e-9)
        kept.append(sorted(sorted(columns, key=lambda c: -scores[c])[:count]))
    return kept


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_sgl_keeps_the_guides_top_tokens_and_equals_the_masked_reference(family):
    """The kept set is the one the guide's own attention maps give, and the run equals the unpruned model masked
    to it (the same `reference_logits` as the family matrix, where batch == alone and eager == sdpa are proven)."""
    from cases import generate, guide_for, new_tokens
    from reference import reference_logits

    model, batch = _sgl_family(family)
    guide = guide_for(model)
    method = st3.SGL(guide=guide, layer=2, keep=0.4, record_positions=True)
    out = generate(model, batch, method)
    trace = method.trace
    expected = _guide_kept(guide, batch, 0.4)
    assert [p.tolist() for p in trace.prefill_visual_positions[2]] == expected
    assert [p.tolist() for p in trace.prefill_visual_positions[1]] != expected  # layers before `layer` hold all
    with torch.no_grad():
        reference = reference_logits(model, batch, trace, new_tokens(out, batch)[:, :-1], method)
    start = batch["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)


def test_sgl_runs_its_guide_without_autograd_and_counts_its_flops():
    from cases import guide_for

    model = tiny_llava()
    batch = tiny_inputs(model, ((4, 6), (2, 9)))
    guide = guide_for(model)
    grad = []
    hook = guide.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    method = st3.SGL(guide=guide, layer=2, keep=0.5)
    try:
        with method(model):
            model(**batch)  # autograd on for the model's own forward
    finally:
        hook.remove()
    assert grad == [False]  # the guide ran once, under no_grad
    shape = adapter_for(guide).shape
    want = sum(prefill_flops(shape, [n] * shape.num_layers) for n in batch["attention_mask"].sum(-1).tolist())
    flops = method.trace.flops()
    assert flops["guide"] == want > 0
    assert flops["prefill"] < flops["prefill_unpruned"]  # the decoder's own counts, as the planner predicts them


def test_sgl_loads_a_guide_named_by_its_checkpoint_once(tmp_path):
    """`guide=PATH` (as `-m sgl:guide=PATH` gives it) keeps what the same guide as a module keeps, loaded once."""
    from cases import guide_for

    model = tiny_llava()
    batch = tiny_inputs(model, ((4, 6), (2, 9)))
    guide = guide_for(model)
    guide.save_pretrained(tmp_path)
    by_module = st3.SGL(guide=guide, layer=2, keep=0.5)
    by_path = st3.get("sgl", guide=str(tmp_path), layer=2, keep=0.5)
    for method in (by_module, by_path, by_path):
        with method(model):
            model(**batch)
    assert [p.tolist() for p in by_path.trace.prefill_visual_positions[2]] == [
        p.tolist() for p in by_module.trace.prefill_visual_positions[2]
    ]
    assert len(by_path._loaded) == 1 and by_path.knobs()["guide"] == str(tmp_path)
    with pytest.raises(ValueError, match="^guide: cannot load a LlavaForConditionalGeneration from"):
        st3.SGL(guide=str(tmp_path / "missing"), layer=2)(model)


def _llava_guide(**change):
    """A 2-layer eager LLaVA guide whose config differs from tiny_llava's by `change` (vision_config.x: the tower's)."""
    from cases import guide_for

    config = copy.deepcopy(guide_for(tiny_llava()).config)
    for key, value in change.items():
        owner, _, name = key.rpartition(".")
        setattr(getattr(config, owner) if owner else config, name, value)
    torch.manual_seed(0)
    guide = LlavaForConditionalGeneration(config).eval()
    guide.set_attn_implementation("eager")
    return guide


@pytest.mark.parametrize(
    ("guide", "message"),
    [
        (lambda: None, r"guide: SGL ranks the visual tokens by a small model's attention; pass st3\.SGL\(guide="),
        (lambda: tiny_qwen_vl("qwen2-vl", layers=2, attn="eager"), r"guide: Qwen2VL\w+ is not of the model's family"),
        (lambda: _llava_guide(image_token_id=IMAGE_TOKEN + 1), r"guide: its visual token ids \[\d+\] differ from"),
        (lambda: _llava_guide(**{"vision_config.image_size": 64}), r"guide: its images become other visual tokens "
         r"\(count or grid\) than the model's: vision_config\.image_size 64 vs 48"),
        (lambda: tiny_llava(layers=2), r"guide: SGL reads the guide's attention maps, which 'sdpa' attention"),
        (lambda: lambda model: "a path", r"guide: the builder must return a model, got str"),
    ],
)  # fmt: skip
def test_sgl_refuses_a_guide_that_cannot_rank_the_models_tokens(guide, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        st3.SGL(guide=guide(), layer=2)(tiny_llava())


def test_sgl_aggregates_and_keeps_as_the_official_code():
    """On the fixture's guide maps, st3's sum over the prompt rows plus the rows of the guide's generated tokens (st3's
    guide generates none; added here) is the official importance, and the official kept sets follow from it with
    st3's count (floor(keep x V)) and layer (int(depth x prune_layer))."""
    data = json.loads((HERE / "sgl.json").read_text())
    seed, prefix, visual_count = data["inputs"]["seed"], data["inputs"]["prefix"], data["inputs"]["visual"]
    maps = tuple(inputs.sgl_prefill_attention(seed, layer) for layer in range(inputs.SGL_LAYERS))
    assert inputs.checksum(maps[0]) == data["inputs"]["checksums"]["prefill_layer0"], "inputs no longer rebuild"
    visual = torch.zeros(1, maps[0].shape[-1], dtype=torch.bool)
    visual[0, prefix : prefix + visual_count] = True
    prompt = aggregate(maps, visual, torch.ones_like(visual))[0, prefix : prefix + visual_count]
    answer = sum(
        inputs.sgl_decode_attention(seed, layer, step)[0, :, 0, prefix : prefix + visual_count].sum(0)
        for layer in range(inputs.SGL_LAYERS)
        for step in range(inputs.SGL_STEPS)
    )
    importance = torch.tensor(data["importance"])
    torch.testing.assert_close(prompt + answer, importance, rtol=1e-5, atol=1e-6)
    everything = torch.ones(1, visual_count, dtype=torch.bool)
    for case in data["cases"]:
        layer = int(case["large_layers"] * case["prune_layer"])
        method = st3.SGL(layer=layer, keep=case["ratio"])
        assert layer == case["K"]
        if case["prune_layer"] == 0.4:  # the shipped script's, st3's default
            assert st3.SGL().pruning_layer(case["large_layers"]) == case["K"]
        count = method.prefill_keep(layer, case["large_layers"], torch.tensor([visual_count]))
        assert count.tolist() == [case["kept_count"]]
        kept = top_k_mask(quantised((prompt + answer)[None]), everything, count)[0]
        assert kept.nonzero().squeeze(-1).tolist() == case["kept"], case


@torch.no_grad()
def test_sgl_ranks_each_sample_once_under_beams_and_leaves_the_model_as_it_was():
    """generate() encodes the images once per sample and then copies each sample per beam: the guide sees the images
    and the samples once, and every beam of a sample keeps the tokens the sample keeps alone."""
    from cases import guide_for

    model = tiny_llava()
    batch = tiny_inputs(model, ((4, 6), (2, 9)))
    method = st3.SGL(guide=guide_for(model), layer=2, keep=0.5)
    before = set(model.__dict__) | set(model.model.__dict__)
    with method(model):
        model.generate(**batch, max_new_tokens=2, num_beams=2, do_sample=False)
        beams = [p.tolist() for p in method.trace.prefill_visual_positions[2]]
        guide_flops = method.trace.flops()["guide"]
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        greedy = [p.tolist() for p in method.trace.prefill_visual_positions[2]]
    assert beams == [greedy[0], greedy[0], greedy[1], greedy[1]]
    assert guide_flops == method.trace.flops()["guide"]  # one guide forward per sample, beams or not
    assert set(model.__dict__) | set(model.model.__dict__) == before  # the encoders' recorders are gone
