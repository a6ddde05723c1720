"""A small guide for SGL on the scenes benchmark: the shipped scenes model cut to its first decoder layers.

    python scenes/scripts/make_guide.py --layers 2 --out runs/scenes-guide-2l
    st3 eval scenes/st3_scenes/assets/scenes-llava -m sgl:guide=runs/scenes-guide-2l ...

SGL wants a smaller VLM of the same family: the same visual tokens in the same columns. No separately trained
small scenes model exists (training one is the 53-minute run of TRAINING.md again), so the guide is the same
model's vision tower, projector and first `layers` decoder layers (a truncated model, not an independently
trained one: its attention is the large model's first layers' own, which makes SGL here a self-guided variant).
"""

from __future__ import annotations

import argparse

from transformers import AutoProcessor, LlavaForConditionalGeneration

from st3.compat import LOAD_KWARGS
from st3_scenes import MODEL_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="the scenes model to cut")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers the guide keeps (the first ones)")
    parser.add_argument("--out", required=True, help="directory to write the guide to")
    args = parser.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, **LOAD_KWARGS)
    decoder = model.model.language_model
    if not 0 < args.layers < len(decoder.layers):
        raise SystemExit(f"--layers: must be in [1, {len(decoder.layers) - 1}], got {args.layers}")
    decoder.layers = decoder.layers[: args.layers]
    model.config.text_config.num_hidden_layers = args.layers
    if isinstance(getattr(model.config.text_config, "layer_types", None), list):
        model.config.text_config.layer_types = model.config.text_config.layer_types[: args.layers]
    model.save_pretrained(args.out)
    AutoProcessor.from_pretrained(args.model).save_pretrained(args.out)
    print(f"wrote a {args.layers}-layer guide to {args.out}")


if __name__ == "__main__":
    main()
