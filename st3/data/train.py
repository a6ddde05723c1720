"""Train the scenes LLaVA from scratch on CPU: seeded, resumable, QA mixed with captions.

    python scripts/train.py --out runs/scenes --export st3/assets/scenes-llava --steps 6000

Each step draws `--images` training scenes (scene seeds step*images ... , so the data order is a function of
the step alone and a resumed run sees exactly the batches it would have seen). Per scene the model is trained
on `--questions` distinct one-word questions and one caption. The image prefix (`<s> USER: <image>*256`) is
the same for every question about a scene, and causal attention means the prefix never sees what follows, so
the prefix is run once per scene and its KV cache is shared by all the scene's questions (repeat-interleaved
along the batch axis); gradients flow back through the cache. This is the same function as running each
(prompt, answer) sequence on its own, at a fraction of the cost (tests check the equality).

Loss: cross-entropy on the answer tokens and `</s>`, averaged per sequence, each QA weighing 1 and each
caption `--caption-weight`. AdamW, linear warm-up then cosine decay, gradient clipping at 1.

Every `--checkpoint-minutes` the model, optimizer, schedule and step go to `<out>/checkpoint.pt` (written
atomically); re-running the same command resumes from it. Every `--eval-every` steps validation exact match is
printed and appended to `<out>/log.jsonl`. At the end the model and processor are saved with
`save_pretrained` into `--export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from st3.data.model import ModelSpec, build_model, parameter_count
from st3.data.processor import IMAGE, build_processor, pixel_values, prompt
from st3.data.scenes import scene
from st3.data.tasks import CAPTION_PROMPT, SPLITS, caption, draw_qa

IGNORE = -100


@dataclasses.dataclass
class Batch:
    prefix_ids: torch.Tensor  # [1, P]: identical for every scene
    pixel_values: torch.Tensor  # [B, 3, H, W]
    repeats: torch.Tensor  # [B]: sequences per scene
    suffix_ids: torch.Tensor  # [N, S], right-padded
    labels: torch.Tensor  # [N, S], IGNORE outside answers; aligned with suffix_ids (labels[i] is token i)
    weights: torch.Tensor  # [N]
    pad_id: int


def split_prompt(tokenizer, image_tokens: int) -> list[int]:
    """Token ids of the shared prefix `<s> USER: <image>*n` (the question and answer follow it)."""
    ids = tokenizer(prompt("")[: prompt("").index(IMAGE)] + IMAGE * image_tokens)["input_ids"]
    return ids


def sequence_ids(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Suffix ids `question ASSISTANT: answer </s>` and how many of them are prompt (not supervised)."""
    after_image = prompt(question).split(IMAGE, 1)[1]
    prompt_ids = tokenizer(after_image, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def make_batch(tokenizer, seeds: list[int], questions: int, caption_weight: float, image_tokens: int) -> Batch:
    prefix = split_prompt(tokenizer, image_tokens)
    scenes = [scene(s) for s in seeds]
    rows, weights, repeats = [], [], []
    for sc in scenes:
        rng = random.Random(f"train:{sc.seed}")
        seen: set[str] = set()
        for _ in range(questions * 4):
            if len(seen) == questions:
                break
            qa = draw_qa(sc, rng)
            if qa.question in seen:
                continue
            seen.add(qa.question)
            rows.append(sequence_ids(tokenizer, qa.question, qa.answer))
            weights.append(1.0)
        n = len(seen)
        if caption_weight > 0:
            rows.append(sequence_ids(tokenizer, CAPTION_PROMPT, caption(sc)))
            weights.append(caption_weight)
            n += 1
        repeats.append(n)
    width = max(len(ids) for ids, _ in rows)
    suffix = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (ids, prompt_len) in enumerate(rows):
        suffix[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return Batch(
        prefix_ids=torch.tensor([prefix]),
        pixel_values=pixel_values([sc.image for sc in scenes]),
        repeats=torch.tensor(repeats),
        suffix_ids=suffix,
        labels=labels,
        weights=torch.tensor(weights),
        pad_id=tokenizer.pad_token_id,
    )


def shared_prefix_logits(model, batch: Batch, groups: int = 2) -> torch.Tensor:
    """Logits [N, S, V] of the suffixes, each continuing its scene's prefix (run once per scene).

    Suffixes are run in `groups` length-sorted groups (short questions apart from long captions), each on its
    own copy of the prefix cache, so short rows are not padded to caption length.
    """
    images = batch.pixel_values.shape[0]
    prefix = batch.prefix_ids.expand(images, -1)
    out = model(input_ids=prefix, pixel_values=batch.pixel_values, use_cache=True, logits_to_keep=1)
    # the logits of the last prefix token would predict the first question token: never supervised
    prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    owner = torch.arange(images).repeat_interleave(batch.repeats)
    lengths = (batch.suffix_ids != batch.pad_id).sum(1)
    order = torch.argsort(lengths, stable=True)
    logits = None
    for rows in torch.tensor_split(order, groups):
        if len(rows) == 0:
            continue
        width = int(lengths[rows].max())
        cache = DynamicCache(config=model.config.text_config)
        for i, (k, v) in enumerate(prefix_kv):
            cache.update(k[owner[rows]], v[owner[rows]], i)
        positions = torch.arange(prefix.shape[1], prefix.shape[1] + width).expand(len(rows), -1)
        part = model(
            input_ids=batch.suffix_ids[rows, :width], position_ids=positions, past_key_values=cache, use_cache=False
        ).logits
        if logits is None:
            logits = part.new_zeros(batch.suffix_ids.shape + part.shape[-1:])
        logits[rows, :width] = part
    return logits


def loss_of(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Weighted mean over sequences of each sequence's mean answer-token cross-entropy."""
    # logits[:, i] predicts token i+1
    targets = batch.labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none")
    mask = (targets != IGNORE).float()
    per_seq = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = (per_seq * batch.weights).sum() / batch.weights.sum()
    is_caption = batch.weights != 1.0
    stats = {"loss": loss.item()}
    if is_caption.any():
        stats["caption_loss"] = per_seq[is_caption].mean().item()
    if (~is_caption).any():
        stats["qa_loss"] = per_seq[~is_caption].mean().item()
    return loss, stats


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model, optimizer, step: int, args: dict, spec: ModelSpec) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "args": args,
        "spec": dataclasses.asdict(spec),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def export(model, processor, directory: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/scenes", help="checkpoint and log directory")
    p.add_argument("--export", default="st3/assets/scenes-llava", help="save_pretrained target at the end")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--images", type=int, default=8, help="scenes per step")
    p.add_argument("--questions", type=int, default=8, help="distinct questions per scene")
    p.add_argument("--caption-weight", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-fraction", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-qa", type=int, default=300)
    p.add_argument("--eval-captions", type=int, default=60)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--spec", default="{}", help="ModelSpec overrides as JSON, e.g. '{\"text_hidden\": 192}'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"

    spec = ModelSpec(**json.loads(args.spec))
    model = build_model(spec, seed=args.seed)
    model.train()
    processor = build_processor(spec.image_size, spec.patch_size)
    tokenizer = processor.tokenizer
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["spec"] != dataclasses.asdict(spec):
            raise SystemExit(f"{ckpt_path} was made with spec {state['spec']}, not {dataclasses.asdict(spec)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    print(f"model: {parameter_count(model) / 1e6:.2f}M parameters, spec {dataclasses.asdict(spec)}", flush=True)

    train_start, train_end = SPLITS["train"]
    last_save = time.time()
    running: dict[str, float] = {}
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=2.0)
    step_times: list[float] = []
    while step < args.steps:
        t0 = time.time()
        seeds = [train_start + (step * args.images + j) % (train_end - train_start) for j in range(args.images)]
        batch = make_batch(tokenizer, seeds, args.questions, args.caption_weight, spec.image_tokens)
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = loss_of(shared_prefix_logits(model, batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        step += 1
        step_times.append(time.time() - t0)
        for k, v in stats.items():
            running[k] = v if k not in running else 0.98 * running[k] + 0.02 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"lr": f"{lr:.1e}"}, refresh=False)
        record = None
        if step % 50 == 0:
            recent = step_times[-50:]
            record = {"step": step, "lr": lr, "grad_norm": round(grad_norm, 3)}
            record |= {k: round(v, 4) for k, v in running.items()}
            record["step_seconds"] = round(sum(recent) / len(recent), 3)
        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.time()
            from st3.data.evaluate import evaluate

            result = evaluate(model, processor, "validation", args.eval_qa, args.eval_captions)
            record = (record or {"step": step}) | {k: v for k, v in result.items() if k != "caption_samples"}
            record["eval_seconds"] = round(time.time() - t_eval, 1)
            tqdm.write(
                f"step {step}: validation QA {result.get('qa_accuracy', 0):.3f}, "
                f"captions {result.get('caption_exact', 0):.3f}; {result.get('caption_samples', [])[:1]}"
            )
        if record is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == args.steps:
            save_checkpoint(ckpt_path, model, optimizer, step, vars(args), spec)
            last_save = time.time()
    bar.close()
    model.eval()
    export(model, processor, args.export)
    print(f"saved model and processor to {args.export}", flush=True)
    return {"step": step}


if __name__ == "__main__":
    main()
