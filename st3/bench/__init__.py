"""`st3 bench`: speed and memory of vanilla vs token-trimming methods at real model shapes.

shapes.py builds models (real decoder/projector shapes, random weights, meta-device build) and prompts;
methods.py picks the methods (registry names, matched cost); measure.py times one generate and reads its
memory; run.py runs the interleaved blocks; report.py prints the table and writes JSON and PNG.
"""

from __future__ import annotations

from st3.bench.run import BenchConfig, run_bench


def main(config: BenchConfig, json_path: str | None = None, plot_path: str | None = None) -> dict:
    """Run the benchmark, print the table, and write the JSON and PNG when asked."""
    from st3.bench.report import print_report, write_json, write_plot

    result = run_bench(config)
    print_report(result)
    if json_path:
        write_json(result, json_path)
    if plot_path:
        write_plot(result, plot_path)
    return result


__all__ = ["BenchConfig", "main", "run_bench"]
