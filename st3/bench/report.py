"""Showing a benchmark result: a terminal table, a JSON file and a PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

GIB = 1024**3
MIB = 1024**2


def fmt_spread(stats: dict, scale: float = 1.0, digits: int = 3) -> str:
    """'median [min-max]' scaled, e.g. seconds to milliseconds."""
    med, lo, hi = (stats[k] * scale for k in ("median", "min", "max"))
    if stats.get("n", 1) < 2:
        return f"{med:.{digits}g}"
    return f"{med:.{digits}g} [{lo:.{digits}g}-{hi:.{digits}g}]"


def spread_label(repeats: int) -> str:
    """What the figures are: a median with its range, or single runs (no spread to show)."""
    if repeats < 2:
        return "one timed run per method, no spread"
    return f"median [min-max] over {repeats} interleaved repeats"


def print_report(result: dict, console: Console | None = None) -> None:
    """Per (batch size, new tokens) block: a table of measurements and one of ratios; then the notes."""
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    meta = result["meta"]
    console.print(
        escape(
            f"st3 bench: {meta['model']['source']} ({meta['shape_text']}), {meta['dtype']}, "
            f"{meta['config']['attn']} attention, on {meta['device_name']} ({meta['threads']} threads); "
            f"{spread_label(meta['config']['repeats'])}"
        )
    )
    for block in result["runs"]:
        if "skipped" in block:
            console.print(f"batch {block['batch_size']}, {block['new_tokens']} tokens: skipped ({block['skipped']})")
            continue
        console.print(measured_table(block))
        if block["ratios"]:
            console.print(ratio_table(block))
        for note in block["notes"]:
            console.print(escape(f"  note: {note}"))
    for note in meta["notes"]:
        console.print(escape(f"note: {note}"))


def measured_table(block: dict) -> Table:
    title = (
        f"batch {block['batch_size']}, {block['new_tokens']} new tokens, prompt {block['prompt_tokens']} tokens "
        f"({block['visual_tokens']} visual): measured"
    )
    table = _table(
        title,
        ("method", "prefill s", "decode ms/tok", "end-to-end s", "tok/s", "KV peak/end MiB", "RSS peak GiB", "GFLOPs"),
    )
    for label, m in block["methods"].items():
        table.add_row(
            escape(label),
            escape(fmt_spread(m["prefill_s"])),
            escape(fmt_spread(m["decode_s_per_token"], 1e3)),
            escape(fmt_spread(m["e2e_s"])),
            f"{m['e2e_tokens_per_s']['median']:.3g}",
            f"{m['kv_bytes_peak'] / MIB:.1f} / {m['kv_bytes_final'] / MIB:.1f}",
            f"{m['rss_peak_bytes'] / GIB:.2f}",
            f"{m['flops']['total'] / 1e9:.4g}",
        )
    return table


def ratio_table(block: dict) -> Table:
    table = _table(
        f"batch {block['batch_size']}, {block['new_tokens']} new tokens: vs vanilla (speed-ups are x faster)",
        ("method", "prefill x", "decode x", "e2e x", "KV peak", "KV end")
        + ("FLOPs x pre", "FLOPs x all", "eff pre", "eff e2e"),
    )
    for label, r in block["ratios"].items():
        keys = ("prefill_speedup", "decode_speedup", "e2e_speedup", "kv_ratio", "kv_ratio_final")
        keys += ("flops_speedup_prefill", "flops_speedup_total", "efficiency_prefill", "efficiency_e2e")
        table.add_row(escape(label), *(f"{r[k]:.2f}" for k in keys))
    return table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=escape(title))
    for name in columns:
        table.add_column(name, justify="left" if name == "method" else "right")
    return table


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_jsonable, allow_nan=True) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


RATIO_KEYS = (
    ("prefill_speedup", "prefill speed-up"),
    ("decode_speedup", "decode speed-up"),
    ("e2e_speedup", "end-to-end speed-up"),
    ("flops_speedup_total", "FLOPs speed-up (theory)"),
    ("kv_ratio", "KV-cache ratio (peak)"),
    ("kv_ratio_final", "KV-cache ratio (end)"),
    ("efficiency_e2e", "efficiency (e2e / FLOPs)"),
)


def write_plot(result: dict, path: str | Path) -> None:
    """Per block: ratio bars per method, KV bytes per layer, and visual tokens per layer over decode steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [b for b in result["runs"] if "skipped" not in b]
    if not blocks:
        return
    pruners = max(len(b["ratios"]) for b in blocks)
    cols = 2 + max(pruners, 1)
    fig, axes = plt.subplots(len(blocks), cols, figsize=(5 * cols, 4 * len(blocks)), squeeze=False)
    for row, block in zip(axes, blocks):
        tag = f"batch {block['batch_size']}, {block['new_tokens']} tok"
        plot_ratios(row[0], block, tag)
        plot_kv_per_layer(row[1], block, tag)
        traced = [(label, m["trace"]) for label, m in block["methods"].items() if m["trace"]]
        for ax, (label, trace) in zip(row[2:], traced):
            plot_visual(fig, ax, trace, f"{label}: visual tokens ({tag})")
        for ax in row[2 + len(traced) :]:
            ax.axis("off")
    meta = result["meta"]
    fig.suptitle(f"st3 bench: {meta['model']['source']} ({meta['shape_text']}), {meta['dtype']}, {meta['device_name']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ratios(ax, block: dict, tag: str) -> None:
    labels = list(block["ratios"])
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [block["ratios"][label][key] for key, _ in RATIO_KEYS]
        values = [0.0 if math.isnan(v) else v for v in values]
        ax.bar([k + i * width for k in range(len(RATIO_KEYS))], values, width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(RATIO_KEYS))])
    ax.set_xticklabels([name for _, name in RATIO_KEYS], rotation=30, ha="right", fontsize=8)
    ax.set_title(f"vs vanilla ({tag})")
    if labels:
        ax.legend(fontsize=7)


def plot_kv_per_layer(ax, block: dict, tag: str) -> None:
    for label, m in block["methods"].items():
        ax.plot([b / MIB for b in m["kv_bytes_per_layer"]], marker=".", label=label)
    top = max((b for m in block["methods"].values() for b in m["kv_bytes_per_layer"]), default=0) / MIB
    ax.set_xlabel("layer")
    ax.set_ylabel("KV cache at the end (MiB)")
    ax.set_ylim(0, top * 1.1 or 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"KV cache per layer ({tag})")
    ax.legend(fontsize=7)


def plot_visual(fig, ax, trace: dict, title: str) -> None:
    steps = trace["visual_over_steps"]  # [step][layer], row 0 after prefill
    grid = [list(col) for col in zip(*steps)]  # [layer][step]
    image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", vmin=0)
    ax.set_xlabel("decode step (0 = after prefill)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)


def markdown(result: dict) -> str:
    """The result's blocks as Markdown tables (what benchmarks/README.md quotes), straight from the JSON."""
    lines = []
    for block in result["runs"]:
        if "skipped" in block:
            lines.append(f"batch {block['batch_size']}, {block['new_tokens']} tokens: skipped ({block['skipped']})\n")
            continue
        n = block["methods"]["vanilla"]["prefill_s"]["n"]
        lines.append(
            f"**batch {block['batch_size']}, {block['new_tokens']} new tokens** (prompt {block['prompt_tokens']} "
            f"tokens, {block['visual_tokens']} visual; {spread_label(n)})\n"
        )
        lines.append(
            "| method | prefill s | decode ms/token | end-to-end s | tokens/s | KV peak / end MiB | RSS peak GiB |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for label, m in block["methods"].items():
            cells = (
                fmt_spread(m["prefill_s"]),
                fmt_spread(m["decode_s_per_token"], 1e3),
                fmt_spread(m["e2e_s"]),
                f"{m['e2e_tokens_per_s']['median']:.3g}",
                f"{m['kv_bytes_peak'] / MIB:.1f} / {m['kv_bytes_final'] / MIB:.1f}",
                f"{m['rss_peak_bytes'] / GIB:.2f}",
            )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "| vs vanilla | prefill x | decode x | end-to-end x | KV ratio peak / end | FLOPs x (prefill / all) | "
            "efficiency (prefill / e2e) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for label, r in block["ratios"].items():
            lines.append(
                f"| {label} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | {r['e2e_speedup']:.2f} | "
                f"{r['kv_ratio']:.2f} / {r['kv_ratio_final']:.2f} | "
                f"{r['flops_speedup_prefill']:.2f} / {r['flops_speedup_total']:.2f} | "
                f"{r['efficiency_prefill']:.2f} / {r['efficiency_e2e']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m st3.bench.report RESULT.json ...: Markdown tables
    for name in sys.argv[1:]:
        print(markdown(json.loads(Path(name).read_text())))
