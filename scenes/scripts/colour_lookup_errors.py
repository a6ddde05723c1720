"""Where a scenes model's "what colour is the <shape>?" answers go wrong (validation split):

    .venv/bin/python scenes/scripts/colour_lookup_errors.py runs/grid3/export --examples 3000

Splits those questions by whether the shape is unique ("the circle") or named by its size because it occurs
twice ("the large circle"), and counts how many wrong answers are the colour of another object in the scene
(the model looked at an object, not the named one).
"""

from __future__ import annotations

import argparse

import torch

from st3.compat import LOAD_KWARGS
from st3_scenes.evaluate import answers
from st3_scenes.scenes import SIZES
from st3_scenes.tasks import ANSWER_TOKENS, example


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--examples", type=int, default=3000, help="validation examples to draw questions from")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, **LOAD_KWARGS).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    questions = [e for e in (example("validation", i) for i in range(args.examples)) if e.kind == "colour_of_shape"]
    got, _ = answers(model, processor, questions, ANSWER_TOKENS["qa"])
    for sized in (False, True):
        rows = [(e, g) for e, g in zip(questions, got) if (e.question.split()[-2] in SIZES) == sized]
        wrong = [(e, g) for e, g in rows if g != e.answer]
        elsewhere = sum(any(o.colour == g for o in e.scene.objects) for e, g in wrong)
        print(f"{'named by size' if sized else 'unique shape'}: {len(rows) - len(wrong)}/{len(rows)} right; "
              f"{elsewhere}/{len(wrong)} wrong answers are the colour of another object")  # fmt: skip


if __name__ == "__main__":
    main()
