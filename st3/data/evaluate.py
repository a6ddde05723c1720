"""Exact-match accuracy of a scenes LLaVA on a split: one-word questions and whole captions.

    python -m st3.data.evaluate --model st3/assets/scenes-llava --split test --qa 2000 --captions 500

Answers are generated greedily through the stock path (`AutoProcessor` + `model.generate`, left-padded
batches); a QA answer counts when the decoded text equals the answer, a caption when it equals the template
caption exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from st3.data.processor import prompt
from st3.data.tasks import ANSWER_TOKENS, Example, example


@torch.no_grad()
def answers(model, processor, examples: list[Example], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers of the model to examples, decoded without special tokens and stripped."""
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = processor(
            images=[e.image for e in batch], text=[prompt(e.question) for e in batch], return_tensors="pt", padding=True
        )
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(t.strip() for t in texts)
    return out


def evaluate(model, processor, split: str = "validation", qa: int = 500, captions: int = 100, start: int = 0,
             batch_size: int = 32) -> dict:  # fmt: skip
    """QA exact match (overall and by kind) over examples [start, start+qa) and caption exact match over
    caption examples [start, start+captions) of the split."""
    was_training = model.training
    model.eval()
    result: dict = {"split": split}
    if qa:
        examples = [example(split, start + i, "qa") for i in range(qa)]
        got = answers(model, processor, examples, max_new_tokens=ANSWER_TOKENS["qa"], batch_size=batch_size)
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for e, g in zip(examples, got):
            by_kind[e.kind].append(g == e.answer)
        hits = [h for v in by_kind.values() for h in v]
        result["qa_accuracy"] = sum(hits) / len(hits)
        result["qa_n"] = len(hits)
        result["qa_by_kind"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
    if captions:
        examples = [example(split, start + i, "caption") for i in range(captions)]
        got = answers(model, processor, examples, ANSWER_TOKENS["caption"], batch_size=batch_size)
        result["caption_exact"] = sum(g == e.answer for e, g in zip(examples, got)) / len(examples)
        result["caption_n"] = len(examples)
        result["caption_samples"] = [{"want": e.answer, "got": g} for e, g in list(zip(examples, got))[:3]]
    model.train(was_training)
    return result


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="st3/assets/scenes-llava")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--qa", type=int, default=2000)
    parser.add_argument("--captions", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    t0 = time.time()
    result = evaluate(model, processor, args.split, args.qa, args.captions, args.start, args.batch_size)
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
