"""The scenes LLaVA: a small CLIP-style vision tower, the LLaVA MLP projector and a small Llama decoder.

`ScenesSpec` holds the few numbers that shape it; `build_scenes_model(spec)` makes a randomly initialised
`LlavaForConditionalGeneration` from stock transformers config classes, so a trained checkpoint loads with
`LlavaForConditionalGeneration.from_pretrained(dir)` and no custom code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from st3.models import ModelSpec, llava_config
from st3_scenes.processor import BOS, EOS, IMAGE, PAD, PATCH_SIZE, vocabulary
from st3_scenes.scenes import IMAGE_SIZE


@dataclass(frozen=True)
class ScenesSpec:
    """The few numbers that shape the scenes LLaVA (its vision tower and decoder)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    # Width of a decoder head (None: text_hidden // text_heads, i.e. 32). Wider heads have more rotary
    # frequencies slow enough to match a patch by what it holds wherever it lies (see rope_theta), without
    # giving up the fast ones that lookups by position use.
    text_head_dim: int | None = None
    text_intermediate: int = 384
    max_positions: int = 512
    # Rotary base of the decoder. A head of width 32 has only 16 rotary frequencies, and at the default base
    # of 10,000 only the slowest few turn little over the ~330 positions between an answer and the image's
    # first patch: only those can match a patch by what it holds wherever it lies. A larger base (as Llama 3
    # and Qwen use) slows more of them down; tried at 1e6 in a full run, it did not help (README, grid6).
    rope_theta: float = 10_000.0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def config(self) -> LlavaConfig:
        """The stock LLaVA config (`st3.models.llava_config`, the one builder of st3's models) with the scenes
        vocabulary's special tokens."""
        vocab = {word: i for i, word in enumerate(vocabulary())}
        spec = ModelSpec(
            "scenes-llava", self.text_hidden, self.text_layers, self.text_heads, self.text_kv_heads,
            self.text_intermediate, len(vocab), self.image_size, patch_size=self.patch_size,
            vision_hidden=self.vision_hidden, vision_layers=self.vision_layers, vision_heads=self.vision_heads,
            head_dim=self.text_head_dim, rope_theta=self.rope_theta, max_positions=self.max_positions,
        )  # fmt: skip
        return llava_config(spec, image_token=vocab[IMAGE], pad_token=vocab[PAD], bos_token=vocab[BOS],
                            eos_token=vocab[EOS])  # fmt: skip


def sincos_2d(grid: int, dim: int, heads: int = 1) -> torch.Tensor:
    """2-D sine-cosine position codes [grid*grid, dim].

    The channels split into `heads` equal blocks; each block holds, for its own band of frequencies, the
    sine and cosine of the row and of the column, so that within one attention head the dot product of two
    codes is a sum of cos(w * row distance) + cos(w * column distance): largest for nearby patches.
    """
    per = dim // heads // 4
    freqs = 1.0 / (64.0 ** (torch.arange(per * heads, dtype=torch.float64) / (per * heads)))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten().double(), cols.flatten().double()
    blocks = []
    for h in range(heads):
        f = freqs[h * per : (h + 1) * per]
        r, c = rows[:, None] * f, cols[:, None] * f
        blocks.append(torch.stack([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1).flatten(1))
        blocks.append(torch.zeros(len(rows), dim // heads - 4 * per, dtype=torch.float64))
    return torch.cat(blocks, dim=1).float()


def build_scenes_model(
    spec: ScenesSpec | None = None,
    seed: int = 0,
    attn: str = "sdpa",
    position_scale: float = 0.5,
    local_attention: float = 2.0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised scenes LLaVA (fp32), with generation set to stop at `</s>`.

    Two choices of initialisation (the architecture stays stock CLIP + LLaVA + Llama) make a vision
    transformer trained from scratch on a few thousand images see shapes:

    - the vision tower's learned position embeddings start from 2-D sine-cosine codes times
      `position_scale` (laid out per head, see `sincos_2d`) instead of small random numbers;
    - its query and key projections start as `local_attention` times the identity plus a third of the
      random init, so each head's scores start as a sum of cosines of the patch distance: local attention
      at several scales, which a randomly initialised ViT takes many thousands of steps to discover.

    `position_scale=0` and `local_attention=0` give the stock random init.
    """
    spec = spec or ScenesSpec()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(spec.config())
    tower = model.model.vision_tower
    grid = spec.image_size // spec.patch_size
    with torch.no_grad():
        if position_scale:
            codes = sincos_2d(grid, spec.vision_hidden, spec.vision_heads)
            tower.embeddings.position_embedding.weight[1:] = position_scale * codes
        if local_attention:
            eye = torch.eye(spec.vision_hidden)
            for layer in tower.encoder.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.copy_(local_attention * eye + 0.3 * proj.weight)
    model.set_attn_implementation(attn)
    vocab = {word: i for i, word in enumerate(vocabulary())}
    model.generation_config.eos_token_id = vocab[EOS]
    model.generation_config.pad_token_id = vocab[PAD]
    model.generation_config.bos_token_id = vocab[BOS]
    return model


def save_tiny(path: str | Path) -> str:
    """Save a tiny random scenes LLaVA with its processor to `path` (tests: loaded back like a hub checkpoint)."""
    from st3_scenes.processor import build_processor

    spec = ScenesSpec(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=4,
                      text_heads=2, text_kv_heads=1, text_intermediate=64)  # fmt: skip
    build_scenes_model(spec).save_pretrained(path)
    build_processor().save_pretrained(path)
    return str(path)


def spec_dict(spec: ScenesSpec) -> dict:
    return asdict(spec)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
