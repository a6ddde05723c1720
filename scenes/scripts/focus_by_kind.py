"""The focus loss of each lookup kind (position, content, count, word) of a training checkpoint, on validation scenes:

    .venv/bin/python scenes/scripts/focus_by_kind.py runs/grid10/checkpoint.pt --scenes 8

Shows which kind of lookup a run has learnt and which one is stuck (the combined focus loss hides it). The
heads and layers are the run's own, read from the flags saved in the checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from st3_scenes.model import ScenesSpec, build_scenes_model
from st3_scenes.processor import build_processor
from st3_scenes.tasks import SPLITS
from st3_scenes.train import COUNT, FOCUS_KINDS, WORD, focus_plan, make_batch, packed_logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trainer checkpoint (<out>/checkpoint.pt)")
    parser.add_argument("--scenes", type=int, default=8, help="validation scenes, 4 per batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    spec, flags = ScenesSpec(**state["spec"]), state["args"]
    model = build_scenes_model(spec)
    model.load_state_dict(state["model"])
    model.eval()
    focus = focus_plan(flags, spec)  # the run's own heads
    tokenizer = build_processor(spec.image_size, spec.patch_size).tokenizer
    start = SPLITS["validation"][0]
    terms: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for first in range(start, start + args.scenes, 4):
            seeds = list(range(first, min(first + 4, start + args.scenes)))
            batch = make_batch(tokenizer, seeds, flags["questions"], flags["caption_weight"], spec.image_tokens,
                               spec.patch_size, count_focus=FOCUS_KINDS.index(COUNT) in focus,
                               word_focus=FOCUS_KINDS.index(WORD) in focus)  # fmt: skip
            for kind, kind_terms in packed_logits(model, batch, focus=focus)[1].items():
                terms.setdefault(kind, []).append(kind_terms)
    print(f"step {state['step']}, {args.scenes} validation scenes:")
    for kind, parts in terms.items():
        values = torch.cat(parts)
        print(f"  {kind:9s} focus loss {values.mean():.4f} over {len(values)} queries")


if __name__ == "__main__":
    main()
