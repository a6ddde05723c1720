"""`st3 frontier`: accuracy against measured speed-up, each method at the budgets `st3 eval` scored it at.

A budget means what it means in `st3 eval`: mean visual tokens per layer after prefill as a share of the
prompt's visual tokens, the method configured by `st3.budget.at_budget` (layer knobs scaled to the depth,
the budget knob matched). Accuracy comes from `st3 eval` JSON files (the scenes model); speed is measured
here, at a real shape with random weights (`st3 bench`'s model, prompt, measurement and summaries).

Each run is one greedy generate of 64 tokens; the clock is read when each token's logits are ready, so
TTFT, the end-to-end time of a short answer (8 tokens) and of a long one (64) come from the same run. The
unpruned model and every (method, budget) run interleaved: warm-up rounds, then `repeats` rounds each
running every configuration once. Ratios are unpruned median / method median of the same run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from st3.accounting import unpruned_flops
from st3.adapters import adapter_for
from st3.bench.harness import interleaved, spread
from st3.bench.measure import Sample, measure_generate
from st3.bench.methods import Resolved
from st3.bench.run import WARMUP_TOKENS, BenchConfig, load, meta, ratios, resolve_device, summarise
from st3.bench.shapes import bench_inputs

BUDGETS = (0.5, 0.33, 0.22, 0.11)
UNPRUNED = "unpruned"
ANSWERS = (8, 64)
"""Answer lengths timed: a one-word answer and a long one, both read from one generate of the longer."""


def times(config: FrontierConfig) -> dict[str, int]:
    """What is timed: name -> k, the seconds from the start of generate to the logits of token k."""
    short, long = config.answers
    return {"ttft": 1, "short": short, "long": long}


def timing(config: FrontierConfig) -> str:
    short, long = config.answers
    return (
        f"one greedy generate of {long} tokens per run; TTFT, e2e@{short} and e2e@{long} are the times at which "
        f"tokens 1, {short} and {long} came out of that same run (the clock is read when each token's logits are "
        f"ready), not separate {short}-token generates"
    )


@dataclass
class FrontierConfig(BenchConfig):
    """`st3 bench`'s settings (model, dtype, clock, repeats, ...) plus the budgets and the accuracy tables."""

    budgets: list[float] = field(default_factory=lambda: list(BUDGETS))
    accuracy: list[str] = field(default_factory=list)
    """`st3 eval --json` files: methods and accuracies to join."""
    answers: tuple[int, int] = ANSWERS
    """(short, long) answer lengths in tokens (tests shorten them)."""

    def __post_init__(self) -> None:
        self.batch_sizes, self.new_tokens = [1], [self.answers[1]]
        super().__post_init__()
        if not 1 < self.answers[0] <= self.answers[1]:
            raise ValueError(f"answers: (short, long) with 1 < short <= long, got {self.answers}")
        for budget in self.budgets:
            if not 0.0 < budget < 1.0:
                raise ValueError(f"--budget: each must be in (0, 1) (1 is the unpruned model), got {budget}")
        if len({f"{b:.0%}" for b in self.budgets}) != len(self.budgets):
            raise ValueError(f"--budget: each must differ from the others in whole percents, got {self.budgets}")


def read_accuracy(paths: list[str]) -> dict:
    """{(method, budget, task): accuracy}, the eval notes and the files' settings; files must not disagree."""
    table: dict[tuple[str, float, str], float] = {}
    notes, sources = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "rows" not in data:
            raise ValueError(f"--accuracy {path}: not an `st3 eval --json` file (no 'rows')")
        sources.append({k: data.get(k) for k in ("model", "split", "first", "visual_tokens", "num_layers")} | {
            "path": str(path)})  # fmt: skip
        notes += data.get("notes", [])
        for row in data["rows"]:
            key = (row["method"], round(row["budget"], 4), row["task"])
            if table.get(key, row["accuracy"]) != row["accuracy"]:
                raise ValueError(f"--accuracy: {key} has two accuracies across the files")
            table[key] = row["accuracy"]
    return {"table": table, "notes": notes, "sources": sources}


def default_methods(accuracy: dict) -> list[str]:
    """The methods the accuracy files scored (in their order), else every registered method."""
    import st3

    labels = dict.fromkeys(method for method, _, _ in accuracy["table"] if method != "unpruned")
    return list(labels) if accuracy["sources"] else st3.methods()


def check_specs(specs: list[str], explicit: bool) -> dict[str, str]:
    """Why each spec cannot be built ({spec: reason}), found before a 13 GB model is built: a spec given with -m
    is refused (ValueError); one read from an accuracy file (a method renamed since) is reported in its rows."""
    import st3
    from st3.spec import parse

    refused = {}
    for spec in specs:
        choice = parse(spec)
        if choice.match:
            raise ValueError(f"method spec {spec!r}: the budget knob is always matched here; drop ':match'")
        try:
            st3.get(choice.name, **choice.knobs)
        except (KeyError, TypeError, ValueError) as error:
            refused[spec] = f"method {spec!r}: {error}"
            if explicit:
                raise ValueError(refused[spec]) from None
    return refused


def configure(specs: list[str], budgets: list[float], shape, visual: int, text: int, refused: dict) -> list[tuple]:
    """(label, budget, method or None, why unreachable) for every spec at every budget, as `st3 eval` matches;
    `refused`: specs that cannot be built, and why."""
    from st3.budget import at_budget
    from st3.spec import parse

    out = []
    for spec in specs:
        choice = parse(spec)
        for budget in budgets:
            if spec in refused:
                out.append((spec, budget, None, refused[spec]))
                continue
            try:
                method = at_budget(choice.name, choice.knobs, budget, shape, visual, text)
                method.validate_for(shape.num_layers)
                out.append((spec, budget, method, ""))
            except (ValueError, TypeError) as error:
                out.append((spec, budget, None, str(error)))
    return out


def run_frontier(config: FrontierConfig) -> dict:
    """Time every reachable (method, budget) against the unpruned model, interleaved; join the accuracies."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    accuracy = read_accuracy(config.accuracy)
    specs = config.methods or default_methods(accuracy)
    refused = check_specs(specs, explicit=config.methods is not None)
    started = time.time()
    device = resolve_device(config.device)
    load_start = time.perf_counter()
    model, source = load(config, device)
    build_s = time.perf_counter() - load_start
    adapter = adapter_for(model)
    inputs = bench_inputs(model, 1, config.text_before, config.text_after)
    (visual,), (text,) = adapter.token_counts(inputs)
    plans = configure(specs, config.budgets, adapter.shape, visual, text, refused)
    entries = [Resolved(UNPRUNED, UNPRUNED, None, {})] + [
        Resolved(f"{spec} @ {budget:.0%}", spec, method, method.knobs()) for spec, budget, method, _ in plans if method
    ]
    bar = tqdm(total=(config.warmup + config.repeats) * len(entries), desc="frontier", unit="run",
               disable=not config.progress, file=sys.stderr)  # fmt: skip
    samples = interleaved(
        range(len(entries)),
        lambda i: measure_generate(model, inputs, config.answers[1], entries[i].method, config.clock),
        config.repeats,
        config.warmup,
        warm=lambda i: measure_generate(model, inputs, min(config.answers[1], WARMUP_TOKENS), entries[i].method,
                                        config.clock),  # fmt: skip
        tick=bar.update,
    )
    bar.close()
    flops = unpruned_flops(adapter.shape, [inputs["input_ids"].shape[1]], config.answers[1])
    timed = times(config)
    runs = {e.label: summarise(e, samples[i], flops) | token_times(samples[i], timed) for i, e in enumerate(entries)}
    shown = config.warmup >= 1 and config.repeats >= 2
    rows = [row(spec, b, why, runs, samples, entries, accuracy, timed if shown else {}) for spec, b, _, why in plans]
    notes = [timing(config), budget_note(visual, accuracy)]
    if not shown:
        notes.append("times not shown: they need a warm-up and at least 2 repeats (--warmup 1 --repeats 3); the "
                     "per-run samples are in the JSON for sizing a run only")  # fmt: skip
    header = meta(config, model, adapter.shape, source, device, build_s, started)
    header["timing"] = timing(config)
    return {
        "meta": header,
        "visual_tokens": visual,
        "text_tokens": text,
        "unpruned": {"qa": accuracy["table"].get(("unpruned", 1.0, "qa")),
                     "caption": accuracy["table"].get(("unpruned", 1.0, "caption"))},  # fmt: skip
        "accuracy_sources": accuracy["sources"],
        "rows": rows,
        "runs": runs,
        "notes": notes,
        "answer_tokens": timed,
        "times_shown": shown,
    }


def token_times(samples: list[Sample], timed: dict[str, int]) -> dict:
    """Spread of the time to each timed token over the repeats, and each run's."""
    runs = {name: [s.token_s[k - 1] for s in samples] for name, k in timed.items()}
    return {f"{name}_s": spread(values) for name, values in runs.items()} | {"token_s_samples": runs}


def row(spec, budget, why, runs, samples, entries, accuracy, timed: dict[str, int]) -> dict:
    """One (method, budget): its speed-ups (of the `timed` tokens; none shown: None) and KV ratio against the
    unpruned run, and its accuracies."""
    label = f"{spec} @ {budget:.0%}"
    key = round(budget, 4)
    out = {
        "method": spec,
        "budget": budget,
        "reachable": not why,
        "unreachable": why or None,
        "qa": accuracy["table"].get((spec, key, "qa")),
        "caption": accuracy["table"].get((spec, key, "caption")),
        "accuracy_note": next((n for n in accuracy["notes"] if n.startswith(f"{spec} at {budget:.0%}:")), None),
    }
    if why:
        return out
    run, base = runs[label], runs[UNPRUNED]
    index = [e.label for e in entries].index(label)
    rounds = list(zip(samples[0], samples[index]))  # the same round's unpruned and method runs
    out["knobs"] = run["knobs"]
    out["visual_per_layer"] = run["trace"]["mean_visual_per_layer"] if run["trace"] else None
    against = ratios(base, run)
    out["kv_ratio"], out["flops_speedup_total"] = against["kv_ratio"], against["flops_speedup_total"]
    for name in ("ttft", "short", "long"):
        k = timed.get(name)
        out[f"{name}_speedup"] = base[f"{name}_s"]["median"] / run[f"{name}_s"]["median"] if k else None
        out[f"{name}_speedup_rounds"] = spread([a.token_s[k - 1] / b.token_s[k - 1] for a, b in rounds]) if k else None
    return out


def budget_note(visual: int, accuracy: dict) -> str:
    """What a budget is here and there: the same share, at two shapes."""
    there = "; ".join(f"{s['path']}: {s['visual_tokens']} visual tokens, {s['num_layers']} layers"
                      for s in accuracy["sources"]) or "no accuracy file"  # fmt: skip
    return (
        "budget = mean visual tokens per layer after prefill / the prompt's visual tokens, matched by "
        f"st3.budget.at_budget as st3 eval does: here {visual} visual tokens at the timed shape; accuracy from "
        f"{there}"
    )


# ------------------------------------------------------------------------------------------- showing
def fmt_ratio(value: float | None, rounds: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{rounds['min']:.2f}-{rounds['max']:.2f}]" if rounds["n"] > 1 else f"{value:.2f}"


def time_heads(result: dict) -> dict[str, str]:
    tokens = result["answer_tokens"]
    return {"ttft": "TTFT", "short": f"e2e@{tokens['short']}", "long": f"e2e@{tokens['long']}"}


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_frontier(result: dict) -> None:
    """The joined table (speed-ups with the range of per-round ratios), the measured times, then the notes."""
    from rich.console import Console
    from rich.markup import escape

    from st3.bench.report import _table, fmt_spread, spread_label

    console = Console(width=None if sys.stdout.isatty() else 160)
    meta = result["meta"]
    console.print(escape(f"st3 frontier: {meta['model']['source']} ({meta['shape_text']}), {meta['dtype']}, on "
                         f"{meta['device_name']} ({meta['threads']} threads), {meta['config']['clock']} clock; "
                         f"{spread_label(meta['config']['repeats'])}"))  # fmt: skip
    heads = time_heads(result)
    table = _table("speed-up vs unpruned (x faster; [min-max] of the per-round ratios) and accuracy",
                   ("method", "budget", *(f"{h} x" for h in heads.values()), "KV peak", "QA acc", "caption acc"))
    unpruned = result["unpruned"]
    table.add_row("unpruned", "100%", "1", "1", "1", "1", fmt_acc(unpruned["qa"]), fmt_acc(unpruned["caption"]))
    for r in result["rows"]:
        if not r["reachable"]:
            table.add_row(escape(r["method"]), f"{r['budget']:.0%}", "unreachable", "", "", "", fmt_acc(r["qa"]),
                          fmt_acc(r["caption"]))  # fmt: skip
            continue
        cells = [fmt_ratio(r[f"{name}_speedup"], r[f"{name}_speedup_rounds"]) for name in heads]
        table.add_row(escape(r["method"]), f"{r['budget']:.0%}", *cells, f"{r['kv_ratio']:.2f}", fmt_acc(r["qa"]),
                      fmt_acc(r["caption"]))  # fmt: skip
    console.print(table)
    if result["times_shown"]:
        seconds = _table("measured seconds, median [min-max]", ("method", *(f"{h} s" for h in heads.values())))
        for label, run in result["runs"].items():
            seconds.add_row(escape(label), *(escape(fmt_spread(run[f"{name}_s"])) for name in heads))
        console.print(seconds)
    for r in result["rows"]:
        if not r["reachable"]:
            console.print(escape(f"unreachable: {r['method']} at {r['budget']:.0%}: {r['unreachable']}"))
    for note in result["notes"] + meta["notes"]:
        console.print(escape(f"note: {note}"))


def write_plot(result: dict, path: str | Path) -> None:
    """QA accuracy vs measured speed-up, one panel per time (TTFT, short and long answer): a line per method
    through its budgets, the unpruned model at (1, its accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^vP*Xhp<>"
    tokens = result["answer_tokens"]
    titles = {"ttft": "time to first token", "short": f"short answer ({tokens['short']} tokens)",
              "long": f"long answer ({tokens['long']} tokens)"}  # fmt: skip
    fig, axes = plt.subplots(1, len(titles), figsize=(5.5 * len(titles), 4.5), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for ax, name in zip(axes[0], titles):
        for i, method in enumerate(methods):
            points = [(r[f"{name}_speedup"], r["qa"], r["budget"]) for r in result["rows"]
                      if r["method"] == method and r.get(f"{name}_speedup") is not None and r["qa"] is not None]
            if not points:
                continue
            xs, ys, budgets = zip(*sorted(points))
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=method)
            for x, y, b in points:
                ax.annotate(f"{b:.0%}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if result["unpruned"]["qa"] is not None:
            ax.plot([1.0], [result["unpruned"]["qa"]], marker="*", color="black", markersize=12, linestyle="",
                    label="unpruned")  # fmt: skip
        ax.set_xlabel(f"measured speed-up vs unpruned: {titles[name]}")
        ax.set_title(titles[name])
        ax.grid(alpha=0.3)
        ax.axvline(1.0, color="grey", lw=0.8)
    axes[0][0].set_ylabel("QA accuracy (st3 eval)")
    axes[0][-1].legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(f"st3 frontier: {meta['model']['source']} ({meta['shape_text']}), {meta['dtype']}, "
                 f"{meta['device_name']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(config: FrontierConfig, json_path: str | None = None, plot_path: str | None = None) -> dict:
    """Run, print the table, write the JSON and the PNG when asked."""
    from st3.bench.report import write_json

    result = run_frontier(config)
    print_frontier(result)
    if json_path:
        write_json(result, json_path)
    if plot_path:
        write_plot(result, plot_path)
    return result
