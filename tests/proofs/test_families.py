"""Every model family x every method case (tests/cases.py): the correctness proofs, one row per family.

A family row names its adapter, whose tiny random model (sdpa and eager) and example batch of 3 (left-padded, visual
token counts that differ: images of different sizes, a video sample where the family has video) the proofs run on,
and says how to cut one sample out of the batch and which methods the family refuses. Adding a family is its adapter
file and one row in `FAMILIES` (`test_every_adapter_has_a_row_and_declares_its_facts` checks that nothing else is
needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from cases import CASES as METHODS
from cases import NEW_TOKENS, TINY, generate, new_tokens
from reference import attention_weights, full_positions, reference_logits, visual_token_ids

import st3
from st3.adapters import (
    ADAPTERS,
    Adapter,
    Gemma3Adapter,
    Idefics3Adapter,
    InternVLAdapter,
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Mistral3Adapter,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen25VLAdapter,
    UnsupportedModel,
    adapter_for,
)
from st3.compat import cache_kwargs as compat_cache
from st3.compat import cache_of
from st3.plan import plan
from st3.testing import tiny_llava

#: Each family's example batch (its adapter's `example_samples`; the comments there give the visual-token counts).
LLAVA_BATCH = LlavaAdapter.example_samples
QWEN_BATCH = Qwen2VLAdapter.example_samples
NEXT_BATCH = LlavaNextAdapter.example_samples
ONEVISION_BATCH = LlavaOnevisionAdapter.example_samples
INTERNVL_BATCH = InternVLAdapter.example_samples
IDEFICS3_BATCH = Idefics3Adapter.example_samples
MISTRAL3_BATCH = Mistral3Adapter.example_samples
GEMMA_BATCH = Gemma3Adapter.example_samples


def llava_single(inputs: dict, b: int) -> dict:
    keep = inputs["attention_mask"][b].bool()
    return {
        "input_ids": inputs["input_ids"][b : b + 1, keep],
        "attention_mask": inputs["attention_mask"][b : b + 1, keep],
        "pixel_values": inputs["pixel_values"][b : b + 1],
    }


def per_image_single(inputs: dict, b: int) -> dict:
    """Sample b without padding, with its own image (one per sample, every image tensor indexed by sample)."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask")}
    return out | {k: v[b : b + 1] for k, v in inputs.items() if k not in out}


def onevision_single(inputs: dict, b: int) -> dict:
    """Sample b without padding, with its own image (and `batch_num_images`) or video."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask")}
    kind = ONEVISION_BATCH[b][2]
    j = [sample[2] for sample in ONEVISION_BATCH[:b]].count(kind)
    if kind == "image":
        out |= {k: inputs[k][j : j + 1] for k in ("pixel_values", "image_sizes")}
        out["batch_num_images"] = torch.tensor([1])
    else:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][j : j + 1]
    return out


def internvl_single(inputs: dict, b: int) -> dict:
    """Sample b without padding, with its own tiles (pixel values hold one tile per row, samples in order)."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask")}
    start = sum(sum(sample[2]) for sample in INTERNVL_BATCH[:b])
    return out | {"pixel_values": inputs["pixel_values"][start : start + sum(INTERNVL_BATCH[b][2])]}


def gemma_single(inputs: dict, b: int) -> dict:
    """Sample b without padding, with its own images (GEMMA_BATCH's counts, in order)."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "token_type_ids")}
    start = sum(count for _, count, _ in GEMMA_BATCH[:b])
    out["pixel_values"] = inputs["pixel_values"][start : start + GEMMA_BATCH[b][1]]
    return out


def qwen_single(inputs: dict, b: int) -> dict:
    """Sample b without padding, with its own image or video (each sample of QWEN_BATCH has one)."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b : b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                             "video_grid_thw")):  # fmt: skip
        owners = [i for i, sample in enumerate(QWEN_BATCH) if sample[2] == kind]
        if b in owners:
            j = owners.index(b)
            sizes = inputs[grids].prod(-1)
            start = int(sizes[:j].sum())
            out[pixels] = inputs[pixels][start : start + int(sizes[j])]
            out[grids] = inputs[grids][j : j + 1]
    return out


@dataclass(frozen=True)
class Family:
    adapter: type[Adapter]
    single: Callable[[dict, int], dict]
    #: methods refused on this family, with a phrase of the error
    refused: tuple[tuple[str, str], ...] = ()
    #: the cases of this row in `make test` (None: EVERY_FAMILY); the rest of the row is `slow`
    fast: tuple[str, ...] | None = None
    #: options of the adapter's tiny model (e.g. another decoder)
    options: tuple[tuple[str, object], ...] = ()

    def build(self, attn: str) -> torch.nn.Module:
        return self.adapter.tiny(attn=attn, **dict(self.options))

    def inputs(self, model: torch.nn.Module) -> dict:
        return self.adapter.tiny_inputs(model)


#: The fast cases of the families added with issue 29 (keeping `make test` short): progressive pruning with
#: annealing, a layout-reading selector (tiles, newlines, frames) and the refusal of compression.
NEW_FAMILY_FAST = ("st3", "spread", "visionzip")


#: the registered methods that compress before the decoder from the vision tower (VisionZip, FasterVLM, VTC-CLS)
COMPRESSING = tuple(name for name in st3.methods() if st3.get(name).compresses_vision)


def compressing_refused(phrase: str) -> tuple[tuple[str, str], ...]:
    """Every compressing method refused on a family, each with the phrase of its error."""
    return tuple((name, phrase) for name in COMPRESSING)


QWEN_REFUSED = compressing_refused("no \\[CLS\\] token")
FAMILIES = {
    "llava": Family(LlavaAdapter, llava_single),
    "llava-qwen3": Family(LlavaAdapter, llava_single, options=(("text_model", "qwen3"), ("head_dim", 16))),
    "qwen2-vl": Family(Qwen2VLAdapter, qwen_single, QWEN_REFUSED, options=(("layers", 6),)),
    "qwen2.5-vl": Family(Qwen25VLAdapter, qwen_single, QWEN_REFUSED, options=(("layers", 6),)),
    "qwen3-vl": Family(Qwen3VLAdapter, qwen_single, QWEN_REFUSED, options=(("layers", 6),)),
    "llava-next": Family(LlavaNextAdapter, per_image_single, compressing_refused("LLaVA-NeXT"), NEW_FAMILY_FAST),
    "llava-onevision": Family(LlavaOnevisionAdapter, onevision_single, QWEN_REFUSED, NEW_FAMILY_FAST),
    "internvl": Family(InternVLAdapter, internvl_single, compressing_refused("pixel shuffle"), NEW_FAMILY_FAST),
    "idefics3": Family(Idefics3Adapter, per_image_single, QWEN_REFUSED, NEW_FAMILY_FAST),
    "smolvlm": Family(Idefics3Adapter, per_image_single, QWEN_REFUSED, ("st3",), options=(("smolvlm", True),)),
    "mistral3": Family(Mistral3Adapter, per_image_single, QWEN_REFUSED, NEW_FAMILY_FAST),
    "gemma3": Family(Gemma3Adapter, gemma_single, QWEN_REFUSED),
}

_MODELS: dict = {}


def models(family: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(sdpa model, eager model, inputs) of a family, built once per session."""
    if family not in _MODELS:
        row = FAMILIES[family]
        sdpa, eager = row.build("sdpa"), row.build("eager")
        _MODELS[family] = (sdpa, eager, row.inputs(sdpa))
    return _MODELS[family]


def applicable(family: str, name: str) -> None:
    """Skip-free refusal check: a refused method must raise its clear error, then the test ends."""
    registered = METHODS[name]().name  # a case of a refused method (e.g. `visionzip-paper`) is refused too
    for refused, phrase in FAMILIES[family].refused:
        if registered == refused:
            sdpa, _, inputs = models(family)
            with pytest.raises(ValueError, match=phrase):
                generate(sdpa, inputs, METHODS[name]())
            return False
    return True


#: The cases every family runs in `make test`: each mechanism once (progressive pruning with annealing, the mean
#: over query rows, a pre-decoder selector with a layout, key-norm pivots, accumulated attention, compression or
#: its refusal). The rest of the family x case product is marked `slow`: CI runs it (`make test-all`).
EVERY_FAMILY = ("st3", "st3-text-query", "fastv-all-rows", "spread", "dart", "st3+dart-accumulated", "visionzip")


def fast(family: str, name: str) -> bool:
    """Whether (family, case) runs in `make test`: LLaVA's whole row, and each row's fast cases."""
    return family == "llava" or name in (FAMILIES[family].fast or EVERY_FAMILY)


def matrix() -> list:
    """(family, case) for every family and case; slow beyond LLaVA's row and each row's fast cases."""
    slow = pytest.mark.slow
    return [pytest.param(f, m, marks=() if fast(f, m) else slow, id=f"{f}-{m}")
            for f in FAMILIES for m in sorted(METHODS)]  # fmt: skip


MATRIX = matrix()


# --------------------------------------------------------------------------------- a family is one file
@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.__name__)
def test_every_adapter_has_a_row_and_declares_its_facts(adapter):
    """Every adapter is a row here, and declares what tests, bench, plans and docs need: its tiny model (found by the
    registry), an example batch whose layout covers every visual token, a typical visual-token count and its README
    row. A new family is its adapter file plus its row; nothing else has to change."""
    rows = [name for name, row in FAMILIES.items() if row.adapter is adapter]
    assert rows, f"{adapter.__name__} has no row in FAMILIES"
    assert all(adapter.summary) and len(adapter.example_samples) == 3
    sdpa, _, inputs = models(rows[0])
    assert type(adapter_for(sdpa)) is adapter
    counts = adapter_for(sdpa).visual_mask(inputs["input_ids"]).sum(-1).tolist()
    method = st3.Lattice(keep=2, layer=1)
    generate(sdpa, inputs, method, max_new_tokens=1)
    assert [sum(grid.tokens for grid in grids) for grids in method.trace.image_grids] == counts
    assert len(set(counts)) == 3 or adapter.tokens_per_image is not Adapter.tokens_per_image  # fixed per image
    typical = adapter_for(sdpa).typical_visual_tokens()
    assert isinstance(typical, int) and typical > 0
    fixed = adapter_for(sdpa).tokens_per_image()
    assert fixed is None or fixed == typical


# ------------------------------------------------------------------------------------ pruning nothing
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_nothing_equals_the_original_model(family, attn):
    sdpa, eager, inputs = models(family)
    model = sdpa if attn == "sdpa" else eager
    noop = st3.ST3(ratio=0.0, anneal_final=1.0)
    original = generate(model, inputs)
    pruned = generate(model, inputs, noop)
    assert torch.equal(original.sequences, pruned.sequences)
    for a, b in zip(original.logits, pruned.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not noop.trace.pruned
    assert len(set(noop.trace.visual_tokens)) == 3 or family.startswith("llava")  # counts differ per sample


# ------------------------------------------------------------------------------- masked reference
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,name", MATRIX)
def test_pruned_run_equals_masked_reference(family, name, attn):
    if not applicable(family, name):
        return
    sdpa, eager, inputs = models(family)
    model = sdpa if attn == "sdpa" else eager
    method = METHODS[name]()
    method.record_positions = True
    out = generate(model, inputs, method)
    assert method.trace.pruned
    fed = new_tokens(out, inputs)[:, :-1]
    with torch.no_grad():
        reference = reference_logits(model, inputs, method.trace, fed, method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)
        assert torch.equal(reference[:, start + step].argmax(-1), new_tokens(out, inputs)[:, step])


@pytest.mark.parametrize(
    "family,name",
    [pytest.param(f, m, marks=() if fast(f, m) or FAMILIES[f].fast is None else pytest.mark.slow, id=f"{f}-{m}")
     for f in sorted(FAMILIES)
     for m in ("st3", "st3-text-query", "fastv", "fastv-all-rows", "pyramiddrop", "pyramiddrop-paper")],
)  # fmt: skip
def test_prefill_keeps_the_top_k_of_its_scoring_layers_attention(family, name):
    """The kept set at each pruning layer l is the top-k of the attention, heads averaged, at the layer before
    (FastV, ST3) or at layer l itself on the rows entering it (PyramidDrop's released scoring: the masked
    reference is then rerun with layer l still holding layer l-1's set, and its layer l attention read)."""
    model, _, inputs = models(family)
    method = METHODS[name]()
    with torch.no_grad(), method(model):
        model(**inputs)
    trace = method.trace
    positions = trace.prefill_visual_positions
    own = method.rule.scored_at == "own"
    with torch.no_grad():
        weights = attention_weights(model, inputs, trace)
    visual = torch.isin(inputs["input_ids"], torch.tensor(visual_token_ids(model.config)))
    checked = 0
    for layer in range(1, len(weights)):
        if all(len(positions[layer][b]) == len(positions[layer - 1][b]) for b in range(len(positions[layer]))):
            continue
        scoring = weights[layer - 1]
        if own:  # layer `layer` attending over the rows it received, before any of them left
            entering = SimpleNamespace(prefill_visual_positions=positions[:layer] + [positions[layer - 1]] * (
                len(positions) - layer))
            with torch.no_grad():
                scoring = attention_weights(model, inputs, entering)[layer]
        for b in range(inputs["input_ids"].shape[0]):
            before, after = positions[layer - 1][b], positions[layer][b]
            if len(after) == len(before):
                continue
            probs = scoring[b].mean(0)  # [rows, keys], mean over heads
            real = inputs["attention_mask"][b].bool()
            if method.rule.query == "last":
                score = probs[-1]
            elif method.rule.query == "all":
                score = probs[real].mean(0)
            else:
                rows = real & ~visual[b]
                rows[: int(visual[b].nonzero().max()) + 1] = False
                score = probs[rows].mean(0)
            expected = before[score[before].topk(len(after)).indices].sort().values
            assert torch.equal(after, expected)
            checked += 1
    assert checked > 0


# ----------------------------------------------------------------------------- batches and backends
@pytest.mark.parametrize("family,name", MATRIX)
def test_a_padded_batch_equals_its_samples_one_by_one(family, name):
    if not applicable(family, name):
        return
    model, _, inputs = models(family)
    method = METHODS[name]()
    batch = generate(model, inputs, method)
    batch_trace = method.trace
    width = inputs["input_ids"].shape[1]
    for b in range(3):
        alone_inputs = FAMILIES[family].single(inputs, b)
        alone = generate(model, alone_inputs, method)
        pad = width - alone_inputs["input_ids"].shape[1]
        assert torch.equal(new_tokens(batch, inputs)[b], new_tokens(alone, alone_inputs)[0])
        for a, c in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[b], c[0], atol=1e-4, rtol=0)
        for layer, positions in enumerate(method.trace.prefill_visual_positions):
            assert torch.equal(batch_trace.prefill_visual_positions[layer][b] - pad, positions[0])


@pytest.mark.parametrize("family,name", MATRIX)
def test_eager_and_sdpa_agree(family, name):
    if not applicable(family, name):
        return
    sdpa, eager, inputs = models(family)
    a, b = generate(sdpa, inputs, METHODS[name]()), generate(eager, inputs, METHODS[name]())
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- merged rows (recycling)
#: Families whose decoders cannot hold merged rows, with a phrase of the refusal (the engine's `_check_merging`).
RECYCLING_REFUSED = {"qwen2-vl": "M-RoPE", "qwen2.5-vl": "M-RoPE", "qwen3-vl": "M-RoPE", "gemma3": "image blocks"}


#: Merged rows per sample entering layer 1 (`recycling`): two clusters on LLaVA (36 tokens each), one or two on
#: LLaVA-NeXT (30, 37, 51 tokens: filler rows in the batch).
MERGED_PER_SAMPLE = {"llava": {2}, "llava-next": {1, 2}}


def recycling() -> st3.SparseVLM:
    """SparseVLM with recycling, pruning enough on the tiny models that samples merge 1 or 2 rows (fillers)."""
    return st3.SparseVLM(recycle=True, counts=((1, 6), (3, 3)), record_positions=True)


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f == "llava" else pytest.mark.slow) for f in sorted(FAMILIES)]
)
def test_sparsevlm_recycling_equals_its_reference(family):
    """SparseVLM's merged rows: the run equals the layer-by-layer reference that inserts them (eager and sdpa),
    a padded batch equals its samples one by one (merged ids included), and merging changes the answer's logits;
    families whose rows need more than a 1-D position and a causal slot refuse it, saying why."""
    sdpa, eager, inputs = models(family)
    if family in RECYCLING_REFUSED:
        with pytest.raises(ValueError, match=f"merges pruned visual tokens .*{RECYCLING_REFUSED[family]}"):
            generate(sdpa, inputs, recycling())
        return
    start = inputs["input_ids"].shape[1] - 1
    runs = []
    for model in (sdpa, eager):
        method = recycling()
        out = generate(model, inputs, method)
        merged = method.trace.merged
        assert sorted(merged) == [1, 3]
        sizes = {len(rows) for rows in merged[1]}  # merged rows per sample entering layer 1
        assert sizes == MERGED_PER_SAMPLE.get(family, sizes)
        if family == "llava":  # 36 visual tokens per sample, so the planner's sample is each of them
            assert method.trace.visual_per_layer == plan(method, TINY, visual=36).prefill_visual
        fed = new_tokens(out, inputs)[:, :-1]
        reference = reference_logits(model, inputs, method.trace, fed, method)
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)
        runs.append((out, method.trace))
    (out, trace), (eager_out, _) = runs
    assert torch.equal(out.sequences, eager_out.sequences)
    plain = generate(sdpa, inputs, dataclasses.replace(recycling(), recycle=False))
    assert not torch.allclose(plain.logits[0], out.logits[0], atol=1e-3)  # the merged rows count
    for b in range(3):
        single = FAMILIES[family].single(inputs, b)
        method = recycling()
        alone = generate(sdpa, single, method)
        assert torch.equal(new_tokens(out, inputs)[b], new_tokens(alone, single)[0])
        for x, y in zip(out.logits, alone.logits):
            torch.testing.assert_close(x[b], y[0], atol=1e-4, rtol=0)
        pad = inputs["input_ids"].shape[1] - single["input_ids"].shape[1]
        unpadded = {layer: {i: [c - pad if c >= 0 else c for c in members] for i, members in rows[b].items()}
                    for layer, rows in trace.merged.items()}  # fmt: skip
        assert unpadded == {layer: rows[0] for layer, rows in method.trace.merged.items()}
        assert [held[b] for held in trace.prefill_merged_positions] == [
            held[0] for held in method.trace.prefill_merged_positions
        ]


@pytest.mark.parametrize("evict", ["attention", "spread"])
def test_merged_rows_are_evicted_like_visual_tokens_while_decoding(evict):
    """A decode schedule ranks the merged rows with the prompt's visual tokens and evicts some of them; the run
    still equals the reference that inserts them."""
    sdpa, _, inputs = models("llava")
    vta = st3.VTA(steps=4, every=1, min_keep=2, evict=evict)
    method = st3.SparseVLM(recycle=True, counts=((1, 20), (2, 10)), record_positions=True, decode=vta)
    out = generate(sdpa, inputs, method)
    trace = method.trace
    assert trace.evicted and any(i < 0 for held in trace.prefill_merged_positions[2] for i in held)
    merged = [[int((c < 0).sum()) for c in step[2]] for step in trace.decode_visual_positions]  # held at layer 2
    assert min(merged[0]) > 0 and merged[-1] != merged[0]  # attended at first, some evicted by the end
    reference = reference_logits(sdpa, inputs, trace, new_tokens(out, inputs)[:, :-1], method)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, start + step], atol=1e-4, rtol=0)


def test_merged_rows_follow_beams_and_sampling():
    """Under beam search a sample's beams equal its beams alone (its merged rows copied with it), and sampling with
    merged rows is reproducible from the user's seed."""
    sdpa, _, inputs = models("llava")
    beams = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        method = recycling()
        with method(sdpa):
            batch = sdpa.generate(**inputs, **beams)
            assert method.trace.merged
            alone = sdpa.generate(**FAMILIES["llava"].single(inputs, 2), **beams)
        drawn = []
        for _ in range(2):
            with recycling()(sdpa):
                torch.manual_seed(5)
                drawn.append(sdpa.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20))
    assert torch.equal(batch[4:6, -NEW_TOKENS:], alone[:, -NEW_TOKENS:])  # sample 2's beams are rows 4 and 5
    assert torch.equal(drawn[0], drawn[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_beams_and_sampling_run(family):
    model, _, inputs = models(family)
    beams = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        original = model.generate(**inputs, **beams)
        with st3.ST3(ratio=0.0, anneal_final=1.0)(model):
            noop = model.generate(**inputs, **beams)
        method = METHODS["st3"]()
        with method(model):
            pruned = model.generate(**inputs, **beams)
            torch.manual_seed(5)
            sampled = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20)
    assert torch.equal(original, noop)
    assert pruned.shape == original.shape
    assert method.trace.pruned and sampled.shape[0] == 3


# ------------------------------------------------------------------------------ refused, clearly
def test_qwen_vl_refuses_visual_tokens_without_mm_token_type_ids():
    model, _, inputs = models("qwen2-vl")
    bare = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"), torch.no_grad(), st3.FastV(layer=1)(model):
        model.generate(**bare, max_new_tokens=2)


def test_llava_refuses_a_window_its_config_does_not_declare():
    # Sliding windows that the config declares (Mistral, Qwen2) run exactly: tests/proofs/test_windows.py.
    model = tiny_llava(layers=3, text_model="qwen2")
    model.model.language_model.layers[1].self_attn.sliding_window = 8
    with pytest.raises(UnsupportedModel, match="layer 1 uses sliding-window attention \\(window 8\\)") as error:
        st3.FastV(layer=1)(model)
    assert "Supported decoder layers: LlamaDecoderLayer" in str(error.value)


def test_llava_runs_mistral_without_sliding_window_exactly():
    model = tiny_llava(layers=3, text_model="mistral", sliding_window=None)
    assert adapter_for(model).decoder_layers["MistralDecoderLayer"] == "MistralAttention"


def test_an_unknown_decoder_layer_class_is_refused():
    model = tiny_llava(layers=3)

    class NewDecoderLayer(type(model.model.language_model.layers[1])):
        pass

    model.model.language_model.layers[1].__class__ = NewDecoderLayer
    with pytest.raises(UnsupportedModel, match="layer 1 is a NewDecoderLayer"):
        st3.FastV(layer=1)(model)


def test_attention_soft_capping_is_refused():
    model = tiny_llava(layers=3)
    model.model.language_model.config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedModel, match="soft-capping"):
        st3.FastV(layer=1)(model)


def test_a_manual_decode_loop_on_qwen_vl_needs_positions_never_the_pruned_cache_length():
    model, _, inputs = models("qwen2-vl")
    method = METHODS["fastv"]()
    expected = generate(model, inputs, method, max_new_tokens=2)
    with torch.no_grad(), method(model):
        out = model(**inputs, use_cache=True)
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        text = inputs["attention_mask"].sum(-1, keepdim=True)  # the new token's text position
        positions = torch.cat([text[None], (text + model.model.rope_deltas)[None].expand(3, -1, -1)])
        step = model(input_ids=token, position_ids=positions, use_cache=True, **compat_cache(cache))
        with pytest.raises(ValueError, match="cache length"):
            model(input_ids=token, use_cache=True, **compat_cache(cache))
    assert torch.equal(token[:, 0], new_tokens(expected, inputs)[:, 0])
    torch.testing.assert_close(step.logits[:, -1], expected.logits[1], atol=1e-5, rtol=0)


def test_lattice_spreads_over_each_image_and_frame_grid():
    from st3.adapters import Grid
    from st3.selectors.layout import lattice, lattice_cells

    assert lattice(6, 6, 6) == [7, 9, 11, 25, 27, 29]
    assert lattice(4, 4, 4) == [5, 7, 13, 15]
    assert lattice(2, 3, 9) == list(range(6))
    # two frames of 2 x 2 and one 4 x 4 image share 6 tokens by size (2 : 4), the frames 1 : 1
    assert lattice_cells([Grid(2, 2, 2), Grid(1, 4, 4)], 6) == [3, 4 + 3, 8 + 5, 8 + 7, 8 + 13, 8 + 15]
    model, _, inputs = models("qwen2-vl")
    visual = torch.isin(inputs["input_ids"], torch.tensor([3, 4]))
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    positions = full_positions(model, inputs, ids, mask, types)
    layout = adapter_for(model).image_layout(inputs, visual, positions)
    assert layout == [[Grid(1, 4, 4)], [Grid(1, 4, 6)], [Grid(2, 4, 4)]]
    method = st3.Lattice(keep=8, layer=1)
    with torch.no_grad(), method(model):
        model(**inputs)
    visual = torch.isin(inputs["input_ids"], torch.tensor([3, 4]))
    for b, grids in enumerate(layout):
        columns = visual[b].nonzero().squeeze(-1)
        assert method.trace.prefill_visual_positions[1][b].tolist() == columns[lattice_cells(grids, 8)].tolist()
