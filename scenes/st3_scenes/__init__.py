"""The scenes benchmark: seed-addressable synthetic images with one-word questions and template captions,
its trainer, and the small LLaVA trained on it (`MODEL_DIR`), which `st3 demo` and `st3 eval` use.

It lives beside the st3 library, not inside it: st3's wheel holds no trainer and no checkpoint.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "assets" / "scenes-llava"
"""The trained scenes LLaVA, loadable with `LlavaForConditionalGeneration.from_pretrained(MODEL_DIR)`."""
