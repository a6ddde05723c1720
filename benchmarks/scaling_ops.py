"""Does the engine's own prefill work grow with the visual tokens? Torch operations it adds over vanilla (deterministic,
unlike times on a shared CPU), at a tiny Qwen2.5-VL (so its own work is visible), for videos of growing length; and
spread's choice at the 7B width (hidden 3584), in CPU seconds.

    python benchmarks/scaling_ops.py [--groups 2 8 32] [--spread-frames 1 4 8 16]

Videos: `--groups` temporal groups (2 frames each) of 8x8 merged tokens; spread: 16x16-token frames, keeping 1/3.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import st3
from st3.adapters.base import Grid
from st3.adapters.qwen_vl import Qwen25VLAdapter
from st3.selectors import Spread
from st3.selectors.view import View


def operations(model, inputs: dict, method: st3.Method | None) -> int:
    """aten operations of one 2-token generate (after an unprofiled one)."""

    def run() -> None:
        with torch.no_grad():
            if method is None:
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
            else:
                with method(model):
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def spread_seconds(frames: int, side: int = 16, hidden: int = 3584) -> float:
    """CPU seconds of spread choosing 1/3 of a video of `frames` grids of side x side tokens among 77 text tokens."""
    visual = frames * side * side
    candidates = torch.zeros(1, visual + 77, dtype=torch.bool)
    candidates[0, 36 : 36 + visual] = True
    states = torch.randn(1, visual + 77, hidden, generator=torch.Generator().manual_seed(0)).bfloat16()
    view = View(layer=0, candidates=candidates, keep=torch.tensor([round(visual / 3)]), attention=None,
                hidden=lambda: states, keys=None, grids=[[Grid(frames, side, side)]])  # fmt: skip
    start = time.process_time()
    Spread().select(view)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="*", default=[2, 8, 32])
    parser.add_argument("--spread-frames", type=int, nargs="*", default=[1, 4, 8, 16])
    args = parser.parse_args()
    model = Qwen25VLAdapter.tiny(layers=4, hidden=64)
    model.generation_config.eos_token_id = None
    for groups in args.groups:
        inputs = Qwen25VLAdapter.tiny_inputs(model, [(35, 40, "video", (groups, 16, 16))])
        visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
        vanilla = operations(model, inputs, None)
        added = {name: operations(model, inputs, st3.get(name)) - vanilla for name in ("st3", "fastv")}
        added["spread"] = operations(model, inputs, st3.get("spread", keep=visual // 3)) - vanilla
        print(f"{visual:6d} visual tokens: vanilla {vanilla} operations; added: {added}", flush=True)
    for frames in args.spread_frames:
        seconds = spread_seconds(frames)
        print(f"spread at hidden 3584, {frames * 256} visual tokens ({frames} frames): {seconds:.2f} s CPU", flush=True)


if __name__ == "__main__":
    main()
