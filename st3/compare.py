"""Side by side: the same prompts about one image, answered unpruned and under a method.

Used by `st3 generate` (any supported checkpoint on disk or in the local hub cache) and by the main job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from st3.methods.base import Method


def load(model_id: str, dtype: str = "auto", method: Method | None = None):
    """(model, processor) from a directory or a hub id available locally; clear errors otherwise.

    Everything that can fail is checked before any weight is read: the path, the checkpoint's architecture
    (its own class, if st3 supports it: LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL), `method`'s knobs against the
    config (a layer beyond the decoder's depth), and the processor (`processor_for`).
    """
    import transformers
    from transformers import AutoConfig

    from st3.adapters import ADAPTERS, supported_models
    from st3.compat import LOAD_KWARGS
    from st3.spec import DTYPES, dtype_name

    dtype = dtype_name(dtype)
    if not Path(model_id).is_dir() and Path(model_id).exists():
        raise ValueError(f"model: {model_id!r} is a file; pass a checkpoint directory or a hub id")
    if not Path(model_id).exists() and _looks_like_a_path(model_id):
        raise ValueError(f"model: no directory {model_id!r}; pass a checkpoint directory or a hub id (owner/name)")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load {model_id!r} ({str(error).splitlines()[0]})") from None
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in supported_models():
        raise ValueError(f"model: st3 does not support {architecture}; supported: {', '.join(supported_models())}")
    if method is not None:
        adapter = next(a for a in ADAPTERS if architecture in a.model_classes)
        if method.compresses_vision and not adapter.compresses_vision:
            raise ValueError(f"method: {adapter.compression_refusal(type(method).__name__, architecture)}")
        method.validate_for(config.get_text_config().num_hidden_layers)
    processor = processor_for(model_id, config, architecture)
    try:
        model = getattr(transformers, architecture).from_pretrained(model_id, dtype=DTYPES[dtype], **LOAD_KWARGS)
    except OSError as error:
        raise ValueError(f"model: cannot load {model_id!r} ({str(error).splitlines()[0]})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def processor_for(model_id: str, config, architecture: str):
    """The checkpoint's processor, left-padding. Where only its video processor needs torchvision (Qwen-VL without
    torchvision installed), the same processor class without a video slot: images go through transformers' own
    PIL image processor, which `AutoImageProcessor` picks when torchvision is missing."""
    import importlib.util

    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except OSError as error:
        raise ValueError(f"model: cannot load {model_id!r}'s processor ({str(error).splitlines()[0]})") from None
    except (AttributeError, ImportError) as error:  # processors with a video slot import torchvision
        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        if importlib.util.find_spec("torchvision") is not None or "video" not in str(error).lower() or not name:
            raise ValueError(
                f"model: {architecture}'s processor needs torchvision ({type(error).__name__}: {error}); install the "
                "torchvision build that matches your torch (see https://pytorch.org/get-started/locally/)"
            ) from None
        processor = _without_video(getattr(transformers, name)).from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"
    return processor


def _without_video(processor_class: type) -> type:
    """`processor_class` with image and text slots only: transformers builds a processor's slots from its
    `__init__`'s parameters, so the video processor (and its torchvision import) is never loaded."""

    class ImagesOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"{processor_class.__name__}ImagesOnly"
    return ImagesOnly


def _looks_like_a_path(model_id: str) -> bool:
    """Whether `model_id` can only be a path (a hub id is `name` or `owner/name`)."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def open_image(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError) as error:
        raise ValueError(f"image: cannot read {path!r} ({type(error).__name__})") from None


def chat_prompt(processor, question: str) -> str:
    """The model's own prompt format for one image and one question."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


@dataclass
class Timed:
    """What one timed `generate` returned, and when it started and ended (by the clock it was timed with)."""

    output: Any
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def timed_generate(
    model, inputs: dict, method: Method | None = None, *, clock=time.perf_counter, sync: bool = False, **kwargs
) -> Timed:
    """`model.generate(**inputs, **kwargs)` under `method` (when given) without autograd, timed by `clock`.

    The one timing helper of `st3 generate`, `st3 demo`, `st3 eval` and `st3 bench` (`--overhead` reads several
    clocks at once: a clock may return any reading, `Timed.seconds` needs numbers). `sync`: wait for the
    CUDA device before each clock reading, so the time covers the work and not only its launch.
    """
    with method(model) if method is not None else contextlib.nullcontext(), torch.inference_mode():
        if sync:
            torch.cuda.synchronize()
        start = clock()
        out = model.generate(**inputs, **kwargs)
        if sync:
            torch.cuda.synchronize()
        return Timed(out, start, clock())


def prompts(processor, image: Image.Image, questions: list[str], model) -> dict:
    """The processor's left-padded batch of `questions` about `image`, on the model's device and dtype."""
    inputs = processor(
        images=[[image] for _ in questions],  # one image per prompt (processors that count images per sample need it)
        text=[chat_prompt(processor, q) for q in questions],
        return_tensors="pt",
        padding=True,
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def image_columns(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Columns of the first sample's visual tokens (images and videos), as the model's adapter reads them."""
    from st3.adapters import adapter_for

    return adapter_for(model).visual_mask(input_ids)[0].nonzero().squeeze(-1).cpu()


def run_both(model, inputs: dict, method: Method, max_new_tokens: int, repeats: int = 3) -> dict:
    """Generate greedily unpruned and under `method` (each stopping where the model stops), then time both.

    Returns both outputs, the trace of the method's run (with its decode-time positions, for the picture) and
    `wall_times` (None when `repeats` is 0). The two answer runs are also the warm-up of the timed ones.
    """
    shown = dataclasses.replace(method, record_positions=True)
    out = {}
    for label, applied in (("unpruned", None), ("method", shown)):
        out[label] = timed_generate(model, inputs, applied, max_new_tokens=max_new_tokens, do_sample=False).output
    out["trace"] = shown.trace
    out["wall"] = wall_times(model, inputs, method, max_new_tokens, repeats) if repeats > 0 else None
    return out


def wall_times(model, inputs: dict, method: Method, new_tokens: int, repeats: int, clock=time.perf_counter) -> dict:
    """`repeats` timed runs of each side, interleaved (ABBA...), each making exactly `new_tokens` tokens: medians,
    ranges and a `verdict` that claims a difference only beyond the noise of these runs.

    Call it after one untimed run of each side (the warm-up). `same_work`: the timed method run computed as
    many FLOPs and held as much KV cache as the unpruned one (a no-op), so it cannot be faster but by noise.
    """
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)  # the same forwards
    sync = model.device.type == "cuda"
    seconds: dict[str, list[float]] = {"unpruned": [], "method": []}
    for repeat in range(repeats):
        order = [("unpruned", None), ("method", method)]
        for label, applied in order if repeat % 2 == 0 else order[::-1]:
            seconds[label].append(timed_generate(model, inputs, applied, clock=clock, sync=sync, **fixed).seconds)
    summary = method.trace.summary()
    same_work = summary["total_flops_ratio"] == 1.0 and summary["kv_ratio"] == 1.0
    return {
        "new_tokens": new_tokens,
        "repeats": repeats,
        "seconds": seconds,
        **{label: _spread(values) for label, values in seconds.items()},
        "same_work": same_work,
        "verdict": verdict(seconds["unpruned"], seconds["method"], same_work),
    }


def verdict(unpruned: list[float], method: list[float], same_work: bool = False) -> str:
    """The method's wall time against unpruned, in words: a ratio only where every run of one side beat every run
    of the other (interleaved runs, so a machine's load hits both), and never 'faster' for the same work."""
    if min(len(unpruned), len(method)) < 2:
        return "one run each: too few to compare"
    ratio = statistics.median(method) / statistics.median(unpruned)
    if max(method) < min(unpruned):
        return "within noise (the same work: no FLOPs or KV saved)" if same_work else f"{ratio:.0%} (faster every run)"
    if min(method) > max(unpruned):
        return f"{ratio:.0%} (slower every run)"
    return "within noise (the runs overlap)"


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(
    model, processor, image: Image.Image, questions: list[str], method: Method, max_new_tokens: int = 64,
    repeats: int = 3,
) -> dict:  # fmt: skip
    """Answers, decoder FLOPs and KV bytes of the same forwards, unpruned vs `method`, and their wall times."""
    inputs = prompts(processor, image, questions, model)
    runs = run_both(model, inputs, method, max_new_tokens, repeats)
    prompt = inputs["input_ids"].shape[1]
    decoded = {
        label: [t.strip() for t in processor.batch_decode(runs[label][:, prompt:], skip_special_tokens=True)]
        for label in ("unpruned", "method")
    }
    trace = runs["trace"]
    return {
        "questions": questions,
        "unpruned": {"answers": decoded["unpruned"]},
        "method": {"name": method.label, "knobs": method.knobs(), "answers": decoded["method"]},
        "wall": runs["wall"],
        "trace": trace.summary(),
        "run_trace": trace,
        "image_columns": image_columns(model, inputs["input_ids"]),
        "image_grids": grids[0] if (grids := trace.image_grids) else None,  # the first sample's grids (its parts)
    }


def report(result: dict) -> dict:
    """`result` without what JSON cannot hold (the trace object and tensors)."""
    return {key: value for key, value in result.items() if key not in ("run_trace", "image_columns")}


def print_comparison(result: dict, console=None) -> None:
    """Answers (with the expected ones and right/wrong marks where known), costs, wall times and notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    name, summary = result["method"]["name"], result["trace"]
    expected = result.get("expected")
    answers = Table(title="answers", show_lines=True)
    for column in ("question", *(["expected"] if expected else []), "unpruned", name):
        answers.add_column(column, overflow="fold")
    rows = zip(result["questions"], result["unpruned"]["answers"], result["method"]["answers"])
    for i, (question, full, pruned) in enumerate(rows):
        if expected:
            answers.add_row(question, expected[i], _marked(full, expected[i]), _marked(pruned, expected[i]))
        else:
            answers.add_row(question, full, pruned + ("" if full == pruned else "  (differs)"))
    console.print(answers)
    if expected:
        hits = {side: sum(a == e for a, e in zip(result[side]["answers"], expected)) for side in ("unpruned", "method")}
        console.print(f"right (exact match): unpruned {hits['unpruned']}/{len(expected)}, {name} "
                      f"{hits['method']}/{len(expected)}")  # fmt: skip

    cost = Table(title=f"cost of the same forwards: unpruned vs {name}")
    for column in ("", "unpruned", name, "ratio"):
        cost.add_column(column, justify="right" if column else "left")
    flops = summary["flops"]
    for label, full, pruned, fmt in (
        ("visual tokens per layer (prefill)", summary["visual_tokens"][0], summary["mean_visual_per_layer"], ".1f"),
        ("prefill GFLOPs (decoder)", flops["prefill_unpruned"] / 1e9, flops["prefill"] / 1e9, ".3f"),
        ("total GFLOPs (decoder)", flops["total_unpruned"] / 1e9, flops["total"] / 1e9, ".3f"),
        ("KV cache at the end (KiB)", summary["kv_bytes_unpruned"] / 1024,
         None if summary["kv_bytes"] is None else summary["kv_bytes"] / 1024, ".0f"),
    ):
        if pruned is None:  # a cache st3 cannot read (quantized, unknown kind): not measured, not a 0
            cost.add_row(label, format(full, fmt), "not measured", "")
            continue
        cost.add_row(label, format(full, fmt), format(pruned, fmt), f"{pruned / full:.1%}" if full else "")
    console.print(cost)
    wall = result.get("wall")
    if wall:
        times = Table(title=f"wall time (s): {wall['repeats']} runs of each, interleaved, after a warm-up run of each")
        for column in ("", "unpruned", name, "ratio"):
            times.add_column(column, justify="right" if column else "left")
        shown = [f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})" for t in (wall["unpruned"], wall["method"])]
        times.add_row(f"median (min-max), {wall['new_tokens']} new tokens", *shown, wall["verdict"])
        console.print(times)
        console.print("a time ratio is shown only where every run of one side beat every run of the other; speed and "
                      "memory at real model shapes, with more repeats: st3 bench", soft_wrap=True)  # fmt: skip
    else:
        console.print("wall time: not measured (--repeats 0); st3 bench measures speed and memory", soft_wrap=True)
    for label, key in (("after prefill", "visual_per_layer"), ("at the last step", "visual_per_layer_final")):
        console.print(
            f"visual tokens per layer {label}: " + " ".join(str(round(v)) for v in summary[key]), soft_wrap=True
        )
    if summary["note"]:
        console.print(f"note: {summary['note']}", soft_wrap=True)


def _marked(answer: str, expected: str) -> str:
    return f"{answer}  {'✓' if answer == expected else '✗ wrong'}"
