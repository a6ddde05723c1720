"""`st3 search`: G-Search (st3.search.g_search) and the P-Sigmoid fit on the scenes validation split.

    st3 search scenes/st3_scenes/assets/scenes-llava --qa 200 --tolerance 0.01 --json schedule.json
    st3 search scenes/st3_scenes/assets/scenes-llava --form psigmoid --budget 0.33 --qa 200

Each trial schedule answers the same `qa` validation questions (greedy, the stock path of `st3 eval`); the
target is the unpruned accuracy on them minus `tolerance`. The result is a method spec:
`-m schedule:counts=1:200/3:90` (st3 eval then matches its `scale` to each budget) or
`st3.Schedule(counts=...)`. Validation only: the test split's ranges stay held out.

P-Sigmoid (`fit_psigmoid`): for every (steepness, floor) of a small grid, the `psigmoid` method's midpoint is
matched to the budget (`st3.budget.at_budget`, as `st3 eval` matches it) and the schedule answers the same
questions; the most accurate pair wins (the first of a tie). The paper tunes its sigmoid by Bayesian optimisation;
a grid of a few points is st3's stand-in, enough for a sigmoid of two free parameters at a fixed budget.
"""

from __future__ import annotations

from tqdm import tqdm

from st3.adapters import adapter_for
from st3.budget import OutOfReach, at_budget
from st3.methods.schedule import format_counts
from st3.search import as_schedule, counts_of, g_search
from st3_scenes.evaluate import answers, prompt_counts
from st3_scenes.tasks import ANSWER_TOKENS, example


def search(model_dir: str, qa: int = 200, tolerance: float = 0.01, first_layer: int = 1, batch_size: int = 16,
           first: int = 0) -> dict:  # fmt: skip
    """The greedy schedule for the model in `model_dir`, its trials and accuracies (validation questions
    [first, first + qa))."""
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance: must be in [0, 1], got {tolerance}")
    model, processor, examples = _loaded(model_dir, qa, first)
    adapter = adapter_for(model)
    layers, visual = adapter.shape.num_layers, adapter.typical_visual_tokens()
    if not 0 <= first_layer < layers:
        raise ValueError(f"first_layer: must be in [0, {layers}), got {first_layer}")
    trials: dict[tuple[int, ...], float] = {}

    def score(counts: list[int]) -> float:
        key = tuple(counts)
        if key not in trials:
            method = None if min(counts) == visual else as_schedule(counts, visual)
            trials[key] = _accuracy(model, processor, examples, method, batch_size)
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


#: The (steepness, floor) grid `fit_psigmoid` tries by default.
STEEPNESS = (2.0, 4.0, 8.0, 16.0, 32.0)
FLOORS = (0.0, 0.1)


def fit_psigmoid(model_dir: str, budget: float, qa: int = 200, steepness: tuple[float, ...] = STEEPNESS,
                 floors: tuple[float, ...] = FLOORS, batch_size: int = 16, first: int = 0) -> dict:  # fmt: skip
    """The `psigmoid` (steepness, floor) of the grid that answers the most validation questions [first, first +
    qa) with its midpoint matched to `budget` (a share of the visual tokens per layer), and every trial."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget: a share of the visual tokens, in (0, 1), got {budget}")
    model, processor, examples = _loaded(model_dir, qa, first)
    adapter = adapter_for(model)
    visual, text = prompt_counts(adapter, processor, examples[0].image)
    unpruned = _accuracy(model, processor, examples, None, batch_size)
    trials = []
    grid = [(k, f) for k in steepness for f in floors]
    for k, f in tqdm(grid, desc="st3 search psigmoid", unit="trial"):
        try:
            method = at_budget("psigmoid", {"steepness": k, "floor": f}, budget, adapter.shape, visual, text)
        except OutOfReach as error:
            trials.append({"steepness": k, "floor": f, "unreachable": error.reason})
            continue
        trials.append({"steepness": k, "floor": f, "midpoint": method.midpoint, "start_layer": method.start_layer,
                       "accuracy": _accuracy(model, processor, examples, method, batch_size)})  # fmt: skip
    scored = [t for t in trials if "accuracy" in t]
    if not scored:
        reason = trials[0]["unreachable"]
        raise ValueError(f"budget: {budget} is out of reach of every (steepness, floor) tried: {reason}")
    best = max(scored, key=lambda t: t["accuracy"])  # max keeps the first of a tie
    return {
        "form": "psigmoid", "split": "validation", "first": first, "qa": qa, "budget": budget, "unpruned": unpruned,
        "accuracy": best["accuracy"], "best": best, "trials": trials,
        "spec": f"psigmoid:steepness={best['steepness']:g},floor={best['floor']:g}",
    }  # fmt: skip


def _loaded(model_dir: str, qa: int, first: int):
    """(model, processor, the validation QA examples [first, first + qa))."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3.compat import LOAD_KWARGS

    if qa < 1:
        raise ValueError(f"qa: must be >= 1, got {qa}")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor, [example("validation", first + i, "qa") for i in range(qa)]


def _accuracy(model, processor, examples, method, batch_size: int) -> float:
    """Exact-match accuracy of greedy answers to `examples` under `method` (None: unpruned)."""
    got, _ = answers(model, processor, examples, ANSWER_TOKENS["qa"], batch_size, method)
    return sum(g == e.answer for g, e in zip(got, examples)) / len(examples)
