"""Exact-match accuracy on the scenes benchmark: of the model alone, and of every method at matched budgets.

    st3 eval scenes/st3_scenes/assets/scenes-llava --split test --first 5000 --qa 250 --captions 25
    python -m st3_scenes.evaluate --model scenes/st3_scenes/assets/scenes-llava --split test --qa 2000

Answers are generated greedily through the stock path (`AutoProcessor` + `model.generate`, left-padded
batches, `answers`); a QA answer counts when the decoded text equals the answer, a caption when it equals
the template caption exactly.

`evaluate` (`st3 eval`): for each method and each budget (a share of the image's visual tokens kept per
layer on average), the method is configured with `st3.budget.at_budget` at the model's own shape (layer
knobs scaled to its depth, the budget knob matched), then QA and captions are answered. Reported per task:
accuracy, accuracy relative to unpruned, mean visual tokens per layer, prefill FLOPs ratio, KV-cache ratio
at the end and wall time, as a terminal table, JSON and a PNG of accuracy vs prefill FLOPs. A budget out of
reach is reported as a note. `accuracy` (the trainer's validation, `python -m st3_scenes.evaluate`): the
unpruned model alone, QA by question kind.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import st3
from st3.adapters import adapter_for
from st3.budget import at_budget
from st3.compare import timed_generate
from st3.compat import LOAD_KWARGS
from st3.spec import parse
from st3_scenes.processor import prompt
from st3_scenes.tasks import ANSWER_TOKENS, SPLITS, Example, example

BUDGETS = (1.0, 0.5, 0.33, 0.22, 0.11)
#: st3, st3's best rule on this benchmark (spread), the peers and a random control
METHODS = ("st3", "spread", "fastv", "pyramiddrop", "visionzip", "random")


def answers(
    model, processor, examples: list[Example], max_new_tokens: int, batch_size: int = 32,
    method: st3.Method | None = None, progress=None,
) -> tuple[list[str], dict]:  # fmt: skip
    """Greedy answers to `examples` under `method` (None: unpruned), decoded without special tokens and
    stripped, and the run's cost totals (visual tokens per layer, prefill FLOPs, KV bytes, pruned vs not)."""
    out: list[str] = []
    totals = {"visual": 0.0, "samples": 0, "prefill": 0, "prefill_full": 0, "kv": 0, "kv_full": 0}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = processor(
            images=[e.image for e in batch], text=[prompt(e.question) for e in batch], return_tensors="pt", padding=True
        ).to(model.device)
        generated = timed_generate(model, inputs, method, max_new_tokens=max_new_tokens, do_sample=False).output
        if method is not None:
            summary = method.trace.summary()
            totals["visual"] += summary["mean_visual_per_layer"] * len(batch)
            totals["prefill"] += summary["flops"]["prefill"]
            totals["prefill_full"] += summary["flops"]["prefill_unpruned"]
            totals["kv"] += summary["kv_bytes"]
            totals["kv_full"] += summary["kv_bytes_unpruned"]
        totals["samples"] += len(batch)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(t.strip() for t in texts)
        if progress is not None:
            progress.update(len(batch))
    return out, totals


def prompt_counts(adapter, processor, image) -> tuple[int, int]:
    """(visual, text) tokens of one prompt about `image`, as the processor lays it out, whatever the family: the
    counts budgets are matched at (`st3 eval`, `st3 search --form psigmoid`)."""
    (visual,), (text,) = adapter.token_counts(processor(images=[image], text=[prompt("what?")], return_tensors="pt"))
    return visual, text


def accuracy(model, processor, split: str = "validation", qa: int = 500, captions: int = 100, start: int = 0,
             batch_size: int = 32) -> dict:  # fmt: skip
    """The unpruned model's QA exact match (overall and by kind) over examples [start, start+qa) and caption
    exact match over caption examples [start, start+captions) of the split."""
    was_training = model.training
    model.eval()
    result: dict = {"split": split}
    if qa:
        examples = [example(split, start + i, "qa") for i in range(qa)]
        got, _ = answers(model, processor, examples, ANSWER_TOKENS["qa"], batch_size)
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for e, g in zip(examples, got):
            by_kind[e.kind].append(g == e.answer)
        hits = [h for v in by_kind.values() for h in v]
        result["qa_accuracy"] = sum(hits) / len(hits)
        result["qa_n"] = len(hits)
        result["qa_by_kind"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
    if captions:
        examples = [example(split, start + i, "caption") for i in range(captions)]
        got, _ = answers(model, processor, examples, ANSWER_TOKENS["caption"], batch_size)
        result["caption_exact"] = sum(g == e.answer for e, g in zip(examples, got)) / len(examples)
        result["caption_n"] = len(examples)
        result["caption_samples"] = [{"want": e.answer, "got": g} for e, g in list(zip(examples, got))[:3]]
    model.train(was_training)
    return result


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
    unknown = [m for m in methods if parse(m).name not in st3.methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(st3.methods())}")
    for spec in methods:  # bad knobs fail here, before any model is loaded, not as a note per budget
        choice = parse(spec)
        try:
            st3.get(choice.name, **choice.knobs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"method {spec!r}: {error}") from None
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir!r}: expected a directory written by save_pretrained")

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for(model)
    shape = adapter.shape
    tasks = {
        "qa": [example(split, first + i, "qa") for i in range(qa)],
        "caption": [example(split, first + i, "caption") for i in range(captions)],
    }
    tasks = {task: examples for task, examples in tasks.items() if examples}
    visual, text = prompt_counts(adapter, processor, tasks[next(iter(tasks))][0].image)

    plans = [("unpruned", 1.0)] + [(m, b) for m in methods for b in budgets if b < 1.0]
    rows, notes = [], []
    total = len(plans) * sum(len(e) for e in tasks.values())
    with tqdm(total=total, desc="st3 eval", unit="answer") as progress:
        for name, budget in plans:
            try:
                choice = parse(name)  # "unpruned" parses to a name with no knobs, at a budget of 1: None
                method = at_budget(choice.name, choice.knobs, budget, shape, visual, text)
            except ValueError as error:
                notes.append(f"{name} at {budget:.0%}: {error}")
                progress.update(sum(len(e) for e in tasks.values()))
                continue
            for task, examples in tasks.items():
                start = time.perf_counter()
                got, t = answers(model, processor, examples, ANSWER_TOKENS[task], batch_size, method, progress)
                hits = [text == e.answer for text, e in zip(got, examples)]
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
            row["method"],  # the spec as given: the same name as in the JSON and the plot
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


def main(argv: list[str] | None = None) -> None:
    """`python -m st3_scenes.evaluate`: the unpruned model's accuracy (`accuracy`), as JSON."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3_scenes import MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--qa", type=int, default=2000)
    parser.add_argument("--captions", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    t0 = time.time()
    result = accuracy(model, processor, args.split, args.qa, args.captions, args.start, args.batch_size)
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
