"""Device-to-host syncs per decode forward of the decoder stack (engine or vanilla), 32-layer tiny LLaVA.

    .venv/bin/python benchmarks/overhead_syncs.py

Counts calls of Tensor.__bool__ / item / tolist / __int__ / __float__ / __index__ / nonzero / numpy / cpu
made inside each decode forward, for the engine under three methods and for the stock decoder stack.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import BATCH  # noqa: E402

import st3  # noqa: E402
import st3.engine.forward as F  # noqa: E402
from st3.testing import tiny_inputs, tiny_llava  # noqa: E402

torch.set_num_threads(1)
NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")
state = {"on": False, "n": []}


def wrap(fn):
    def w(*a, **k):
        if state["on"]:
            state["n"][-1] += 1
        return fn(*a, **k)

    return w


for n in NAMES:
    setattr(torch.Tensor, n, wrap(getattr(torch.Tensor, n)))


def around(fn):
    def w(*a, **k):
        state["n"].append(0)
        state["on"] = True
        try:
            return fn(*a, **k)
        finally:
            state["on"] = False

    return w


F.Engine._decode = around(F.Engine._decode)
model = tiny_llava(layers=32, image_size=96)
lm = model.model.language_model
for label, inputs in (("batch 1", tiny_inputs(model, ((35, 40),))), ("padded batch 3", tiny_inputs(model, BATCH))):
    for name, make in (("noop", lambda: st3.ST3(ratio=0.0, anneal_final=1.0)), ("st3", st3.ST3), ("fastv", st3.FastV)):
        state["n"] = []
        with torch.no_grad(), make()(model):
            model.generate(**inputs, max_new_tokens=17, do_sample=False)
        n = state["n"]
        evict = [n[t] for t in range(len(n)) if (t + 1) % 4 == 0]
        other = [n[t] for t in range(len(n)) if (t + 1) % 4]
        print(
            f"{label:15s} {name:6s} syncs per decode forward: max {max(n)}, total {sum(n)} over {len(n)} forwards; "
            f"ST3 budget steps {evict} / other steps max {max(other)}"
        )
    # vanilla: the stock decoder stack's forward
    state["n"] = []
    orig = type(lm).forward

    def counted(self, *a, orig=orig, **k):
        cache = k.get("cache", k.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return around(orig)(self, *a, **k)
        return orig(self, *a, **k)

    type(lm).forward = counted
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=17, do_sample=False)
    type(lm).forward = orig
    n = state["n"]
    print(f"{label:15s} vanilla syncs per decode forward: max {max(n)}, total {sum(n)} over {len(n)} forwards")
