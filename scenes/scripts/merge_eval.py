"""Merge several `st3 eval --json` files of the same model, split and range into one table, JSON and PNG.

    python scenes/scripts/merge_eval.py OUT.json OUT.png IN.json [IN.json ...]

Lets one evaluation run as parallel processes (one per group of methods). The unpruned rows must agree
across the inputs (they are the same greedy answers); the first input's are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from st3_scenes.evaluate import print_table, write_json, write_plot


def merge(paths: list[str]) -> dict:
    results = [json.loads(Path(path).read_text()) for path in paths]
    first = results[0]
    for other in results[1:]:
        for key in ("model", "split", "first", "visual_tokens", "num_layers"):
            if other.get(key) != first.get(key):
                raise ValueError(f"{key} differs between inputs: {first.get(key)!r} vs {other.get(key)!r}")
    unpruned = {r["task"]: r["accuracy"] for r in first["rows"] if r["method"] == "unpruned"}
    rows, notes = list(first["rows"]), list(first["notes"])
    for other in results[1:]:
        for row in other["rows"]:
            if row["method"] == "unpruned":
                if row["accuracy"] != unpruned.get(row["task"]):
                    raise ValueError(f"unpruned {row['task']} accuracy differs between inputs")
                continue
            rows.append(row)
        notes.extend(other["notes"])
    return {**first, "rows": rows, "notes": notes}


if __name__ == "__main__":
    out_json, out_png, *inputs = sys.argv[1:]
    merged = merge(inputs)
    print_table(merged)
    write_json(merged, out_json)
    write_plot(merged, out_png)
