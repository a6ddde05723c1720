"""Timing and memory of one `generate` call, with or without a token-trimming method applied.

One call gives all three times: a LogitsProcessor stamps the clock each time generate has fresh logits,
i.e. after every forward. The first stamp ends the prefill (image encoding, the prompt's forward, the
first token), the last one the final decode forward, so

    prefill  = first stamp - start
    decode   = (last stamp - first stamp) / (N - 1)   per generated token after the first
    end to end = return of generate - start

No separate forward is needed, and the three figures come from the same run. On CUDA the clock
synchronises the device before each stamp.
"""

from __future__ import annotations

import copy
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from st3.bench.harness import CLOCKS, check_clock
from st3.compare import timed_generate
from st3.compat import cache_of
from st3.methods.base import Method

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class StepClock(LogitsProcessor):
    """Records the clock every time generate processes logits (once per forward)."""

    def __init__(self, sync: bool = False, clock=time.perf_counter):
        self.sync = sync
        self.clock = clock
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.sync:
            torch.cuda.synchronize()
        self.stamps.append(self.clock())
        return scores


# ------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so it covers one run; False where Linux won't."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (`VmHWM`, `VmRSS`) in bytes; None where the kernel has none."""
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM (since the last reset) or getrusage's lifetime peak."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def rss_bytes() -> int:
    """Current resident memory of this process."""
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()


def cache_bytes_per_layer(cache) -> list[int]:
    """Bytes of each layer's key and value tensors in a transformers cache, read from the tensors."""
    sizes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        sizes.append(sum(t.nbytes for t in (keys, values) if isinstance(t, torch.Tensor)))
    return sizes


# ------------------------------------------------------------------------------------------- one run
@dataclass
class Sample:
    """What one timed generate call measured."""

    prefill_s: float
    decode_s_per_token: float
    e2e_s: float
    new_tokens: int
    batch_size: int
    rss_peak_bytes: int
    """Process RSS high-water mark during the run (weights included)."""
    rss_before_bytes: int
    """RSS when the run started: the peak minus this is the run's working memory."""
    rss_scope: str
    """'run' when the high-water mark was reset before the run, 'process' when it covers the process."""
    device_peak_bytes: int | None
    """torch.cuda.max_memory_allocated during the run, on CUDA."""
    kv_bytes_final: int
    """Sum of the key/value tensors' bytes in the cache generate returned."""
    kv_bytes_per_layer: list[int]
    kv_bytes_peak: int
    """Largest cache size after any forward: from the method's trace, or the final size without a method
    (an unpruned cache only grows)."""
    trace: dict | None = field(default=None, repr=False)
    """The method's trace summary, plus visual tokens per layer over decode steps."""
    token_s: list[float] = field(default_factory=list, repr=False)
    """Seconds from the start of generate to each token's logits: token k's end-to-end time (st3 frontier)."""

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.e2e_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size / self.decode_s_per_token if self.decode_s_per_token else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["e2e_tokens_per_s"] = self.e2e_tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


def generation_config(model, new_tokens: int):
    """The model's generation config, greedy, with no end token: every run makes exactly `new_tokens`."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = new_tokens
    config.min_new_tokens = None
    config.eos_token_id = None
    config.do_sample = False
    config.num_beams = 1
    config.return_dict_in_generate = True
    for name in ("temperature", "top_p", "top_k"):
        setattr(config, name, None)
    return config


def measure_generate(
    model, inputs: dict, new_tokens: int, method: Method | None = None, clock: str = "wall"
) -> Sample:
    """Run `model.generate` once (under `method` when given) and measure time, memory and the KV cache."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to separate prefill from decode")
    cuda = model.device.type == "cuda"
    check_clock(clock, model.device)
    now = CLOCKS[clock]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    scoped = reset_peak_rss()
    rss_before = rss_bytes()
    stamps = StepClock(sync=cuda, clock=now)
    config = generation_config(model, new_tokens)
    timed = timed_generate(model, inputs, method, clock=now, sync=cuda, generation_config=config,
                           logits_processor=LogitsProcessorList([stamps]))  # fmt: skip
    out = timed.output
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    if generated != new_tokens or len(stamps.stamps) != new_tokens:
        raise RuntimeError(f"generate made {generated} tokens ({len(stamps.stamps)} forwards), not {new_tokens}")
    per_layer = cache_bytes_per_layer(cache_of(out))
    trace = trace_digest(method) if method is not None else None
    return Sample(
        prefill_s=stamps.stamps[0] - timed.start,
        decode_s_per_token=(stamps.stamps[-1] - stamps.stamps[0]) / (new_tokens - 1),
        e2e_s=timed.seconds,
        new_tokens=new_tokens,
        batch_size=inputs["input_ids"].shape[0],
        rss_peak_bytes=peak_rss_bytes(),
        rss_before_bytes=rss_before,
        rss_scope="run" if scoped else "process",
        device_peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        kv_bytes_final=sum(per_layer),
        kv_bytes_per_layer=per_layer,
        kv_bytes_peak=trace["kv_bytes_peak"] if trace else sum(per_layer),
        trace=trace,
        token_s=[stamp - timed.start for stamp in stamps.stamps],
    )


def trace_digest(method: Method) -> dict:
    """The trace summary plus [step][layer] visual tokens (mean over samples), row 0 after prefill."""
    trace = method.trace
    summary = trace.summary()
    steps = [trace.visual_per_layer]
    for step in trace.decode_visual_counts:
        steps.append([sum(layer) / trace.batch_size for layer in step])
    summary["visual_over_steps"] = steps
    return summary
