"""vLLM plugin: st3's rules that choose visual tokens before the language model, inside vLLM (docs/vllm.md).

    pip install "st3[vllm]"
    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides \\
        '{"architectures": ["St3LlavaForConditionalGeneration"], "st3": {"method": "spread", "keep": 0.5}}'

vLLM loads `register` through the `vllm.general_plugins` entry point (pyproject.toml) in every process it
starts. It only names the plugin's architectures (imported lazily, when a model asks for one), so a vLLM
that serves anything else runs exactly as without st3.
"""

from __future__ import annotations

#: architecture name -> "module:Class", selected with hf_overrides {"architectures": [name]}
ARCHITECTURES = {
    "St3LlavaForConditionalGeneration": "st3.plugins.vllm.llava:St3LlavaForConditionalGeneration",
    "St3Qwen2_5_VLForConditionalGeneration": "st3.plugins.vllm.qwen_vl:St3Qwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Name the plugin's model classes in vLLM's registry (new names: vLLM's own classes stay as they are)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
