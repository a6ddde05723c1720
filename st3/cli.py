"""The `st3` command line: one sub-command per main job."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trim visual tokens of vision-language models.")


@app.command()
def demo(
    max_new_tokens: int = typer.Option(24, help="Tokens to generate per run."),
    json_out: str = typer.Option("", "--json", help="Also write the comparison as JSON to this path."),
) -> None:
    """Generate with and without ST3 on the embedded default model and compare cost side by side."""
    from st3.demo import run_demo

    run_demo(max_new_tokens=max_new_tokens, json_path=json_out or None)


if __name__ == "__main__":
    app()
