"""`st3 bench` on tiny shapes: it runs end to end, its ratios come from its measurements, its KV bytes are
the cache tensors' bytes, its FLOPs are a hand count, and its fast builder yields the requested shapes.
No timing is asserted: the machine is shared."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from accelerate import init_empty_weights
from transformers import LlavaForConditionalGeneration
from typer.testing import CliRunner

import st3
from st3.accounting import Shape, unpruned_flops
from st3.adapters.llava import LlavaAdapter
from st3.bench import BenchConfig, main, run_bench
from st3.bench.harness import spread
from st3.bench.measure import cache_bytes_per_layer, measure_generate
from st3.bench.methods import match_cost, resolve
from st3.bench.report import markdown, write_json, write_plot
from st3.bench.shapes import bench_inputs, build_model
from st3.cli import app
from st3.compat import cache_of
from st3.models import ModelSpec, config_for, llava_config, spec_for
from st3.spec import Choice, parse


def tiny_config(**overrides) -> BenchConfig:
    knobs = dict(model="tiny", batch_sizes=[1, 2], new_tokens=[4], repeats=2, warmup=1, progress=False)
    return BenchConfig(**{**knobs, **overrides})


#: ST3 and, when registered, FastV matched to ST3's cost.
SPECS = [spec for spec in ("st3", "fastv:match") if spec.split(":")[0] in st3.methods()]


@pytest.fixture(scope="module")
def result():
    return run_bench(tiny_config(dtype="fp32", methods=SPECS))


# ------------------------------------------------------------------------------------------- end to end
def test_runs_end_to_end(result, tmp_path):
    assert [(b["batch_size"], b["new_tokens"]) for b in result["runs"]] == [(1, 4), (2, 4)]
    for block in result["runs"]:
        assert list(block["methods"]) == ["vanilla", "st3", *(["fastv (matched)"] if len(SPECS) > 1 else [])]
        for m in block["methods"].values():
            assert m["prefill_s"]["n"] == 2 and len(m["samples"]) == 2
            assert m["rss_peak_bytes"] > 0
        assert block["methods"]["st3"]["trace"]["pruned"]
        assert set(block["ratios"]) == set(block["methods"]) - {"vanilla"}
    write_json(result, tmp_path / "r.json")
    write_plot(result, tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["batch_size"] == 1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "| st3 |" in markdown(result)
    assert "median [min-max] over 2 interleaved repeats" in markdown(result)


def test_ratios_come_from_the_measured_medians(result, tmp_path):
    write_json(result, tmp_path / "r.json")
    for block in json.loads((tmp_path / "r.json").read_text())["runs"]:
        vanilla, method, r = block["methods"]["vanilla"], block["methods"]["st3"], block["ratios"]["st3"]
        for metric, key in (("prefill_s", "prefill"), ("decode_s_per_token", "decode"), ("e2e_s", "e2e")):
            medians = [s[metric] for s in vanilla["samples"]], [s[metric] for s in method["samples"]]
            assert vanilla[metric]["median"] == pytest.approx(sorted(medians[0])[0] / 2 + sorted(medians[0])[1] / 2)
            assert r[f"{key}_speedup"] == pytest.approx(vanilla[metric]["median"] / method[metric]["median"])
        assert r["kv_ratio"] == pytest.approx(method["kv_bytes_peak"] / vanilla["kv_bytes_peak"])
        assert r["flops_speedup_total"] == pytest.approx(vanilla["flops"]["total"] / method["flops"]["total"])
        assert r["efficiency_e2e"] == pytest.approx(r["e2e_speedup"] / r["flops_speedup_total"])
        assert r["efficiency_prefill"] == pytest.approx(r["prefill_speedup"] / r["flops_speedup_prefill"])
        sample = method["samples"][0]
        assert sample["e2e_tokens_per_s"] == pytest.approx(block["batch_size"] * 4 / sample["e2e_s"])


def test_cli(tmp_path):
    out, png = tmp_path / "cli.json", tmp_path / "cli.png"
    args = ["bench", "--model", "tiny", "--layers", "3", "--batch-sizes", "1", "--new-tokens", "3"]
    args += ["--repeats", "1", "--warmup", "0", "--dtype", "fp32", "--json", str(out), "--plot", str(png)]
    args += ["--method", "st3:start_layer=1,stride=1", "--attn", "eager"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    data = json.loads(out.read_text())
    assert data["meta"]["config"]["attn"] == "eager"
    assert data["meta"]["shape"]["num_layers"] == 3
    assert any("truncated to 3" in note for note in data["meta"]["notes"])
    assert list(data["runs"][0]["methods"]) == ["vanilla", "st3(start_layer=1, stride=1)"]
    assert png.exists()
    assert "vs vanilla" in run.output


def test_main_prints_and_writes(tmp_path, capsys):
    main(tiny_config(batch_sizes=[1], new_tokens=[2], repeats=1, warmup=0), tmp_path / "m.json", None)
    out = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    assert "measured" in out and "one timed run per method, no spread" in out
    assert json.loads((tmp_path / "m.json").read_text())["meta"]["dtype"] == "bf16"


# --------------------------------------------------------------------------------------------- KV bytes
@pytest.fixture(scope="module")
def tiny():
    return build_model(spec_for("tiny"), torch.float32)


def test_kv_bytes_are_the_cache_tensors_bytes(tiny):
    inputs = bench_inputs(tiny, 2, 3, 4)
    method = st3.ST3(start_layer=1, stride=1, anneal_steps=2, anneal_every=1)
    with method(tiny), torch.no_grad():
        out = tiny.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    direct = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache_of(out).layers)
    sample = measure_generate(tiny, inputs, 5, method)
    assert sample.kv_bytes_final == direct == method.trace.kv_bytes
    assert sample.kv_bytes_per_layer == cache_bytes_per_layer(cache_of(out))
    assert sample.kv_bytes_peak == method.trace.kv_bytes_peak >= sample.kv_bytes_final

    vanilla = measure_generate(tiny, inputs, 5)
    shape = LlavaAdapter(tiny).shape
    columns = inputs["input_ids"].shape[1] + 5 - 1  # the last token is never fed back
    assert vanilla.kv_bytes_final == vanilla.kv_bytes_peak == shape.num_layers * 2 * columns * 2 * 2 * 16 * 4
    assert vanilla.kv_bytes_final > sample.kv_bytes_final


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_formula_matches_a_hand_count():
    shape = Shape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)
    # per layer and token: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3 x 8x16 = 384: 576 multiply-adds
    # prefill of 3 tokens: 2*3*576 = 3456, attention 4 * heads*head_dim (8) * 6 causal pairs = 192
    prefill = 2 * (3456 + 192)
    # 3 new tokens: 2 decode forwards with 4 then 5 keys: 2*576 + 32*keys each, per layer
    decode = 2 * ((1152 + 32 * 4) + (1152 + 32 * 5))
    assert unpruned_flops(shape, [3], 3) == {"prefill": prefill, "decode": decode, "total": prefill + decode}
    assert unpruned_flops(shape, [3, 3], 3)["total"] == 2 * (prefill + decode)


def test_vanilla_flops_equal_the_traces_unpruned_count(result):
    block = result["runs"][1]
    trace_flops = block["methods"]["st3"]["trace"]["flops"]
    vanilla = block["methods"]["vanilla"]["flops"]
    assert vanilla["prefill"] == trace_flops["prefill_unpruned"]
    assert vanilla["total"] == trace_flops["total_unpruned"]


# ---------------------------------------------------------------------------------------------- shapes
def test_builder_makes_the_requested_shape_with_no_meta_tensors():
    spec = ModelSpec("odd", 256, 3, 8, 4, 688, 1000, image_size=56, patch_size=14, vision_hidden=64)
    model = build_model(spec, torch.bfloat16)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert LlavaAdapter(model).shape == Shape(3, 256, 688, 8, 4, 32)
    layer = model.model.language_model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (4 * 32, 256)
    assert layer.mlp.gate_proj.weight.shape == (688, 256)
    assert model.model.multi_modal_projector.linear_1.weight.shape == (256, 64)
    assert layer.input_layernorm.weight.float().eq(1).all()
    rotary = model.model.language_model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and rotary.inv_freq[0] == 1.0
    inputs = bench_inputs(model, 1, 2, 2)
    assert inputs["input_ids"].eq(model.config.image_token_id).sum() == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize(
    "name, shape, visual",
    [
        ("llava-1.5-7b", Shape(32, 4096, 11008, 32, 32, 128), 576),
        ("llava-1.5-13b", Shape(40, 5120, 13824, 40, 40, 128), 576),
    ],
)
def test_real_shapes(name, shape, visual):
    spec = spec_for(name)
    with init_empty_weights():  # meta: instant, no memory
        model = LlavaForConditionalGeneration(llava_config(spec))
    assert LlavaAdapter(model).shape == shape
    assert model.config.image_seq_length == spec.visual_tokens == visual
    assert model.config.text_config.vocab_size == 32064
    assert model.model.multi_modal_projector.linear_1.weight.shape == (shape.hidden_size, 1024)
    assert spec_for(name, layers=2).layers == 2
    with pytest.raises(ValueError, match="--layers"):
        spec_for(name, layers=shape.num_layers + 1)


@pytest.mark.parametrize(
    "name, shape, visual",
    [
        ("llava-next-7b", Shape(32, 4096, 11008, 32, 32, 128), 2928),  # 576 + 48 x 48 tiles + 48 newlines
        ("llava-onevision-7b", Shape(28, 3584, 18944, 28, 4, 128), 3699),  # 729 + 54 x 54 tiles + 54 newlines
        ("internvl3-8b", Shape(28, 3584, 18944, 28, 4, 128), 1280),  # (2 x 2 tiles + thumbnail) x 256
        ("smolvlm-2b", Shape(24, 2048, 8192, 32, 32, 64), 1377),  # (4 x 4 crops + global image) x 81
        ("qwen2.5-vl-7b", Shape(28, 3584, 18944, 28, 4, 128), 1064),
        ("qwen3-vl-8b", Shape(36, 4096, 12288, 32, 8, 128), 1056),
        ("gemma3-4b", Shape(34, 2560, 10240, 8, 4, 256), 256),
    ],
)
def test_every_family_shape_builds_with_its_own_class_and_counts_its_visual_tokens(name, shape, visual):
    """Each shape is built with its family's class from its adapter's config; a copy at small dimensions runs the
    bench prompt (the family's own layout: anyres crops, tiles, crops, M-RoPE grids) and prunes it."""
    from st3.adapters import adapter_for
    from st3.models import model_class

    spec = spec_for(name)
    with init_empty_weights():
        model = model_class(spec)(config_for(spec))
    assert type(model).__name__ == spec.architecture
    assert adapter_for(model).shape == shape and spec.visual_tokens == visual
    tiny = replace(spec, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_heads=2,
                   vision_intermediate=64, head_dim=16 if spec.head_dim else None)  # fmt: skip
    model = build_model(tiny, torch.float32)
    inputs = bench_inputs(model, 2, 3, 4)
    assert int(adapter_for(model).visual_mask(inputs["input_ids"]).sum()) == 2 * visual
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        method = st3.FastV(layer=1, ratio=0.5)
        with method(model):
            pruned = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == pruned.shape and method.trace.visual_tokens == [visual, visual]


# ---------------------------------------------------------------------------------------------- methods
def test_method_specs():
    assert parse("st3") == Choice("st3")
    assert parse("FastV:match") == Choice("fastv", match=True)
    assert parse("st3:ratio=0.5,query=text") == Choice("st3", {"ratio": 0.5, "query": "text"})
    assert parse("st3:ratio=0.5").label == "st3(ratio=0.5)"
    with pytest.raises(ValueError, match="knob=value"):
        parse("st3:ratio")


def test_knob_values_parse_alike_in_a_method_spec_and_in_knob_options():
    """`st3 bench -m`, `st3 eval -m` and `--knob` all read `true` as True (the bench used to keep "true")."""
    from st3.spec import parse_knobs

    expected = {"a": True, "b": None, "c": 0.001, "d": "text", "e": 2}
    assert parse("x:a=true,b=None,c=1e-3,d=text,e=2").knobs == expected
    assert parse_knobs(["a=true", "b=None", "c=1e-3", "d=text", "e=2"]) == expected
    with pytest.raises(ValueError, match="KNOB=VALUE"):
        parse_knobs(["ratio"])


def test_unregistered_methods():
    shape = Shape(4, 64, 128, 4, 2, 16)
    resolved, notes = resolve(None, shape, 36, 10, 4)  # defaults: ST3 + peers matched, unregistered ones skipped
    assert resolved[0].name == "st3"
    assert all(r.name in st3.methods() for r in resolved)
    assert [r.label for r in resolved[1:]] == [f"{r.name} (matched)" for r in resolved[1:]]
    assert len(resolved) + sum("not registered" in n for n in notes) == 3
    with pytest.raises(ValueError, match="not registered"):
        resolve(["no-such-method"], shape, 36, 10, 4)
    resolved, notes = resolve(["st3:start_layer=9"], shape, 36, 10, 4)  # cannot run at 4 layers
    assert not resolved and "start_layer" in notes[0]


def test_match_cost_reaches_the_target():
    from st3.plan import plan

    shape = Shape(8, 64, 128, 4, 2, 16)
    target = plan(st3.ST3(ratio=0.4), shape, 36, 10, 6).total_flops_ratio
    method, knobs, note = match_cost(Choice("st3", match=True), target, shape, 36, 10, 6)
    assert plan(method, shape, 36, 10, 6).total_flops_ratio == pytest.approx(target, abs=0.01)
    assert "ratio" in knobs and "target" in note


def test_spread():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "q1": 1.5, "q3": 2.5, "n": 3}
    assert spread([5.0])["q1"] == 5.0


# ------------------------------------------------------------------------------------ model dir, profiler
def test_model_dir_is_loaded_and_truncated(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    result = run_bench(tiny_config(model_dir=str(tmp_path / "ckpt"), layers=3, batch_sizes=[1], repeats=1, warmup=0))
    assert result["meta"]["model"]["source"] == str(tmp_path / "ckpt")
    assert result["meta"]["shape"]["num_layers"] == 3
    assert result["runs"][0]["methods"]["st3"]["trace"]["pruned"]


def test_profile_labels_the_engine_steps_and_restores_it():
    from st3.bench.profile import run_profile
    from st3.engine.probes import STEPS

    before = [getattr(owner, name) for owner, name, _ in STEPS]  # every step the engine names exists
    result = run_profile("tiny", layers=4, batch_size=1, new_tokens=5, dtype="fp32")
    names = {row["name"] for row in result["method_labels"]}
    assert "st3: mask building (create_causal_mask per layer)" in names
    assert "st3: prefill scoring (re-projected attention)" in names
    assert [getattr(owner, name) for owner, name, _ in STEPS] == before


def test_cpu_clock_measures_process_time(tiny):
    inputs = bench_inputs(tiny, 1, 3, 4)
    sample = measure_generate(tiny, inputs, 4, clock="process")
    assert sample.prefill_s > 0 and sample.decode_s_per_token > 0 and sample.e2e_s >= sample.prefill_s
    with pytest.raises(ValueError, match="--clock"):
        BenchConfig(clock="sundial")
    with pytest.raises(ValueError, match="'process'"):  # 0.1's ambiguous name says what it became
        BenchConfig(clock="cpu")


def test_bad_options_fail_before_building():
    with pytest.raises(ValueError, match="--dtype"):
        BenchConfig(dtype="int4")
    with pytest.raises(ValueError, match="--new-tokens"):
        BenchConfig(new_tokens=[1])
    with pytest.raises(ValueError, match="--attn"):
        BenchConfig(attn="flash")
    run = CliRunner().invoke(app, ["bench", "--model", "tiny", "--repeats", "0"])
    assert run.exit_code != 0 and "--repeats" in run.output


def test_gemma3_shape_keeps_its_layer_pattern_and_image_blocks():
    from st3.models import model_class

    spec = spec_for("gemma3-4b")
    with init_empty_weights():
        model = model_class(spec)(config_for(spec))
    assert model.config.text_config.layer_types.count("full_attention") == 5  # one full layer in six
    tiny = replace(spec, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_heads=2,
                   vision_intermediate=64, head_dim=16, image_size=64, patch_size=4)  # fmt: skip
    inputs = bench_inputs(build_model(tiny, torch.float32), 2, 3, 4)
    assert int(inputs["token_type_ids"].sum()) == 2 * 256
