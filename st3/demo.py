"""The main job: generate with and without ST3 on the embedded default model, compare what it cost.

With the scenes package installed (`st3_scenes`, in a clone's `scenes/`: `make install` installs it), it
asks the small LLaVA trained on that benchmark a few questions and for one caption about an example scene
(the first of the test split), prints the answers beside the expected ones, KV bytes, FLOPs and wall times
(measured with warm-up and interleaved repeats) side by side, and draws which patches survive per layer
after prefill and while decoding. `pip install st3` alone ships no checkpoint.

Without it, the default is a random LLaVA built from config with LLaVA-1.5's token layout (576 visual
tokens from a 336 px image in 14 px patches) and a decoder as deep as LLaVA-1.5-7B's (32 layers) but
narrow. Random weights produce meaningless text, but the cost of a pruned sequence does not depend on the
weights: kept tokens per layer, KV bytes, FLOPs and wall time are real.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from rich.console import Console

import st3
from st3.compare import image_columns, print_comparison, report, run_both
from st3.testing import tiny_inputs, tiny_llava
from st3.viz import plot_kept_patches

DEMO_SCENE = 2_000_000  # the first scene of the test split
DEMO_KINDS = ("colour_of_shape", "shape_at", "left_of", "count_all")


def demo_model():
    """The random default: LLaVA-1.5 token layout, 32-layer narrow decoder, fp32."""
    return tiny_llava(layers=32, hidden=128, heads=4, kv_heads=4, vocab=512, image_size=336, patch_size=14)


def random_model_comparison(method: st3.Method, max_new_tokens: int, repeats: int) -> tuple[dict, Image.Image]:
    """The random default under `method` vs unpruned, in the shape `st3.compare.compare` returns."""
    model = demo_model()
    inputs = tiny_inputs(model, ((12, 48),))  # 60 text tokens around the image, as in the README's arithmetic
    runs = run_both(model, inputs, method, max_new_tokens, repeats)
    prompt = inputs["input_ids"].shape[1]
    full, pruned = runs["unpruned"][0, prompt:], runs["method"][0, prompt:]
    same = (full == pruned).float().mean().item() if len(full) == len(pruned) else 0.0
    result = {
        "questions": ["(random token prompt; random weights, so the text is meaningless)"],
        "unpruned": {"answers": [f"{len(full)} tokens"]},
        "method": {
            "name": method.label,
            "knobs": method.knobs(),
            "answers": [f"{len(pruned)} tokens, {same:.0%} identical to unpruned"],
        },
        "wall": runs["wall"],
        "trace": runs["trace"].summary(),
        "run_trace": runs["trace"],
        "image_columns": image_columns(model, inputs["input_ids"]),
    }
    return result, Image.new("RGB", (336, 336), (150, 170, 200))


def trained_model_comparison(
    method: st3.Method, max_new_tokens: int, model_dir: Path, repeats: int
) -> tuple[dict, Image.Image]:
    """The trained scenes model on the demo scene: a few questions and a caption, unpruned vs `method`."""
    from st3.compare import compare, load
    from st3_scenes.scenes import scene
    from st3_scenes.tasks import CAPTION_PROMPT, candidates, caption

    model, processor = load(str(model_dir), "fp32", method)
    example = scene(DEMO_SCENE)
    options = candidates(example)
    qas = [options[kind][0] for kind in DEMO_KINDS if kind in options]
    questions = [qa.question for qa in qas] + [CAPTION_PROMPT]
    result = compare(model, processor, example.image, questions, method, max_new_tokens, repeats)
    result["expected"] = [qa.answer for qa in qas] + [caption(example)]
    return result, example.image


def scenes_model_dir() -> Path | None:
    """The trained scenes LLaVA of the scenes package, or None where only st3 is installed."""
    try:
        from st3_scenes import MODEL_DIR
    except ModuleNotFoundError:
        return None
    return MODEL_DIR


def run_demo(
    max_new_tokens: int = 64,
    json_path: str | None = None,
    plot_path: str | None = None,
    console: Console | None = None,
    model_dir: Path | None = None,
    method: st3.Method | None = None,
    repeats: int = 3,
) -> dict:
    """Compare unpruned and `method` (default: ST3) on the embedded default; print, and write JSON / PNG when asked.

    `model_dir`: a scenes LLaVA (default: the scenes package's, when installed); without one, the random model.
    `repeats`: timed runs of each side for the wall times (0: none).
    """
    console = console or Console()
    method = method or st3.ST3()
    model_dir = model_dir or scenes_model_dir()
    if model_dir is not None and (model_dir / "config.json").is_file():
        console.print(f"model: {model_dir} (trained here); scene {DEMO_SCENE} of the test split")
        result, image = trained_model_comparison(method, max_new_tokens, model_dir, repeats)
    else:
        console.print(
            "model: random LLaVA-1.5 layout, 32 narrow layers (random weights: the text is meaningless, the costs "
            "are real). The trained scenes model comes with a clone of the repository: `make install`, or "
            "`pip install --no-deps -e scenes/` in it.",
            soft_wrap=True,
        )
        result, image = random_model_comparison(method, max_new_tokens, repeats)
    print_comparison(result, console)
    if plot_path:
        plot_kept_patches(image, result["run_trace"], result["image_columns"], plot_path,
                          title=f"{method.label}: patches kept", grids=result.get("image_grids"))  # fmt: skip
        console.print(f"wrote {plot_path}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report(result), f, indent=2, default=str)
        console.print(f"wrote {json_path}")
    return report(result)
