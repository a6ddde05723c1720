"""The word-level tokenizer and the LLaVA processor of the scenes model (no torchvision needed).

The processor is a stock `LlavaProcessor`: a `PreTrainedTokenizerFast` over a `tokenizers` WordLevel model
(lower-casing, whitespace and punctuation splitting, `<s>` prepended, left padding) and a
`CLIPImageProcessorPil` (PIL/numpy backend). Saved with `save_pretrained`, it loads back with
`AutoProcessor.from_pretrained(dir)` exactly like a hub LLaVA-1.5 checkpoint, and expands the one `<image>`
of a prompt into `(image_size / patch_size) ** 2` image tokens.

Prompts follow LLaVA-1.5: `USER: <image>\\n{question} ASSISTANT:`; the answer follows after a space and ends
with `</s>`.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from st3_scenes.scenes import IMAGE_SIZE
from st3_scenes.tasks import words

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4
PATCH_SIZE = 8
# CLIP's normalisation constants (OPENAI_CLIP_MEAN / STD), as a hub LLaVA uses them
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt of one question about one image (what the chat template renders)."""
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


def vocabulary() -> list[str]:
    return [*SPECIALS, "user", "assistant", ":", *words()]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, no space before , ? .
    backend.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=1024,
    )


def build_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops again
        chat_template=CHAT_TEMPLATE,
    )


def pixel_values(images, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """What the image processor makes of images already `image_size` square: rescale and normalise only.

    A fast path for training (no resize is needed for generated scenes); it matches the processor output.
    """
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    if array.shape[1:3] != (image_size, image_size):
        raise ValueError(f"images must be {image_size}x{image_size}, got {array.shape[1:3]}")
    array = (array / 255.0 - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
