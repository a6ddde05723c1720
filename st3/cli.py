"""The `st3` command line: one sub-command per main job."""

from __future__ import annotations

try:
    import typer
except ModuleNotFoundError as error:  # the library itself needs only torch and transformers
    raise SystemExit(f"the st3 command needs its extra ({error.name} is missing): pip install 'st3[cli]'") from error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trim visual tokens of vision-language models.")


@app.callback()
def main() -> None:
    """st3: spatial-temporal visual token trimming for vision-language models."""


METHOD = "A method: name or name:knob=value,... (see `st3 methods`), e.g. spread:keep=108."
KNOB = "A knob of the method as KNOB=VALUE, on top of the spec's; repeatable."
REPEATS = "Timed runs of each side, interleaved, after a warm-up (0: no wall times)."


def chosen_method(spec: str, knobs: list[str]):
    """The method of `-m SPEC` and `--knob K=V` options, or a usage error naming the bad knob."""
    from st3.spec import build

    try:
        return build(spec, knobs)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--method / --knob") from None


@app.command()
def demo(
    method: str = typer.Option("st3", "--method", "-m", help=METHOD),
    knob: list[str] = typer.Option([], "--knob", help=KNOB),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per run."),
    repeats: int = typer.Option(3, min=0, help=REPEATS),
    json_out: str = typer.Option("", "--json", help="Also write the comparison as JSON to this path."),
    plot: str = typer.Option("st3-demo.png", help="Where to draw the patches kept per layer ('' for none)."),
) -> None:
    """Generate with and without ST3 (or --method) on the embedded default model and compare side by side."""
    from st3.demo import run_demo

    chosen = chosen_method(method, knob)
    run_demo(max_new_tokens=max_new_tokens, json_path=json_out or None, plot_path=plot or None, method=chosen,
             repeats=repeats)  # fmt: skip


@app.command()
def bench(
    model: str = typer.Option(
        "llava-1.5-7b",
        help="Shape (`st3.models.SPECS`): llava-1.5-7b, llava-1.5-13b, llava-next-7b, llava-onevision-7b, "
        "internvl3-8b, smolvlm-2b, qwen2.5-vl-7b, qwen3-vl-8b, gemma3-4b or tiny.",
    ),
    model_dir: str = typer.Option("", help="A local LLaVA checkpoint to load instead of a random shape."),
    layers: int = typer.Option(0, help="Keep only the first N decoder layers (quick runs; reported)."),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="Repeatable: name, name:knob=value,... or name:match. Default: st3 + matched peers."
    ),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    new_tokens: str = typer.Option("64", help="Comma-separated numbers of generated tokens."),
    repeats: int = typer.Option(3, help="Timed runs per method (interleaved)."),
    warmup: int = typer.Option(1, help="Untimed warm-up runs per method."),
    dtype: str = typer.Option("bf16", help="fp32, bf16 or fp16."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    attn: str = typer.Option("sdpa", help="Attention backend: sdpa, eager or flash_attention_2."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    clock: str = typer.Option("wall", help="wall, process or thread (CPU time: robust on a shared CPU)."),
    json_out: str = typer.Option("", "--json", help="Write the full result as JSON to this path."),
    plot: str = typer.Option("", help="Write a PNG of ratios, KV per layer and visual tokens to this path."),
    overhead: bool = typer.Option(
        False,
        "--overhead",
        help="Instead: the engine's per-step overhead on a launch-bound proxy (st3.bench.overhead).",
    ),
) -> None:
    """Speed and memory of vanilla vs token-trimming methods at real model shapes (random weights)."""
    if overhead:
        from st3.bench.overhead import overhead as proxy

        options = {"layers": layers or 32, "repeats": repeats, "warmup": warmup, "clock": clock,
                   "threads": threads or 1, "device": "cpu" if device == "auto" else device}  # fmt: skip
        try:
            proxy(list(method) or None, json_out or None, **options)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
        return
    from st3.bench import BenchConfig, main
    from st3.spec import dtype_name

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
            dtype=dtype_name(dtype, ("fp32", "bf16", "fp16")),
            device=device,
            attn=attn,
            threads=threads or None,
            clock=clock,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    main(config, json_path=json_out or None, plot_path=plot or None)


@app.command()
def frontier(
    model: str = typer.Option("llava-1.5-7b", help="Shape to time (`st3.models.SPECS`, see st3 bench --model)."),
    layers: int = typer.Option(0, help="Keep only the first N decoder layers (quick runs; reported)."),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="Repeatable: name or name:knob=value,... (the budget knob is matched), as in the "
        "accuracy file. Default: every method the --accuracy files scored (else every registered method).",
    ),
    budget: list[float] = typer.Option([0.5, 0.33, 0.22, 0.11], help="Shares of visual tokens per layer (st3 eval's)."),
    accuracy: list[str] = typer.Option([], help="An `st3 eval --json` file whose accuracies are joined; repeatable."),
    repeats: int = typer.Option(3, help="Timed rounds (each runs every configuration once, interleaved)."),
    warmup: int = typer.Option(1, help="Untimed warm-up rounds."),
    dtype: str = typer.Option("bf16", help="fp32, bf16 or fp16."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    clock: str = typer.Option("wall", help="wall, process or thread (CPU time: robust on a shared CPU)."),
    json_out: str = typer.Option("", "--json", help="Write everything (settings, machine, every run) to this path."),
    plot: str = typer.Option("", help="Write a PNG of QA accuracy vs measured speed-up to this path."),
) -> None:
    """Accuracy (from st3 eval) vs measured speed-up (TTFT, 8- and 64-token answers) and KV at matched budgets."""
    from st3.bench.frontier import FrontierConfig, main
    from st3.spec import dtype_name

    try:
        config = FrontierConfig(model=model, layers=layers or None, methods=list(method) or None, repeats=repeats,
                                warmup=warmup, dtype=dtype_name(dtype, ("fp32", "bf16", "fp16")), device=device,
                                threads=threads or None, clock=clock, budgets=list(budget),
                                accuracy=list(accuracy))  # fmt: skip
        main(config, json_path=json_out or None, plot_path=plot or None)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None


@app.command()
def plan(
    method: str = typer.Option("st3", "--method", "-m", help=METHOD),
    knob: list[str] = typer.Option([], "--knob", help=KNOB),
    shape: str = typer.Option("llava-1.5-7b", help="Decoder shape: one of `st3.models.SPECS` (see st3 bench --model)."),
    visual: int = typer.Option(None, help="Visual tokens in the prompt (default: the shape's bench image's)."),
    text: int = typer.Option(60, help="Other prompt tokens."),
    new_tokens: int = typer.Option(64, help="Generated tokens."),
    tokens: float = typer.Option(None, help="Match the budget knob to this many visual tokens per layer (st3.match)."),
    budget: float = typer.Option(None, help="Match the budget knob to this share of the visual tokens per layer."),
    json_out: str = typer.Option("", "--json", help="Write the plan as JSON to this path."),
) -> None:
    """Print what a method does at a model shape, and what it costs, without running a model."""
    import dataclasses
    import json

    from st3.models import SPECS
    from st3.plan import SHAPES
    from st3.plan import plan as make_plan

    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}", param_hint="--shape")
    if visual is None:
        visual = SPECS[shape].visual_tokens  # counted by the family's adapter (anyres, tiles, crops, merged patches)
    chosen = chosen_method(method, knob)
    try:
        if tokens is not None or budget is not None:
            from st3.budget import match

            chosen = match(chosen, tokens=tokens, budget=budget, shape=SHAPES[shape], visual=visual, text=text,
                           new_tokens=new_tokens)  # fmt: skip
        result = make_plan(chosen, SHAPES[shape], visual=visual, text=text, new_tokens=new_tokens)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"{chosen!r} on {shape}: {visual} visual + {text} text tokens, {new_tokens} generated")
    typer.echo("visual tokens per layer after prefill: " + " ".join(map(str, result.prefill_visual)))
    typer.echo("visual tokens per layer at the end:    " + " ".join(map(str, result.final_visual)))
    typer.echo(f"mean visual tokens per layer (prefill): {result.mean_visual_per_layer:.1f}")
    typer.echo(f"prefill FLOPs: {result.prefill_flops_ratio:.1%} of unpruned")
    typer.echo(f"total FLOPs:   {result.total_flops_ratio:.1%} of unpruned")
    typer.echo(f"KV cache at the end: {result.kv_ratio:.1%} of unpruned")
    if json_out:
        payload = dataclasses.asdict(result) | {"method": repr(chosen), "shape": shape}
        with open(json_out, "w") as f:
            json.dump(payload, f, indent=2)


@app.command("methods")
def list_methods() -> None:
    """The registered methods: what each does, and its knobs with their defaults (`-m name:knob=value`)."""
    import textwrap

    from st3.catalogue import CATALOGUE  # a table generated from the registry: no torch import, a fast answer

    for name, (text, knobs) in CATALOGUE.items():
        typer.echo(typer.style(name, bold=True) + "  " + text)
        typer.echo(textwrap.fill(knobs, 110, initial_indent="    ", subsequent_indent="    "))


@app.command("eval")
def scenes_eval(
    model_dir: str = typer.Argument(..., help="A scenes LLaVA directory (e.g. scenes/st3_scenes/assets/scenes-llava)."),
    split: str = typer.Option("test", help="train, validation or test."),
    method: list[str] = typer.Option(
        ["st3", "spread", "fastv", "pyramiddrop", "visionzip", "random"],
        "--method",
        "-m",
        help="Repeatable: name or name:knob=value,... (fixed knobs; the budget knob is matched). "
        "Default: st3, spread (st3's best rule), fastv, pyramiddrop, visionzip, random.",
    ),
    budget: list[float] = typer.Option([1.0, 0.5, 0.33, 0.22, 0.11], help="Shares of visual tokens per layer."),
    qa: int = typer.Option(200, help="One-word questions per method and budget."),
    captions: int = typer.Option(50, help="Captions per method and budget."),
    batch_size: int = typer.Option(16),
    first: int = typer.Option(0, help="Index of the split's first example (a held-out range of seeds)."),
    json_out: str = typer.Option("", "--json", help="Write the rows as JSON to this path."),
    plot: str = typer.Option("", help="Write a PNG of accuracy vs prefill FLOPs to this path."),
) -> None:
    """Accuracy of each method at matched budgets on the synthetic scenes benchmark (the scenes package)."""
    import importlib.util

    if importlib.util.find_spec("st3_scenes") is None:
        raise SystemExit(
            "st3 eval runs the scenes benchmark, which is not part of the st3 wheel: in a clone of the repository, "
            "`make install` (or `pip install --no-deps -e scenes/`) installs it"
        )
    from st3_scenes.evaluate import evaluate as run
    from st3_scenes.evaluate import print_table, write_json, write_plot

    try:
        result = run(model_dir, split, tuple(method), tuple(budget), qa, captions, batch_size, first)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from None
    print_table(result)
    if json_out:
        write_json(result, json_out)
    if plot:
        write_plot(result, plot)


@app.command("search")
def scenes_search(
    model_dir: str = typer.Argument(..., help="A scenes LLaVA directory (e.g. scenes/st3_scenes/assets/scenes-llava)."),
    form: str = typer.Option("gsearch", help="gsearch (per-layer counts) or psigmoid (a sigmoid fitted to --budget)."),
    qa: int = typer.Option(200, help="Validation questions every trial schedule answers."),
    tolerance: float = typer.Option(0.01, help="gsearch: accuracy a schedule may lose against the unpruned model."),
    first_layer: int = typer.Option(1, help="gsearch: the first layer searched (those before it keep every token)."),
    budget: float = typer.Option(0.33, help="psigmoid: the share of the visual tokens kept per layer on average."),
    batch_size: int = typer.Option(16),
    json_out: str = typer.Option("", "--json", help="Write the result and its trials as JSON to this path."),
) -> None:
    """G-Search or a P-Sigmoid fit on the scenes validation split: how many visual tokens each layer keeps (a
    method spec)."""
    import importlib.util
    import json

    if form not in ("gsearch", "psigmoid"):
        raise typer.BadParameter(f"form: must be 'gsearch' or 'psigmoid', got {form!r}")
    if importlib.util.find_spec("st3_scenes") is None:
        raise SystemExit("st3 search runs on the scenes benchmark: `make install` (or `pip install --no-deps -e "
                         "scenes/`) installs it")  # fmt: skip
    from st3_scenes.search import fit_psigmoid, search

    try:
        if form == "gsearch":
            result = search(model_dir, qa, tolerance, first_layer, batch_size)
        else:
            result = fit_psigmoid(model_dir, budget, qa, batch_size=batch_size)
    except (ValueError, OSError) as error:
        raise typer.BadParameter(str(error)) from None
    if form == "gsearch":
        typer.echo(
            f"unpruned {result['unpruned']:.1%}, schedule {result['accuracy']:.1%} on {qa} validation "
            f"questions; visual tokens per layer {result['counts_per_layer']} ({result['trials']} trials)"
        )
    else:
        best = result["best"]
        typer.echo(
            f"unpruned {result['unpruned']:.1%}, psigmoid {result['accuracy']:.1%} on {qa} validation "
            f"questions at budget {budget:g} (steepness {best['steepness']:g}, floor {best['floor']:g}, "
            f"midpoint {best['midpoint']:.3f}; {len(result['trials'])} trials)"
        )
    typer.echo(f"-m {result['spec']}")
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(result, handle, indent=1)


@app.command()
def generate(
    model: str = typer.Argument(..., help="A LLaVA or Qwen-VL checkpoint directory, or a hub id in the local cache."),
    image: str = typer.Option(..., help="The image to ask about."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A question; repeatable (answered as a batch)."),
    method: str = typer.Option("st3", "--method", "-m", help=METHOD),
    knob: list[str] = typer.Option([], "--knob", help=KNOB),
    max_new_tokens: int = typer.Option(64),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16 or fp16."),
    repeats: int = typer.Option(3, min=0, help=REPEATS),
    plot: str = typer.Option("", help="Write a PNG of the patches kept per layer (prefill and decoding) to this path."),
    json_out: str = typer.Option("", "--json", help="Write answers and costs as JSON to this path."),
) -> None:
    """Answer prompts about an image unpruned and under a method; compare answers, KV, FLOPs and wall time."""
    import json

    from st3.compare import compare, load, open_image, print_comparison, report
    from st3.viz import plot_kept_patches

    chosen = chosen_method(method, knob)
    try:
        picture = open_image(image)
        loaded, processor = load(model, dtype, chosen)  # checks the method against the config before the weights
        result = compare(loaded, processor, picture, list(prompt), chosen, max_new_tokens, repeats)
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error)) from None
    print_comparison(result)
    if plot:
        plot_kept_patches(picture, result["run_trace"], result["image_columns"], plot,
                          title=f"{chosen.label}: patches kept", grids=result.get("image_grids"))  # fmt: skip
        typer.echo(f"wrote {plot}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report(result), f, indent=2, default=str)


if __name__ == "__main__":
    app()
