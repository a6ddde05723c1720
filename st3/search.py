"""G-Search (arXiv 2412.00556), st3's own version: the fewest visual tokens each layer needs, greedily.

The paper's abstract states the idea (its code is not public, and its step and stopping rules could not be
read): tokens ranked by attention keep their ranks across layers, and the number of essential tokens does not
grow with depth; so, shallow to deep, each layer gets the fewest tokens that keep the accuracy. st3's rules:
the counts never grow with depth; at layer l the count is the smallest k (bisection over [0, count of layer
l-1]) whose schedule, every layer from l on holding at most k, scores at least `target` (e.g. the unpruned
accuracy on a validation split minus a tolerance). The bisection assumes the score rises with k; a noisy score
makes the result approximate. The result is an `st3.Schedule` (a method spec for `-m` and the API).
"""

from __future__ import annotations

from collections.abc import Callable

from st3.methods.schedule import Schedule

#: counts [num_layers] (visual tokens each layer holds) -> the score of that schedule (higher is better)
Score = Callable[[list[int]], float]


def g_search(
    score: Score, num_layers: int, visual: int, target: float, first: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Schedule:  # fmt: skip
    """The greedy schedule: per layer from `first` (layers before it keep every token), the fewest tokens whose
    schedule scores >= `target`. `progress(layer, count)` is called as each layer is settled."""
    if not 0 <= first < num_layers:
        raise ValueError(f"first: must be in [0, {num_layers}), got {first}")
    if visual < 0:
        raise ValueError(f"visual: must be >= 0, got {visual}")
    counts = [visual] * num_layers
    for layer in range(first, num_layers):
        low, high = 0, counts[layer - 1] if layer else visual  # high always passes (it is the schedule so far)
        while low < high:
            mid = (low + high) // 2
            trial = counts[:layer] + [min(c, mid) for c in counts[layer:]]
            if score(trial) >= target:
                high = mid
            else:
                low = mid + 1
        counts[layer:] = [min(c, high) for c in counts[layer:]]
        if progress is not None:
            progress(layer, high)
    return as_schedule(counts, visual)


def counts_of(schedule: Schedule, num_layers: int, visual: int) -> list[int]:
    """Per layer, the visual tokens a sample of `visual` holds under an explicit `schedule` (the inverse of
    `as_schedule`)."""
    counts = [visual] * num_layers
    for layer, count in schedule.plan(num_layers):
        counts[layer:] = [min(c, count) for c in counts[layer:]]
    return counts


def as_schedule(counts: list[int], visual: int) -> Schedule:
    """The `st3.Schedule` of per-layer counts of `visual` tokens: a (layer, count) pair where the count drops."""
    if any(b > a for a, b in zip([visual, *counts], counts)):
        raise ValueError(f"counts: must not grow with depth (from {visual}), got {counts}")
    held = [visual, *counts]
    pairs = tuple((layer, counts[layer]) for layer in range(len(counts)) if counts[layer] < held[layer])
    return Schedule(counts=pairs or ((len(counts) - 1, visual),))
