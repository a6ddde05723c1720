"""The `st3` command line: one sub-command per main job."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trim visual tokens of vision-language models.")


@app.callback()
def main() -> None:
    """st3: spatial-temporal visual token trimming for vision-language models."""


@app.command()
def demo(
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per run."),
    json_out: str = typer.Option("", "--json", help="Also write the comparison as JSON to this path."),
    plot: str = typer.Option("st3-demo.png", help="Where to draw the patches kept per layer ('' for none)."),
) -> None:
    """Generate with and without ST3 on the embedded default model and compare cost side by side."""
    from st3.demo import run_demo

    run_demo(max_new_tokens=max_new_tokens, json_path=json_out or None, plot_path=plot or None)


@app.command()
def bench(
    model: str = typer.Option("llava-1.5-7b", help="Shape: llava-1.5-7b, llava-1.5-13b, llava-next-7b or tiny."),
    model_dir: str = typer.Option("", help="A local LLaVA checkpoint to load instead of a random shape."),
    layers: int = typer.Option(0, help="Keep only the first N decoder layers (quick runs; reported)."),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="Repeatable: name, name:knob=value,... or name:match. Default: st3 + matched peers."
    ),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    new_tokens: str = typer.Option("64", help="Comma-separated numbers of generated tokens."),
    repeats: int = typer.Option(3, help="Timed runs per method (interleaved)."),
    warmup: int = typer.Option(1, help="Untimed warm-up runs per method."),
    dtype: str = typer.Option("bf16", help="fp32, fp16 or bf16."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    json_out: str = typer.Option("", "--json", help="Write the full result as JSON to this path."),
    plot: str = typer.Option("", help="Write a PNG of ratios, KV per layer and visual tokens to this path."),
) -> None:
    """Speed and memory of vanilla vs token-trimming methods at real model shapes (random weights)."""
    from st3.bench import BenchConfig, main

    try:
        config = BenchConfig(
            model=model,
            model_dir=model_dir or None,
            layers=layers or None,
            methods=list(method) or None,
            batch_sizes=[int(b) for b in batch_sizes.split(",")],
            new_tokens=[int(n) for n in new_tokens.split(",")],
            repeats=repeats,
            warmup=warmup,
            dtype=dtype,
            device=device,
            threads=threads or None,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    main(config, json_path=json_out or None, plot_path=plot or None)

if __name__ == "__main__":
    app()
