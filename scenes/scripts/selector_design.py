"""Design runs for a selector rule, on the validation split only: captions and QA at fixed keep counts.

    .venv/bin/python scenes/scripts/selector_design.py --captions 200 --qa 0 --keep 36 --keep 71
    .venv/bin/python scenes/scripts/selector_design.py --captions 0 --qa 1000 --keep 36 --keep 71 -r spread:2 -r jitter

Each rule runs before the decoder through the registered `stratified`/`spread`/peer names with its selector
swapped in, so no throw-away names are registered. Besides caption exact match it counts the caption's cell
errors (a missed object, a phantom one, a wrong shape, colour or size, an answer off the template): where a
rule fails tells more than how often. Rules: `spread:<spatial>`, `jitter`, `diverse` and `salient`
(`st3.selectors.Stratified(within=...)`), and any registered name with a `keep` knob (`divprune`, `cdpruner`, ...).
"""

from __future__ import annotations

import argparse
import collections

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import st3
from st3.compat import LOAD_KWARGS
from st3_scenes import MODEL_DIR
from st3_scenes.evaluate import answers
from st3_scenes.tasks import ANSWER_TOKENS, Example, example, parse_caption

RULES = ("spread:1", "spread:2", "spread:4", "jitter", "divprune", "cdpruner")


def method(rule: str, keep: int) -> st3.Method:
    name, _, value = rule.partition(":")
    if name == "spread":
        return st3.get("spread", keep=keep, selector=st3.selectors.Spread(spatial=float(value or 2.0)))
    if name in st3.selectors.Stratified.WITHIN:
        return st3.get("stratified", keep=keep, selector=st3.selectors.Stratified(within=name))
    return st3.get(name, keep=keep)


def cell_errors(examples: list[Example], got: list[str]) -> collections.Counter:
    errors: collections.Counter = collections.Counter()
    for e, text in zip(examples, got):
        listed = parse_caption(text)
        if listed is None:
            errors["off template"] += 1
            continue
        want = {(o.row, o.col): o for o in e.scene.objects}
        have = {(o.row, o.col): o for o in listed}
        for cell in want.keys() | have.keys():
            w, h = want.get(cell), have.get(cell)
            if w is None or h is None:
                errors["phantom" if w is None else "missed"] += 1
            else:
                errors.update(a for a in ("shape", "colour", "size") if getattr(w, a) != getattr(h, a))
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--rule", action="append", help=f"a rule (repeatable; default: {', '.join(RULES)})")
    parser.add_argument("--keep", type=int, action="append", help="visual tokens kept of 324 (repeatable)")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--qa", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    tasks = {"caption": args.captions, "qa": args.qa}
    for task, n in tasks.items():
        examples = [example("validation", i, task) for i in range(n)]
        for rule in args.rule or RULES:
            for keep in args.keep or [36, 71, 107, 162]:
                if not examples:
                    continue
                got, _ = answers(model, processor, examples, ANSWER_TOKENS[task], 32, method(rule, keep))
                hits = sum(text == e.answer for text, e in zip(got, examples))
                errors = dict(cell_errors(examples, got)) if task == "caption" else {}
                print(f"{task:7s} {rule:10s} keep={keep:3d} {hits / n:6.1%} of {n} {errors}", flush=True)


if __name__ == "__main__":
    main()
