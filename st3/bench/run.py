"""The benchmark loop: build or load a model, run vanilla and each method interleaved, summarise.

For each batch size and each number of new tokens: every method (vanilla first) is warmed up, then the
methods run in turn, A B C A B C ..., `repeats` times, so that slow drifts of a shared machine (other
processes, thermal state) hit every method alike. Ratios are taken between medians of the same block.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from st3.accounting import unpruned_flops
from st3.adapters import adapter_for
from st3.bench.harness import check_clock, cpu_bf16_note, environment, interleaved, spread
from st3.bench.measure import Sample, measure_generate
from st3.bench.methods import Resolved, resolve
from st3.bench.shapes import DTYPES, bench_inputs, build_model, load_model_dir, shape_name
from st3.models import spec_for

VANILLA = "vanilla"
ATTN = ("sdpa", "eager", "flash_attention_2")
WARMUP_TOKENS = 8
"""Tokens per warm-up run: enough to pass through ST3's first decode eviction (every 4 steps)."""


@dataclass
class BenchConfig:
    """Everything `st3 bench` can be told."""

    model: str = "llava-1.5-7b"
    model_dir: str | None = None
    layers: int | None = None
    methods: list[str] | None = None
    """Method specs (see st3.bench.methods); None: ST3 defaults and FastV/PyramidDrop matched, if registered."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: list[int] = field(default_factory=lambda: [64])
    repeats: int = 3
    warmup: int = 1
    dtype: str = "bf16"
    device: str = "auto"
    attn: str = "sdpa"
    text_before: int = 35
    text_after: int = 40
    threads: int | None = None
    clock: str = "wall"
    """A clock of st3.bench.harness.CLOCKS: wall, process or thread (CPU time: robust on a shared CPU)."""
    progress: bool = True

    def __post_init__(self) -> None:
        """Fail before building a 13 GB model, naming the option that is wrong."""
        checks = (
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.attn in ATTN, f"--attn must be one of {', '.join(ATTN)}, got {self.attn!r}"),
            (
                self.attn != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
                "--attn flash_attention_2 needs the flash-attn package (pip install flash-attn) and a CUDA GPU",
            ),
            (self.repeats >= 1, f"--repeats must be >= 1, got {self.repeats}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (all(b >= 1 for b in self.batch_sizes), f"--batch-sizes must be >= 1, got {self.batch_sizes}"),
            (all(n >= 2 for n in self.new_tokens), f"--new-tokens must be >= 2, got {self.new_tokens}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_clock(self.clock, "cpu" if self.device == "auto" else self.device)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(config: BenchConfig, device: torch.device):
    """(model, description) for the configured shape or directory."""
    dtype = DTYPES[config.dtype]
    if config.model_dir:
        model = load_model_dir(config.model_dir, dtype, device, config.layers, config.attn)
        return model, {"source": str(config.model_dir), "note": "weights loaded from the directory"}
    spec = spec_for(config.model, config.layers)
    model = build_model(spec, dtype, device, config.attn)
    full = spec_for(config.model).layers
    return model, {"source": spec.name, "visual_tokens": spec.visual_tokens, "full_layers": full, "note": spec.note,
                   "tower_layers": spec.tower_layers}  # fmt: skip


def run_bench(config: BenchConfig) -> dict:
    """Run the whole benchmark and return a JSON-ready result (see report.py for how it is shown)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    started = time.time()
    load_start = time.perf_counter()
    model, source = load(config, device)
    build_s = time.perf_counter() - load_start
    shape = adapter_for(model).shape
    visual = int(adapter_for(model).visual_mask(bench_inputs(model, 1)["input_ids"]).sum())
    text = config.text_before + config.text_after
    blocks = []
    plans = [
        (b, n, *resolve(config.methods, shape, visual, text, n)) for b in config.batch_sizes for n in config.new_tokens
    ]
    total = sum((config.warmup + config.repeats) * (len(methods) + 1) for *_, methods, _ in plans)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not config.progress, file=sys.stderr)
    for batch_size, new_tokens, methods, notes in plans:
        bar.set_postfix_str(f"batch {batch_size}, {new_tokens} tokens")
        blocks.append(run_block(model, config, batch_size, new_tokens, methods, notes, bar))
    bar.close()
    return {
        "meta": meta(config, model, shape, source, device, build_s, started),
        "runs": blocks,
    }


def run_block(model, config: BenchConfig, batch_size: int, new_tokens: int, methods, notes, bar) -> dict:
    """Warm up, then run vanilla and every method interleaved `repeats` times; summarise the block."""
    inputs = bench_inputs(model, batch_size, config.text_before, config.text_after)
    entries: list[Resolved] = [Resolved(VANILLA, VANILLA, None, {}), *methods]
    try:
        samples = interleaved(
            range(len(entries)),
            lambda i: measure_generate(model, inputs, new_tokens, entries[i].method, config.clock),
            config.repeats,
            config.warmup,
            warm=lambda i: measure_generate(model, inputs, min(new_tokens, WARMUP_TOKENS), entries[i].method,
                                            config.clock),  # fmt: skip
            tick=bar.update,
        )
    except torch.cuda.OutOfMemoryError as error:  # larger batches where memory allows
        torch.cuda.empty_cache()
        return {"batch_size": batch_size, "new_tokens": new_tokens, "skipped": f"out of memory: {error}"}
    shape = adapter_for(model).shape
    prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
    vanilla_flops = unpruned_flops(shape, prompt_tokens, new_tokens)
    results = {e.label: summarise(e, samples[i], vanilla_flops) for i, e in enumerate(entries)}
    return {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens[0],
        "visual_tokens": int(adapter_for(model).visual_mask(inputs["input_ids"][:1]).sum()),
        "notes": notes,
        "methods": results,
        "ratios": {label: ratios(results[VANILLA], r) for label, r in results.items() if label != VANILLA},
    }


PER_RUN_ONLY = ("trace", "kv_bytes_per_layer", "token_s")
"""Sample fields kept out of the per-sample rows of the JSON (the last run's trace and KV are summarised)."""
METRICS = ("prefill_s", "decode_s_per_token", "e2e_s", "e2e_tokens_per_s", "decode_tokens_per_s")


def summarise(entry: Resolved, samples: list[Sample], vanilla_flops: dict[str, int]) -> dict:
    """Spread of each timing over the repeats, memory peaks, KV bytes and FLOPs of one method."""
    rows = [s.to_dict() for s in samples]
    last = samples[-1]
    trace = last.trace
    flops = vanilla_flops
    if trace is not None:
        f = trace["flops"]
        flops = {"prefill": f["prefill"], "decode": f["decode"], "total": f["total"]}
    return {
        "method": entry.name,
        "knobs": entry.knobs,
        "note": entry.note,
        **{metric: spread([row[metric] for row in rows]) for metric in METRICS},
        "rss_peak_bytes": max(s.rss_peak_bytes for s in samples),
        "rss_working_bytes": max(s.rss_peak_bytes - s.rss_before_bytes for s in samples),
        "rss_scope": last.rss_scope,
        "device_peak_bytes": last.device_peak_bytes,
        "kv_bytes_peak": last.kv_bytes_peak,
        "kv_bytes_final": last.kv_bytes_final,
        "kv_bytes_per_layer": last.kv_bytes_per_layer,
        "flops": flops,
        "trace": trace,
        "samples": [{k: v for k, v in row.items() if k not in PER_RUN_ONLY} for row in rows],
    }


def ratios(vanilla: dict, method: dict) -> dict[str, float]:
    """Speed-ups (vanilla median / method median), KV ratio, theoretical FLOPs speed-ups and efficiency
    (measured speed-up / theoretical speed-up: 1 means the FLOPs saved turned fully into time saved)."""

    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out = {
        "prefill_speedup": div(vanilla["prefill_s"]["median"], method["prefill_s"]["median"]),
        "decode_speedup": div(vanilla["decode_s_per_token"]["median"], method["decode_s_per_token"]["median"]),
        "e2e_speedup": div(vanilla["e2e_s"]["median"], method["e2e_s"]["median"]),
        "kv_ratio": div(method["kv_bytes_peak"], vanilla["kv_bytes_peak"]),
        "kv_ratio_final": div(method["kv_bytes_final"], vanilla["kv_bytes_final"]),
    }
    for part in ("prefill", "decode", "total"):
        out[f"flops_speedup_{part}"] = div(vanilla["flops"][part], method["flops"][part])
    out["efficiency_prefill"] = div(out["prefill_speedup"], out["flops_speedup_prefill"])
    out["efficiency_decode"] = div(out["decode_speedup"], out["flops_speedup_decode"])
    out["efficiency_e2e"] = div(out["e2e_speedup"], out["flops_speedup_total"])
    return out


def meta(config: BenchConfig, model, shape, source: dict, device: torch.device, build_s: float, started) -> dict:
    """Where and how the numbers were taken: enough to reproduce them and to judge them."""
    notes = []
    full = source.get("full_layers")
    if config.layers is not None:
        notes.append(
            f"depth truncated to {shape.num_layers} decoder layers (--layers {config.layers})"
            + (f"; the full model has {full}" if full else "")
            + ": absolute times and the speed-ups of methods that prune deeper layers are not the full model's"
        )
    if not config.model_dir:
        vision = model.config.vision_config
        depth = getattr(vision, "num_hidden_layers", None) or vision.depth
        kind = type(vision).__name__.removesuffix("Config")
        real = f"the real model's has {source['tower_layers']}" if source.get("tower_layers") else "the real is deeper"
        notes.append(
            f"random weights; vision tower: {depth} {kind} layer(s) of width {vision.hidden_size} ({real}), "
            "projector at the model's shape; its cost is paid alike by every method, so measured speed-ups are "
            "slightly conservative"
        )
    if source.get("note"):
        notes.append(source["note"])
    bf16_note = cpu_bf16_note(device, config.dtype)
    if bf16_note:
        notes.append(bf16_note)
    return {
        **environment(device, started),
        "config": asdict(config),
        "model": source,
        "shape": asdict(shape),
        "shape_text": shape_name(model),
        "dtype": config.dtype,
        "build_s": build_s,
        "timing": (
            "one generate per sample; prefill = start to the first logits, decode = (last logits - first logits) "
            "/ (N - 1), end to end = the whole generate call; medians over repeats, interleaved"
        ),
        "notes": notes,
    }
