"""`st3 search`: G-Search (st3.search.g_search) on the scenes validation split.

    st3 search scenes/st3_scenes/assets/scenes-llava --qa 200 --tolerance 0.01 --json schedule.json

Each trial schedule answers the same `qa` validation questions (greedy, the stock path of `st3 eval`); the
target is the unpruned accuracy on them minus `tolerance`. The result is a method spec:
`-m schedule:counts=1:200/3:90` (st3 eval then matches its `scale` to each budget) or
`st3.Schedule(counts=...)`. Validation only: the test split's ranges stay held out.
"""

from __future__ import annotations

from tqdm import tqdm

from st3.adapters import adapter_for
from st3.methods.schedule import format_counts
from st3.search import as_schedule, counts_of, g_search
from st3_scenes.evaluate import answers
from st3_scenes.tasks import ANSWER_TOKENS, example


def search(model_dir: str, qa: int = 200, tolerance: float = 0.01, first_layer: int = 1, batch_size: int = 16,
           first: int = 0) -> dict:  # fmt: skip
    """The greedy schedule for the model in `model_dir`, its trials and accuracies (validation questions
    [first, first + qa))."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3.compat import LOAD_KWARGS

    if qa < 1:
        raise ValueError(f"qa: must be >= 1, got {qa}")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance: must be in [0, 1], got {tolerance}")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for(model)
    layers, visual = adapter.shape.num_layers, adapter.typical_visual_tokens()
    if not 0 <= first_layer < layers:
        raise ValueError(f"first_layer: must be in [0, {layers}), got {first_layer}")
    examples = [example("validation", first + i, "qa") for i in range(qa)]
    tokens = ANSWER_TOKENS["qa"]
    trials: dict[tuple[int, ...], float] = {}

    def score(counts: list[int]) -> float:
        key = tuple(counts)
        if key not in trials:
            method = None if min(counts) == visual else as_schedule(counts, visual)
            got, _ = answers(model, processor, examples, tokens, batch_size, method)
            trials[key] = sum(g == e.answer for g, e in zip(got, examples)) / len(examples)
        return trials[key]

    unpruned = score([visual] * layers)
    with tqdm(total=layers - first_layer, desc="st3 search", unit="layer") as bar:
        schedule = g_search(score, layers, visual, unpruned - tolerance, first_layer,
                            progress=lambda layer, count: bar.update(1))  # fmt: skip
    counts = counts_of(schedule, layers, visual)
    return {
        "split": "validation", "first": first, "qa": qa, "tolerance": tolerance, "unpruned": unpruned,
        "accuracy": score(counts), "counts_per_layer": counts, "counts": [list(p) for p in schedule.counts],
        "mean_visual_per_layer": sum(counts) / layers, "trials": len(trials),
        "spec": f"schedule:counts={format_counts(schedule.counts)}",
    }  # fmt: skip
