"""Cost as the visual tokens grow: speed-ups of pruning methods over the unpruned model, each beside its FLOPs
bound, from one image to a 32-frame video, at Qwen2.5-VL-7B's shape (random weights; speed does not depend on them).

    python benchmarks/video_scaling.py [--layers 3] [--frames 8 16 32] [--frame 16x16] [--new-tokens 4]
                                       [--repeats 2] [--warmup 1] [--dtype bf16] [--json out.json]

Cases (grids are merged tokens, rows x cols; one merged token is 28 x 28 pixels): one image of --image 24x24 = 576
tokens (LLaVA-1.5's count), one of --large 48x60 = 2,880 (LLaVA-NeXT's anyres total, 5 x 576, as one larger
image), and videos of --frames frames of --frame 16x16 (448 x 448 pixels): the tower folds each 2 frames
(temporal patch 2) into one grid, so N frames give N / 2 x 256 tokens. The exact counts are printed.

Methods: st3 and fastv at their defaults (fractions of what they hold: st3 removes 20% at layers 2, 5, ...,
fastv 50% at layer 2), spread keeping --spread-share of the visual tokens (1/3: its default 192 of 576).
Per case, every entry runs interleaved (vanilla st3 fastv spread, ...) --repeats times; --warmup untimed rounds
of every entry run once, on the first case. Medians of wall-clock seconds. For each method: prefill and
end-to-end speed-up over vanilla, the FLOPs bound (the unpruned FLOPs over the method's, from its trace: the
decoder's matrix products only) and efficiency = measured / bound; `layers x`: the same ratio of the time spent
inside the decoder layers during prefill; `overhead`: the prefill time outside the decoder layers beyond vanilla's
(the engine's and the method's own work: locating and ranking tokens, gathers, masks, bookkeeping), in ms and as a
share of vanilla's prefill, so its growth with the visual tokens can be read against the model's.

Each case's prefill includes the vision tower, paid alike by every method: here 1 layer of width 1280 (the real
model has 32), so measured speed-ups are slightly conservative. No torch.compile.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LogitsProcessorList

import st3
from st3.accounting import unpruned_flops
from st3.adapters import adapter_for
from st3.adapters.qwen_vl import Qwen25VLAdapter
from st3.bench.harness import cpu_bf16_note, environment, interleaved, spread
from st3.bench.measure import StepClock, generation_config
from st3.bench.shapes import DTYPES, build_model, prepare, shape_name
from st3.compare import timed_generate
from st3.models import spec_for
from st3.plan import plan

MODEL = "qwen2.5-vl-7b"
METHODS = ("st3", "fastv", "spread")


def grid(text: str) -> tuple[int, int]:
    """'16x16' -> (16, 16): merged tokens, rows x cols."""
    rows, cols = (int(x) for x in text.lower().split("x"))
    return rows, cols


def make_inputs(model, merged: tuple[int, int], frames: int, text: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One prompt of text, the image or video of `merged` tokens per frame, text; on the model's device and dtype."""
    vision = model.config.vision_config
    side = vision.patch_size * vision.spatial_merge_size  # pixels per merged token
    size = (merged[0] * side, merged[1] * side)
    inputs = adapter_for(model).bench_inputs(size, 1, *text, torch.Generator().manual_seed(0), frames=frames)
    return {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def cases(model, args) -> list[dict]:
    """Every case, in the order they run: label, merged grid, frames (0: an image), its inputs and their counts."""
    specs = [("image", args.image, 0), ("large image", args.large, 0)]
    out = []
    for label, merged, frames in specs + [(f"video {n} frames", args.frame, n) for n in args.frames]:
        inputs = make_inputs(model, merged, frames, (args.text_before, args.text_after))
        visual = int(adapter_for(model).visual_mask(inputs["input_ids"]).sum())
        out.append({"label": label, "merged": merged, "frames": frames, "inputs": inputs, "visual": visual,
                    "prompt": int(inputs["input_ids"].shape[1])})  # fmt: skip
    return out


def method_for(name: str, visual: int, share: float) -> st3.Method:
    """st3 and fastv at their defaults (shares of what they hold), spread at `share` of the visual tokens."""
    return st3.get(name, keep=round(visual * share)) if name == "spread" else st3.get(name)


class LayerClock:
    """Wall time spent inside the decoder layers: (start, end) of every layer call, from module hooks."""

    def __init__(self, layers, sync: bool):
        self.spans: list[tuple[float, float]] = []
        self.sync = sync
        self.handles = [h for layer in layers for h in (layer.register_forward_pre_hook(self.enter),
                                                        layer.register_forward_hook(self.leave))]  # fmt: skip

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, *_) -> None:
        self.spans.append((self.now(), float("inf")))

    def leave(self, *_) -> None:
        self.spans[-1] = (self.spans[-1][0], self.now())

    def before(self, stamp: float) -> float:
        """Seconds inside layers that ended before `stamp` (the prefill's, when it is the first logits')."""
        return sum(end - start for start, end in self.spans if end <= stamp)


def run_once(model, inputs: dict, new_tokens: int, method: st3.Method | None) -> dict:
    """One generate: prefill, end-to-end and in-layer prefill seconds, and the method's trace summary."""
    sync = model.device.type == "cuda"
    clock, layers = StepClock(sync=sync), LayerClock(adapter_for(model).layers, sync)
    try:
        timed = timed_generate(model, inputs, method, sync=sync, generation_config=generation_config(model, new_tokens),
                               logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    finally:
        for handle in layers.handles:
            handle.remove()
    prefill_end = clock.stamps[0]
    return {"prefill_s": prefill_end - timed.start, "e2e_s": timed.seconds, "layers_s": layers.before(prefill_end),
            "trace": None if method is None else method.trace.summary()}  # fmt: skip


def run_case(model, case: dict, args) -> dict:
    """Vanilla and every method, interleaved `repeats` times on one case; medians, ratios, bounds, overhead."""
    inputs, visual, prompt = case["inputs"], case["visual"], case["prompt"]
    methods = {name: method_for(name, visual, args.spread_share) for name in METHODS}
    entries = ("vanilla", *METHODS)
    samples = interleaved(entries, lambda e: run_once(model, inputs, args.new_tokens, methods.get(e)), args.repeats, 0)
    medians = {e: {k: spread([s[k] for s in samples[e]]) for k in ("prefill_s", "e2e_s", "layers_s")} for e in entries}
    base = {k: v["median"] for k, v in medians["vanilla"].items()}
    outside = base["prefill_s"] - base["layers_s"]
    rows = {}
    for name in METHODS:
        trace, m = samples[name][-1]["trace"], {k: v["median"] for k, v in medians[name].items()}
        if trace["visual_tokens"] != [visual]:
            raise RuntimeError(f"{name} saw {trace['visual_tokens']} visual tokens, the inputs hold {visual}")
        flops = trace["flops"]
        prefill_x, prefill_bound = base["prefill_s"] / m["prefill_s"], flops["prefill_unpruned"] / flops["prefill"]
        e2e_x, e2e_bound = base["e2e_s"] / m["e2e_s"], flops["total_unpruned"] / flops["total"]
        overhead = m["prefill_s"] - m["layers_s"] - outside
        rows[name] = {
            "knobs": methods[name].knobs(), "visual_per_layer": trace["visual_per_layer"],
            "prefill_speedup": prefill_x, "prefill_bound": prefill_bound,
            "prefill_efficiency": prefill_x / prefill_bound,
            "e2e_speedup": e2e_x, "e2e_bound": e2e_bound, "e2e_efficiency": e2e_x / e2e_bound,
            "layers_speedup": base["layers_s"] / m["layers_s"],
            "overhead_s": overhead, "overhead_share": overhead / base["prefill_s"],
        }  # fmt: skip
    return {"label": case["label"], "frames": case["frames"], "merged_grid": list(case["merged"]),
            "visual_tokens": visual, "prompt_tokens": prompt, "seconds": medians,
            "vanilla_outside_layers_s": outside, "methods": rows}  # fmt: skip


def print_case(case: dict) -> None:
    base = case["seconds"]["vanilla"]
    rows, cols = case["merged_grid"]
    per = f"{rows}x{cols} per 2 frames" if case["frames"] else f"{rows}x{cols}"
    print(f"\n{case['label']}: {case['visual_tokens']} visual tokens ({per}), prompt {case['prompt_tokens']}; vanilla "
          f"prefill {base['prefill_s']['median']:.2f} s ({case['vanilla_outside_layers_s']:.2f} s outside the layers), "
          f"end to end {base['e2e_s']['median']:.2f} s")  # fmt: skip
    print(f"  {'method':7s} {'prefill x':>9s} {'bound':>6s} {'eff':>5s}  {'e2e x':>6s} {'bound':>6s} {'eff':>5s}  "
          f"{'layers x':>8s}  {'overhead':>16s}")  # fmt: skip
    for name, r in case["methods"].items():
        print(f"  {name:7s} {r['prefill_speedup']:9.2f} {r['prefill_bound']:6.2f} {r['prefill_efficiency']:5.2f}  "
              f"{r['e2e_speedup']:6.2f} {r['e2e_bound']:6.2f} {r['e2e_efficiency']:5.2f}  {r['layers_speedup']:8.2f}  "
              f"{r['overhead_s'] * 1e3:8.0f} ms {r['overhead_share']:5.1%}", flush=True)  # fmt: skip


def planned_tflops(all_cases: list[dict], shape, args) -> float:
    """Decoder FLOPs of the whole run (planner, unpruned and per method), in TFLOP: to judge its run time."""
    total = 0.0
    for i, case in enumerate(all_cases):
        visual, text = case["visual"], case["prompt"] - case["visual"]
        full = unpruned_flops(shape, [case["prompt"]], args.new_tokens)["total"]
        methods = [method_for(name, visual, args.spread_share) for name in METHODS]
        ratios = [plan(method, shape, visual, text, args.new_tokens).total_flops_ratio for method in methods]
        total += full * (1 + sum(ratios)) * (args.repeats + (args.warmup if i == 0 else 0))
    return total / 1e12


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers kept (the first; the model has 28)")
    parser.add_argument("--image", type=grid, default=(24, 24), help="merged grid of the image (576 tokens)")
    parser.add_argument("--large", type=grid, default=(48, 60), help="merged grid of the large image (2,880)")
    parser.add_argument("--frame", type=grid, default=(16, 16), help="merged grid of every 2 video frames")
    parser.add_argument("--frames", type=int, nargs="*", default=[8, 16, 32], help="video lengths, in frames")
    parser.add_argument("--spread-share", type=float, default=1 / 3, help="share of the visual tokens spread keeps")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per case (at least 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every entry, on the first case")
    parser.add_argument("--text-before", type=int, default=35)
    parser.add_argument("--text-after", type=int, default=40)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 Qwen2.5-VL from config (tests; no timing)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < (1 if args.tiny else 2) or args.warmup < (0 if args.tiny else 1):
        parser.error("--new-tokens must be >= 2, --repeats >= 2 and --warmup >= 1 (a time needs warm-up and repeats; "
                     "--tiny, which times nothing worth reading, takes 1 and 0)")
    started = time.time()
    if args.tiny:
        model, full_layers = prepare(Qwen25VLAdapter.tiny(layers=args.layers, hidden=64), "sdpa"), args.layers
    else:
        model, full_layers = build_model(spec_for(MODEL, args.layers), DTYPES[args.dtype]), spec_for(MODEL).layers
    shape = adapter_for(model).shape
    notes = []
    if args.layers < full_layers:
        notes.append(f"depth truncated to {args.layers} of {full_layers} decoder layers: absolute times, and the "
                     "speed-ups of methods that prune deeper layers, are not the full model's")  # fmt: skip
    if not args.tiny:
        notes.append("random weights; vision tower: 1 layer of width 1280 (the real model's: 32), paid alike by "
                     "every method, so measured speed-ups are slightly conservative")  # fmt: skip
        notes += [note for note in [cpu_bf16_note(model.device, args.dtype)] if note]
    all_cases = cases(model, args)
    print(f"{'tiny qwen2.5-vl (fp32)' if args.tiny else f'{MODEL}, {args.dtype}'}: {shape_name(model)}; "
          f"{args.new_tokens} new tokens, {args.repeats} repeat(s); visual tokens "
          f"{', '.join(str(c['visual']) for c in all_cases)}; decoder work planned: "
          f"{planned_tflops(all_cases, shape, args):.1f} TFLOP")  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    first = all_cases[0]
    for _ in range(args.warmup):
        for name in (None, *METHODS):
            run_once(model, first["inputs"], 2, None if name is None else method_for(name, first["visual"],
                                                                                    args.spread_share))  # fmt: skip
    results = []
    for case in all_cases:
        results.append(run_case(model, case, args))
        print_case(results[-1])
    out = {"meta": environment(model.device, started), "args": {**vars(args)}, "model": MODEL, "tiny": args.tiny,
           "shape": shape_name(model), "layers": args.layers, "full_layers": full_layers, "notes": notes,
           "cases": results}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
