# Timing used for the packed-vs-shared-prefix comparison (WIP). /tmp/orig/orig_train.py was `git show 6ef44fe:st3/data/train.py`.
import sys, time, torch
from st3.data.model import ModelSpec, build_model
from st3.data.processor import build_processor
import sys; sys.path.insert(0, "/tmp/orig")
from orig_train import shared_prefix_logits
from st3.data.train import make_batch, packed_logits, loss_of, focus_heads_for
torch.set_num_threads(2)
hd = int(sys.argv[1]) if len(sys.argv) > 1 else None
spec = ModelSpec(text_head_dim=hd)
model = build_model(spec); model.train()
tok = build_processor().tokenizer
batches = [make_batch(tok, [100 + 4 * i + j for j in range(4)], 24, 1.5, spec.image_tokens, count_focus=True) for i in range(6)]
focus = focus_heads_for(2, 2, 1)
for fn in (shared_prefix_logits, packed_logits, shared_prefix_logits, packed_logits):
    times = []
    for b in batches:
        t = time.time()
        model.zero_grad()
        logits, fl = fn(model, b, focus=focus)
        (loss_of(logits, b)[0] + fl).backward()
        times.append(time.time() - t)
    print(fn.__name__, hd, [round(x, 2) for x in times], round(sum(times[1:]) / 5, 3), flush=True)
