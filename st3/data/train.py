"""Train the scenes LLaVA from scratch on CPU: seeded, resumable, QA mixed with captions.

    python scripts/train.py --out runs/scenes --export st3/assets/scenes-llava

Each step draws `--images` training scenes (scene seeds step*images ... , so the data order is a function of
the step alone and a resumed run sees exactly the batches it would have seen). Per scene the model is trained
on `--questions` distinct one-word questions and one caption. The image prefix (`<s> USER: <image>*256`) is
the same for every question about a scene, and causal attention means the prefix never sees what follows, so
the prefix is run once per scene and its KV cache is shared by all the scene's questions (repeat-interleaved
along the batch axis); gradients flow back through the cache. This is the same function as running each
(prompt, answer) sequence on its own, at a fraction of the cost (tests check the equality).

Loss: cross-entropy on the answer tokens and `</s>`, averaged per sequence, each QA weighing 1 and each
caption `--caption-weight`; plus `--aux-weight` times a per-patch probe loss (a linear head on the vision
features predicts colour, shape and size of the object under each patch; the head is dropped at export);
plus `--focus-weight` times the focus loss (see `shared_prefix_logits`): one attention head of a middle decoder
layer is taught to look, when predicting an answer word, at the grid cells the answer is seen in.
AdamW, linear warm-up then cosine decay, gradient clipping at 1.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from st3.data.model import ModelSpec, build_model, parameter_count
from st3.data.processor import IMAGE, PATCH_SIZE, build_processor, pixel_values, prompt
from st3.data.scenes import COLOURS, GRID, SHAPES, SIZES, scene
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
    patch_labels: torch.Tensor  # [B, patches, 3]: colour, shape, size of the object under each patch (0: none)
    image_start: int  # index of the first image token in the prefix
    focus_rows: torch.Tensor  # [Q]: suffix row of each supervised query
    focus_pos: torch.Tensor  # [Q]: its position in the suffix (the token that predicts an answer word)
    focus_mask: torch.Tensor  # [Q, patches] bool: the patches of the grid cells the answer is seen in


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


def patch_owner(sc, patch_size: int, min_pixels: int = 6) -> np.ndarray:
    """[patches] (raster order): index of the object covering at least `min_pixels` of each patch (the one
    covering most), or -1 for background."""
    grid = sc.owner.shape[0] // patch_size
    owner = sc.owner.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(owner == i).sum(1) for i in range(len(sc.objects))], axis=1)
    return np.where(counts.max(1) >= min_pixels, counts.argmax(1), -1)


def patch_labels(sc, patch_size: int, min_pixels: int = 6) -> torch.Tensor:
    """[patches, 3] labels of each patch (raster order): 1 + colour, 1 + shape, 1 + size of the object covering
    at least `min_pixels` of it (the one covering most), or 0, 0, 0 for background."""
    best = patch_owner(sc, patch_size, min_pixels)
    table = np.array([[0, 0, 0]] + [[COLOURS.index(o.colour) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
                                    for o in sc.objects])  # fmt: skip
    return torch.from_numpy(table[best + 1]).long()


def focus_mask(sc, cells, cell_of_patch: torch.Tensor, owner: np.ndarray, target: str) -> torch.Tensor:
    """[patches] bool: where the answer about `cells` is seen. target "cells": all patches of those grid cells;
    "objects": the patches of the object in each cell (all patches of the cell where it holds none)."""
    mask = torch.zeros_like(cell_of_patch, dtype=torch.bool)
    for row, col in cells:
        obj = next((i for i, o in enumerate(sc.objects) if (o.row, o.col) == (row, col)), None)
        own = torch.from_numpy(owner == obj) if obj is not None else None
        if target == "objects" and own is not None and own.any():
            mask |= own
        else:
            mask |= cell_of_patch == row * GRID + col
    return mask


class PatchProbe(nn.Module):
    """Auxiliary training head (not exported): a linear read-out of colour, shape and size of the object under
    each patch. Dense per-patch supervision gets the vision tower to encode objects where they are long before
    the answer loss alone would. at="projector" reads the projector's output (the visual tokens the decoder
    gets), so the projector must keep what the tower found; at="vision" reads the tower's output only (then the
    projector was seen to drop most of the colour information while the decoder was still learning)."""

    def __init__(self, model, at: str = "projector"):
        super().__init__()
        config = model.config
        width = config.text_config.hidden_size if at == "projector" else config.vision_config.hidden_size
        self.at = at
        self.head = nn.Linear(width, len(COLOURS) + 1 + len(SHAPES) + 1 + len(SIZES) + 1)
        self.features: torch.Tensor | None = None
        projector = model.model.multi_modal_projector
        if at == "projector":
            projector.register_forward_hook(lambda module, args, out: setattr(self, "features", out))
        else:
            projector.register_forward_pre_hook(lambda module, args: setattr(self, "features", args[0]))

    def loss(self, labels: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Colour (or none) over all patches, shape and size over the patches an object covers."""
        features = self.features if features is None else features
        self.features = None
        colour, shape, size = torch.split(self.head(features), [len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1], -1)
        on = labels[..., 0] > 0
        loss = F.cross_entropy(colour.flatten(0, 1), labels[..., 0].flatten())
        loss = loss + F.cross_entropy(shape[on], labels[..., 1][on]) + F.cross_entropy(size[on], labels[..., 2][on])
        with torch.no_grad():
            stats = {
                "probe_colour": (colour.argmax(-1)[on] == labels[..., 0][on]).float().mean().item(),
                "probe_shape": (shape.argmax(-1)[on] == labels[..., 1][on]).float().mean().item(),
                "probe_size": (size.argmax(-1)[on] == labels[..., 2][on]).float().mean().item(),
            }
        return loss / 3, stats

    def vision_loss(self, model, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The probe loss from the vision tower (and projector) alone, without the decoder."""
        config = model.config
        out = model.model.vision_tower(pixels, output_hidden_states=True)
        features = out.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        model.model.multi_modal_projector(features)  # the hooks capture what the probe reads
        return self.loss(labels)


def patch_cells(image_tokens: int, patch_size: int) -> torch.Tensor:
    """[patches]: the grid cell (row * GRID + col) holding each patch's centre."""
    side = math.isqrt(image_tokens)
    centres = (torch.arange(side) + 0.5) * patch_size
    index = (centres / (side * patch_size / GRID)).long().clamp(max=GRID - 1)
    return (index[:, None] * GRID + index[None, :]).flatten()


def make_batch(tokenizer, seeds: list[int], questions: int, caption_weight: float, image_tokens: int,
               patch_size: int = PATCH_SIZE, focus_target: str = "objects") -> Batch:  # fmt: skip
    prefix = split_prompt(tokenizer, image_tokens)
    scenes = [scene(s) for s in seeds]
    rows, weights, repeats, focus = [], [], [], []
    cell_of_patch = patch_cells(image_tokens, patch_size)
    for sc in scenes:
        owner = patch_owner(sc, patch_size)
        rng = random.Random(f"train:{sc.seed}")
        seen: set[str] = set()
        for _ in range(questions * 4):
            if len(seen) == questions:
                break
            qa = draw_qa(sc, rng)
            if qa.question in seen:
                continue
            seen.add(qa.question)
            ids, prompt_len = sequence_ids(tokenizer, qa.question, qa.answer)
            if qa.focus:
                focus.append((len(rows), prompt_len - 1, focus_mask(sc, qa.focus, cell_of_patch, owner, focus_target)))
            rows.append((ids, prompt_len))
            weights.append(1.0)
        n = len(seen)
        if caption_weight > 0:
            ids, prompt_len = sequence_ids(tokenizer, CAPTION_PROMPT, caption(sc))
            for k, o in enumerate(sc.objects):  # "size colour shape at row col ," per object
                for t in (0, 1, 2, 4, 5):
                    where = focus_mask(sc, [(o.row, o.col)], cell_of_patch, owner, focus_target)
                    focus.append((len(rows), prompt_len + 7 * k + t - 1, where))
            rows.append((ids, prompt_len))
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
        patch_labels=torch.stack([patch_labels(sc, patch_size) for sc in scenes]),
        image_start=prefix.index(tokenizer.convert_tokens_to_ids(IMAGE)),
        focus_rows=torch.tensor([r for r, _, _ in focus], dtype=torch.long),
        focus_pos=torch.tensor([q for _, q, _ in focus], dtype=torch.long),
        focus_mask=torch.stack([m for _, _, m in focus]) if focus else torch.zeros(0, image_tokens, dtype=torch.bool),
    )


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def shared_prefix_logits(
    model, batch: Batch, groups: int = 2, focus_layer: int | None = None, focus_heads: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [N, S, V] of the suffixes, each continuing its scene's prefix (run once per scene).

    Suffixes are run in `groups` length-sorted groups (short questions apart from long captions), each on its
    own copy of the prefix cache, so short rows are not padded to caption length.

    With `focus_layer`, also the focus loss: for each supervised query (the token that predicts an answer word),
    the attention of the first `focus_heads` heads of that decoder layer, recomputed from the query row and the
    layer's cached keys, should fall on the patches of the grid cells the answer is seen in; the loss is
    -log(attention mass there), averaged. It teaches the decoder where to look, which the answer loss alone
    teaches only after a long plateau.
    """
    images = batch.pixel_values.shape[0]
    prefix = batch.prefix_ids.expand(images, -1)
    width_prefix = prefix.shape[1]
    out = model(input_ids=prefix, pixel_values=batch.pixel_values, use_cache=True, logits_to_keep=1)
    # the logits of the last prefix token would predict the first question token: never supervised
    prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    owner = torch.arange(images).repeat_interleave(batch.repeats)
    lengths = (batch.suffix_ids != batch.pad_id).sum(1)
    order = torch.argsort(lengths, stable=True)
    logits = None
    focus_terms = []
    captured = {}
    hook = None
    if focus_layer is not None and len(batch.focus_rows):
        language_model = model.model.language_model
        attention = language_model.layers[focus_layer].self_attn
        hook = attention.q_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("q", o))
    try:
        for rows in torch.tensor_split(order, groups):
            if len(rows) == 0:
                continue
            width = int(lengths[rows].max())
            cache = DynamicCache(config=model.config.text_config)
            for i, (k, v) in enumerate(prefix_kv):
                cache.update(k[owner[rows]], v[owner[rows]], i)
            positions = torch.arange(width_prefix, width_prefix + width).expand(len(rows), -1)
            part = model(
                input_ids=batch.suffix_ids[rows, :width], position_ids=positions, past_key_values=cache, use_cache=False
            ).logits
            if logits is None:
                logits = part.new_zeros(batch.suffix_ids.shape + part.shape[-1:])
            logits[rows, :width] = part
            if hook is None:
                continue
            local = torch.full((batch.suffix_ids.shape[0],), -1)
            local[rows] = torch.arange(len(rows))
            pick = (local[batch.focus_rows] >= 0).nonzero().flatten()
            if len(pick) == 0:
                continue
            r, pos = local[batch.focus_rows[pick]], batch.focus_pos[pick]
            head_dim, heads = attention.head_dim, attention.config.num_attention_heads
            q = captured["q"][r, pos].view(len(pick), heads, head_dim)[:, :focus_heads]
            cos, sin = language_model.rotary_emb(q, position_ids=(width_prefix + pos)[:, None])
            q = rotate_half(q, cos, sin)  # cos, sin [Q, 1, D] broadcast over heads
            keys = cache.layers[focus_layer].keys[r]  # [Q, kv_heads, P + width, D], rotated
            groups_per_kv = heads // keys.shape[1]
            keys = keys[:, torch.arange(focus_heads) // groups_per_kv]  # [Q, focus_heads, P + width, D]
            scores = torch.einsum("qhd,qhkd->qhk", q, keys) * attention.scaling
            causal = torch.arange(keys.shape[2])[None, :] > (width_prefix + pos)[:, None]
            probs = scores.masked_fill(causal[:, None], float("-inf")).softmax(-1)
            image = probs[..., batch.image_start : batch.image_start + batch.focus_mask.shape[1]]
            mass = (image * batch.focus_mask[pick][:, None]).sum(-1)  # [Q, focus_heads]
            focus_terms.append(-(mass + 1e-6).log().flatten())
    finally:
        if hook is not None:
            hook.remove()
    focus_loss = torch.cat(focus_terms).mean() if focus_terms else None
    return logits, focus_loss


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


def save_checkpoint(path: Path, model, probe, optimizer, step: int, args: dict, spec: ModelSpec) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "probe": probe.state_dict() if probe is not None else None,
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
    p.add_argument("--steps", type=int, default=6400, help="total steps, the vision phase included")
    p.add_argument("--vision-steps", type=int, default=400, help="first steps: vision tower + patch probe only")
    p.add_argument("--vision-images", type=int, default=16, help="scenes per vision-phase step")
    p.add_argument("--images", type=int, default=4, help="scenes per step")
    p.add_argument("--questions", type=int, default=16, help="distinct questions per scene")
    p.add_argument("--caption-weight", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-fraction", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--probe-at",
        choices=["projector", "vision"],
        default="projector",
        help="what the per-patch probe reads: the projector's output or the vision tower's",
    )
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch probe loss (0: off)")
    p.add_argument("--focus-weight", type=float, default=0.5, help="weight of the attention focus loss (0: off)")
    p.add_argument("--focus-layer", type=int, default=-1, help="decoder layer of the focus loss (-1: the middle)")
    p.add_argument("--focus-heads", type=int, default=2, help="heads of that layer the focus loss applies to")
    p.add_argument(
        "--focus-target",
        choices=["objects", "cells"],
        default="objects",
        help="attend to the object's patches, or to its whole grid cell",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="checkpoint and stop at this step without exporting; a later run resumes (0: run to --steps)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-qa", type=int, default=200)
    p.add_argument("--eval-captions", type=int, default=40)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--export-only", action="store_true", help="export the checkpoint in --out and stop")
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
    focus_layer = None
    if args.focus_weight > 0:
        focus_layer = args.focus_layer if args.focus_layer >= 0 else spec.text_layers // 2
    probe = PatchProbe(model, args.probe_at) if args.aux_weight > 0 or args.vision_steps > 0 else None
    named = list(model.named_parameters()) + (list(probe.named_parameters()) if probe else [])
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
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
        if probe is not None:
            probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    print(f"model: {parameter_count(model) / 1e6:.2f}M parameters, spec {dataclasses.asdict(spec)}", flush=True)
    if args.export_only:  # the checkpoint as it stands (best so far), without training on
        model.eval()
        export(model, processor, args.export)
        print(f"saved the step-{step} model and processor to {args.export}", flush=True)
        return {"step": step}

    train_start, train_end = SPLITS["train"]
    last_save = time.time()
    running: dict[str, float] = {}
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=2.0)
    step_times: list[float] = []
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    while step < stop:
        t0 = time.time()
        if step < args.vision_steps:  # phase 1: the vision tower and probe alone, on many images per step
            lr = lr_at(step, 10**9, args.lr, args.warmup)  # warm-up, then constant
            seeds = [train_end - 1 - (step * args.vision_images + j) % (train_end - train_start)
                     for j in range(args.vision_images)]  # fmt: skip
            scenes = [scene(s) for s in seeds]
            labels = torch.stack([patch_labels(sc, spec.patch_size) for sc in scenes])
            loss, stats = probe.vision_loss(model, pixel_values([sc.image for sc in scenes]), labels)
            stats["aux_loss"] = loss.item()
        else:  # phase 2: everything
            lm_step = step - args.vision_steps
            lr = lr_at(lm_step, args.steps - args.vision_steps, args.lr, args.warmup, args.min_lr_fraction)
            seeds = [train_start + (lm_step * args.images + j) % (train_end - train_start) for j in range(args.images)]
            batch = make_batch(
                tokenizer,
                seeds,
                args.questions,
                args.caption_weight,
                spec.image_tokens,
                spec.patch_size,
                args.focus_target,
            )
            logits, focus = shared_prefix_logits(model, batch, focus_layer=focus_layer, focus_heads=args.focus_heads)
            loss, stats = loss_of(logits, batch)
            if focus is not None:
                stats["focus_loss"] = focus.item()
                loss = loss + args.focus_weight * focus
            if probe is not None and args.aux_weight > 0:
                aux, probe_stats = probe.loss(batch.patch_labels)
                stats |= {"aux_loss": aux.item()} | probe_stats
                loss = loss + args.aux_weight * aux
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0).item()
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
        if step > args.vision_steps and (step % args.eval_every == 0 or step == args.steps):
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
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == stop:
            save_checkpoint(ckpt_path, model, probe, optimizer, step, vars(args), spec)
            last_save = time.time()
    bar.close()
    if step < args.steps:
        print(f"stopped at step {step} (--stop-at); the checkpoint is in {ckpt_path}", flush=True)
        return {"step": step}
    model.eval()
    export(model, processor, args.export)
    print(f"saved model and processor to {args.export}", flush=True)
    return {"step": step}


if __name__ == "__main__":
    main()
