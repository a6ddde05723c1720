"""`st3 eval`: accuracy of every method as visual tokens go, on the scenes benchmark, at matched budgets.

For each method and each budget (a share of the image's visual tokens kept per layer on average), the
method's budget knob is set with `st3.match` at the model's own shape, then QA (one-word answers, exact
match) and captions (the whole caption exactly right) are generated in left-padded batches. Reported per
task: accuracy, accuracy relative to unpruned, mean visual tokens per layer, prefill FLOPs ratio, KV-cache
ratio at the end and wall time, as a terminal table, JSON and a PNG of accuracy vs prefill FLOPs.

Knobs defined in layers (ST3's start layer and stride, FastV's layer) are given for 32-layer models; on a
shallower model they are scaled to its depth first (as PyramidDrop's stages are), then the budget is matched.
A budget that cannot be reached while the first layers hold every token is matched again with pruning
from layer 0 (the configuration is in each row's knobs); one still out of reach is reported as a note.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

import st3
from st3.adapters import adapter_for
from st3.bench.methods import parse as parse_spec
from st3.data.tasks import ANSWER_TOKENS, SPLITS, example

BUDGETS = (1.0, 0.5, 0.33, 0.22, 0.11)
METHODS = ("st3", "fastv", "pyramiddrop", "visionzip", "random")


@dataclass
class Row:
    """One method at one budget on one task."""

    method: str
    budget: float
    task: str
    accuracy: float
    n: int
    visual_per_layer: float
    prefill_flops_ratio: float
    kv_ratio: float
    seconds: float
    knobs: dict = field(default_factory=dict)
    relative: float = 1.0


def depth_scaled(name: str, num_layers: int) -> dict:
    """Knobs in layers, scaled from a 32-layer model to `num_layers` (empty when nothing to scale)."""

    def scale(layer: int) -> int:
        return max(1, round(layer * num_layers / 32))

    schedule = st3.get(name)
    if isinstance(schedule, st3.ST3):
        return {"start_layer": scale(2), "stride": scale(3)}
    if isinstance(schedule, (st3.FastV, st3.Random, st3.Uniform)) or (
        isinstance(schedule, st3.Keep) and schedule.layer
    ):
        return {"layer": scale(2)}
    return {}


def configure(spec: str, budget: float, num_layers: int, visual: int, text: int, shape) -> st3.Method | None:
    """The method of `spec` (`name` or `name:knob=value,...`) at `budget` (share of visual tokens per layer), or
    None for the unpruned model. Knobs given in the spec are kept as given; the budget knob is then matched."""
    if budget >= 1.0:
        return None
    choice = parse_spec(spec)
    knobs = {k: v for k, v in depth_scaled(choice.name, num_layers).items() if k not in choice.knobs}

    def matched(layer_knobs: dict) -> st3.Method:
        return st3.match(choice.name, budget * visual, shape=shape, visual=visual, text=text, **layer_knobs,
                         **choice.knobs)  # fmt: skip

    try:
        return matched(knobs)
    except ValueError:
        if not knobs:
            raise
        return matched({key: 0 if key in ("start_layer", "layer") else value for key, value in knobs.items()})


def run_task(model, processor, examples, method, batch_size: int, progress) -> tuple[list[bool], dict]:
    """Greedy answers for `examples` under `method` (None: unpruned); exact-match hits and cost totals."""
    from st3.compare import timed_generate
    from st3.data.processor import prompt

    hits, totals = [], {"visual": 0.0, "samples": 0, "prefill": 0, "prefill_full": 0, "kv": 0, "kv_full": 0}
    task = examples[0].task
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = processor(
            images=[e.image for e in batch], text=[prompt(e.question) for e in batch], return_tensors="pt", padding=True
        )
        generated, _ = timed_generate(model, inputs, method, max_new_tokens=ANSWER_TOKENS[task], do_sample=False)
        if method is not None:
            summary = method.trace.summary()
            totals["visual"] += summary["mean_visual_per_layer"] * len(batch)
            totals["prefill"] += summary["flops"]["prefill"]
            totals["prefill_full"] += summary["flops"]["prefill_unpruned"]
            totals["kv"] += summary["kv_bytes"]
            totals["kv_full"] += summary["kv_bytes_unpruned"]
        totals["samples"] += len(batch)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits.extend(text.strip() == e.answer for text, e in zip(texts, batch))
        progress.update(len(batch))
    return hits, totals


def evaluate(
    model_dir: str,
    split: str = "test",
    methods: tuple[str, ...] = METHODS,
    budgets: tuple[float, ...] = BUDGETS,
    qa: int = 200,
    captions: int = 50,
    batch_size: int = 16,
    first: int = 0,
) -> dict:
    """Run every method at every budget on both tasks; return the rows and the settings.

    `first`: index of the split's first example used (a held-out range: report on rows never tuned on)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    for budget in budgets:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget: each must be in (0, 1], got {budget}")
    unknown = [m for m in methods if parse_spec(m).name not in st3.methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(st3.methods())}")
    for spec in methods:  # bad knobs fail here, before any model is loaded, not as a note per budget
        choice = parse_spec(spec)
        try:
            st3.get(choice.name, **choice.knobs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"method {spec!r}: {error}") from None
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir!r}: expected a directory written by save_pretrained")

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    shape = adapter_for(model).shape
    tasks = {
        "qa": [example(split, first + i, "qa") for i in range(qa)],
        "caption": [example(split, first + i, "caption") for i in range(captions)],
    }
    tasks = {task: examples for task, examples in tasks.items() if examples}
    visual = model.config.image_seq_length
    probe = processor(
        images=[tasks[next(iter(tasks))][0].image], text=["USER: <image>\nwhat? ASSISTANT:"], return_tensors="pt"
    )
    text = probe["input_ids"].shape[1] - visual

    plans = [("unpruned", 1.0)] + [(m, b) for m in methods for b in budgets if b < 1.0]
    rows, notes = [], []
    total = len(plans) * sum(len(e) for e in tasks.values())
    with tqdm(total=total, desc="st3 eval", unit="answer") as progress:
        for name, budget in plans:
            try:
                method = None if name == "unpruned" else configure(name, budget, shape.num_layers, visual, text, shape)
            except ValueError as error:
                notes.append(f"{name} at {budget:.0%}: {error}")
                progress.update(sum(len(e) for e in tasks.values()))
                continue
            for task, examples in tasks.items():
                start = time.perf_counter()
                hits, t = run_task(model, processor, examples, method, batch_size, progress)
                pruned = method is not None
                rows.append(
                    Row(
                        method=name,
                        budget=budget,
                        task=task,
                        accuracy=sum(hits) / len(hits),
                        n=len(hits),
                        visual_per_layer=t["visual"] / t["samples"] if pruned else float(visual),
                        prefill_flops_ratio=t["prefill"] / t["prefill_full"] if pruned else 1.0,
                        kv_ratio=t["kv"] / t["kv_full"] if pruned else 1.0,
                        seconds=time.perf_counter() - start,
                        knobs={} if method is None else method.knobs(),
                    )
                )
    baseline = {row.task: row.accuracy for row in rows if row.method == "unpruned"}
    for row in rows:
        row.relative = row.accuracy / baseline[row.task] if baseline.get(row.task) else float("nan")
    return {
        "model": model_dir,
        "split": split,
        "first": first,
        "visual_tokens": visual,
        "text_tokens": text,
        "num_layers": shape.num_layers,
        "rows": [asdict(row) for row in rows],
        "notes": notes,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"st3 eval: {result['model']} ({result['split']} split)")
    for column in ("task", "method", "budget", "acc", "rel", "vis/layer", "prefill", "KV", "s"):
        table.add_column(column, justify="left" if column in ("task", "method") else "right", no_wrap=True)
    for row in sorted(result["rows"], key=lambda r: (r["task"], r["method"] != "unpruned", r["method"], -r["budget"])):
        table.add_row(
            row["task"],
            {"pyramiddrop": "pdrop", "visionzip": "vzip", "unpruned": "full"}.get(row["method"], row["method"]),
            f"{row['budget']:.0%}",
            f"{row['accuracy']:.1%}",
            "n/a" if row["relative"] != row["relative"] else f"{row['relative']:.0%}",
            f"{row['visual_per_layer']:.1f}",
            f"{row['prefill_flops_ratio']:.0%}",
            f"{row['kv_ratio']:.0%}",
            f"{row['seconds']:.0f}",
        )
    console = Console()
    console.print(table)
    console.print("acc: exact match; rel: relative to unpruned; vis/layer: visual tokens per layer (prefill mean);")
    console.print("prefill: prefill FLOPs / unpruned; KV: KV-cache bytes at the end / unpruned; s: wall seconds")
    for note in result["notes"]:
        console.print(f"note: {note}", soft_wrap=True)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def write_plot(result: dict, path: str) -> None:
    """Accuracy vs prefill FLOPs ratio, one curve per method, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({row["task"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in result["rows"] if r["task"] == task]
        base = next((r for r in rows if r["method"] == "unpruned"), None)
        for name in sorted({r["method"] for r in rows} - {"unpruned"}):
            points = sorted((r["prefill_flops_ratio"], r["accuracy"]) for r in rows if r["method"] == name)
            if base is not None:
                points.append((1.0, base["accuracy"]))
            ax.plot(*zip(*points), marker="o", label=name)
        if base is not None:
            ax.axhline(base["accuracy"], color="grey", linestyle=":", linewidth=1, label="unpruned")
        ax.set_xlabel("prefill FLOPs / unpruned")
        ax.set_ylabel("exact match" if task == "qa" else "captions exactly right")
        ax.set_title(task)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} ({result['split']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
