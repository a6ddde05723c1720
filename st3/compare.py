"""Side by side: the same prompts about one image, answered unpruned and under a method.

Used by `st3 generate` (any supported checkpoint on disk or in the local hub cache) and by the main job.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from st3.methods.base import Method


def load(model_id: str, dtype: str = "auto"):
    """(model, processor) from a directory or a hub id available locally; clear errors otherwise.

    The model class is the checkpoint's own architecture, if st3 supports it (LLaVA, Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL); it is checked before any weight is read.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from st3.adapters import supported_models

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype: must be one of {', '.join(dtypes)}, got {dtype!r}")
    if not Path(model_id).is_dir() and Path(model_id).exists():
        raise ValueError(f"model: {model_id!r} is a file; pass a checkpoint directory or a hub id")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise ValueError(f"model: cannot load {model_id!r} ({str(error).splitlines()[0]})") from None
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in supported_models():
        raise ValueError(f"model: st3 does not support {architecture}; supported: {', '.join(supported_models())}")
    try:
        model = getattr(transformers, architecture).from_pretrained(model_id, dtype=dtypes[dtype])
    except OSError as error:
        raise ValueError(f"model: cannot load {model_id!r} ({str(error).splitlines()[0]})") from None
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except OSError as error:
        raise ValueError(f"model: cannot load {model_id!r}'s processor ({str(error).splitlines()[0]})") from None
    except (AttributeError, ImportError) as error:  # processors with a video slot import torchvision
        raise ValueError(
            f"model: {architecture}'s processor needs torchvision ({type(error).__name__}: {error}); install the "
            "torchvision build that matches your torch (see https://pytorch.org/get-started/locally/)"
        ) from None
    processor.tokenizer.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


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


def answer(model, processor, image: Image.Image, questions: list[str], max_new_tokens: int, method=None):
    """(answers, seconds, inputs) for `questions` about `image`, greedy, under `method` if given."""
    inputs = processor(
        images=[image] * len(questions),
        text=[chat_prompt(processor, q) for q in questions],
        return_tensors="pt",
        padding=True,
    ).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    timed = timed_generate(model, inputs, method, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(timed.output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts], timed.seconds, inputs


def image_columns(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Columns of the first sample's visual tokens (images and videos), as the model's adapter reads them."""
    from st3.adapters import adapter_for

    return adapter_for(model).visual_mask(input_ids)[0].nonzero().squeeze(-1).cpu()


def compare(
    model, processor, image: Image.Image, questions: list[str], method: Method, max_new_tokens: int = 64
) -> dict:
    """Answers, time, KV bytes and decoder FLOPs, unpruned vs `method` (costs of the same forwards)."""
    answer(model, processor, image, questions[:1], 2)  # warm-up
    full, full_seconds, _ = answer(model, processor, image, questions, max_new_tokens)
    pruned, seconds, inputs = answer(model, processor, image, questions, max_new_tokens, method)
    summary = method.trace.summary()
    return {
        "questions": questions,
        "unpruned": {"answers": full, "seconds": full_seconds},
        "method": {"name": method.name, "knobs": method.knobs(), "answers": pruned, "seconds": seconds},
        "trace": summary,
        "image_columns": image_columns(model, inputs["input_ids"]),
        "image_grid": grids[0][0] if (grids := method.trace.image_grids) else None,  # the first image's patch grid
    }


def print_comparison(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    name, summary = result["method"]["name"], result["trace"]
    answers = Table(title="answers", show_lines=True)
    for column in ("question", "unpruned", name):
        answers.add_column(column, overflow="fold")
    for q, a, b in zip(result["questions"], result["unpruned"]["answers"], result["method"]["answers"]):
        answers.add_row(q, a, b + ("" if a == b else "  (differs)"))
    console.print(answers)

    cost = Table(title=f"cost of the same forwards: unpruned vs {name}")
    for column in ("", "unpruned", name, "ratio"):
        cost.add_column(column, justify="right" if column else "left")
    flops = summary["flops"]
    for label, full, pruned, fmt in (
        ("visual tokens per layer (prefill)", summary["visual_tokens"][0], summary["mean_visual_per_layer"], ".1f"),
        ("prefill GFLOPs (decoder)", flops["prefill_unpruned"] / 1e9, flops["prefill"] / 1e9, ".3f"),
        ("total GFLOPs (decoder)", flops["total_unpruned"] / 1e9, flops["total"] / 1e9, ".3f"),
        ("KV cache at the end (KiB)", summary["kv_bytes_unpruned"] / 1024, summary["kv_bytes"] / 1024, ".0f"),
        ("wall time (s)", result["unpruned"]["seconds"], result["method"]["seconds"], ".3f"),
    ):
        cost.add_row(label, format(full, fmt), format(pruned, fmt), f"{pruned / full:.1%}" if full else "")
    console.print(cost)
    for label, key in (("after prefill", "visual_per_layer"), ("at the last step", "visual_per_layer_final")):
        console.print(
            f"visual tokens per layer {label}: " + " ".join(str(round(v)) for v in summary[key]), soft_wrap=True
        )
    if summary["note"]:
        console.print(f"note: {summary['note']}", soft_wrap=True)
