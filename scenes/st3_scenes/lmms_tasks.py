"""The scenes benchmark as offline lmms-eval tasks: `st3_scenes_qa` and `st3_scenes_caption`.

    python -m st3_scenes.lmms_tasks runs/lmms-tasks --split test --qa 200 --captions 50
    lmms-eval --model st3_llava_hf --model_args pretrained=scenes/st3_scenes/assets/scenes-llava,method=st3 \\
        --tasks st3_scenes_qa --include_path runs/lmms-tasks --limit 200

The examples are `st3_scenes.tasks.example(split, i, task)` for i in [0, n): the same ones `st3 eval` and
`python -m st3_scenes.evaluate` use. They are written to local files (a `datasets` dataset saved with
`save_to_disk`, images as PNG, plus each task's YAML), so lmms-eval loads them with no hub access. Scoring is
exact match of the stripped answer, as in `st3 eval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASKS = {"st3_scenes_qa": "qa", "st3_scenes_caption": "caption"}
YAML = """task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  source: st3_scenes.tasks.example("{split}", i, "{kind}") for i in [0, {n})
"""
UTILS = "from st3_scenes.lmms_tasks import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def write_tasks(directory: str | Path, split: str = "test", qa: int = 200, captions: int = 50) -> Path:
    """Write the tasks' data and YAML files under `directory` (pass it to lmms-eval's `--include_path`)."""
    import datasets

    from st3_scenes.tasks import ANSWER_TOKENS, SPLITS, example

    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "utils.py").write_text(UTILS)
    for task, kind in TASKS.items():
        n = qa if kind == "qa" else captions
        if n <= 0:
            continue
        examples = [example(split, i, kind) for i in range(n)]
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "kind": datasets.Value("string"),
                "index": datasets.Value("int64"),
            }
        )
        rows = {
            "image": [e.image for e in examples],
            "question": [e.question for e in examples],
            "answer": [e.answer for e in examples],
            "kind": [e.kind for e in examples],
            "index": [e.index for e in examples],
        }
        data = root / f"{task}_data"
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
        text = YAML.format(task=task, data=data, max_new_tokens=ANSWER_TOKENS[kind], split=split, kind=kind, n=n)
        (root / f"{task}.yaml").write_text(text)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--qa", type=int, default=200)
    parser.add_argument("--captions", type=int, default=50)
    args = parser.parse_args(argv)
    root = write_tasks(args.directory, args.split, args.qa, args.captions)
    print(f"wrote {', '.join(TASKS)} to {root}; pass --include_path {root} to lmms-eval")


if __name__ == "__main__":
    main()
