"""K/V gather at the 7B shape: the per-sample index_select loop (before issue 20) vs one flat index_select."""

import statistics
import time

import torch

from st3.engine.cache import gather

torch.set_num_threads(1)


def old(x, index):
    return torch.stack([x[b].index_select(1, index[b]) for b in range(index.shape[0])])


for batch in (1, 8):
    x = torch.randn(batch, 32, 651, 128, dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(651)[:560].sort().values for _ in range(batch)])
    assert torch.equal(old(x, index), gather(x, index, 2))
    res = {}
    for name, fn in (
        ("per-sample index_select (before)", old),
        ("flat index_select (after)", lambda x, i: gather(x, i, 2)),
    ):
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            fn(x, index)
            ts.append(time.perf_counter() - t)
        res[name] = statistics.median(ts) * 1e3
    print(
        f"K/V gather [{batch}, 32, 651 -> 560, 128] bf16, 1 thread: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in res.items())
    )
