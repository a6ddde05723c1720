"""st3's own lmms-eval model class, for the families no lmms-eval class loads (docs/lmms-eval.md).

lmms-eval 0.7.3 has no Idefics3 / SmolVLM class (its `idefics2` loads Idefics2 and imports torchvision), and its
generic `huggingface` class looks the model type up among config classes, misses, and loads the bare
`Idefics3Model` (no language-model head, so nothing to generate with). This class only loads: the model with
`AutoModelForImageTextToText` and its processor; the plugin's `BatchedHF` answers the requests.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from lmms_eval.api.model import lmms
from transformers import AutoModelForImageTextToText, AutoProcessor


class ImageTextToText(lmms):
    """A transformers image-text-to-text model and its processor, for `st3_idefics3` (Idefics3, SmolVLM)."""

    def __init__(
        self,
        pretrained: str,
        device: str = "cuda",
        device_map: str | None = None,
        dtype: str = "auto",
        batch_size: int = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        accelerator = Accelerator()
        self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        if self._world_size > 1:  # data parallel: one full copy per process, as llava_hf does
            device = device_map = f"cuda:{self._rank}"
        self._device = torch.device(device)
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=dtype, device_map=device_map or device, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).eval()  # fmt: skip
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.pretrained, self.batch_size_per_gpu = pretrained, int(batch_size)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("st3_idefics3: multi-round generation is not supported")
