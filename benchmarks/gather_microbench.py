"""Gathering one layer's cached keys [B, 32, 670, 128] bf16 by kept indices: st3's `gather` vs alternatives.

Run: .venv/bin/python benchmarks/gather_microbench.py  (output recorded in results/gather-microbench.txt)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from st3.engine.cache import gather, pack_index


def median_ms(fn: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def compare(batch: int) -> str:
    torch.manual_seed(0)
    keys = torch.randn(batch, 32, 670, 128, dtype=torch.bfloat16)
    index, _ = pack_index(torch.rand(batch, 670) < 0.8)
    expanded = index[:, None, :, None].expand(batch, 32, index.shape[1], 128)
    rows = torch.arange(batch)[:, None]

    def per_sample() -> torch.Tensor:
        return torch.stack([keys[i].index_select(1, index[i]) for i in range(batch)])

    timings = {
        "take_along_dim (st3 gather)": median_ms(lambda: gather(keys, index, 2)),
        "gather+expand": median_ms(lambda: keys.gather(2, expanded)),
        "adv. indexing": median_ms(lambda: keys[rows, :, index].transpose(1, 2)),
        "per-sample index_select": median_ms(per_sample),
    }
    same = torch.equal(gather(keys, index, 2), per_sample())
    cells = " | ".join(f"{name} {ms:.1f} ms" for name, ms in timings.items())
    return f"B={batch}: {cells} | same {same} | tensor {keys.nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    for b in (1, 8):
        print(compare(b))
