"""What a method did during the last forward or generate call: kept tokens, KV bytes and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from st3.accounting import Shape, decode_flops, prefill_flops, unpruned_flops


@dataclass
class Trace:
    """A record of one prefill and the decode forwards that followed it.

    Positions are column indices into the prompt's `input_ids` (padding included), so they can be mapped
    back to image patches. Counts exclude padding slots.
    """

    method: str
    shape: Shape
    batch_size: int
    prompt_columns: int
    """Width of the (padded) prompt, in tokens."""
    prompt_tokens: list[int]
    """Non-padding prompt tokens per sample."""
    visual_tokens: list[int]
    """Visual tokens per sample in the prompt."""
    dtype_bytes: int
    note: str = ""
    """Why nothing was pruned, or less than the method asks, where that happened (`explain`); also what a method
    merged before the decoder."""
    image_grids: list | None = None
    """Per sample, the image/frame grids (`st3.adapters.Grid`) its visual tokens tile, in prompt order (None
    where the model's adapter gives no layout)."""
    # The engine logs tensors and never waits for the device; the lists below are built when read.
    _prefill_log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    """[layer]: (columns, valid, visual) of the rows the layer processed, each [B, S]."""
    _decode_log: list[tuple[list[list[int]], list[list[int]]]] = field(default_factory=list, repr=False)
    """[step]: (visual tokens attended, keys attended), each [layer][sample], host counts the engine keeps.
    The per-layer lists are shared between steps until they change: never edit them in place."""
    _merge_log: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=list, repr=False
    )
    """(layer, ids [B, M], valid [B, M], members [B, M, S], columns [B, S]) of each layer entering which the method
    added merged rows (`merged`)."""
    decode_visual_positions: list[list[list[torch.Tensor]]] | None = None
    """[step][layer][sample]: columns of those visual tokens (only with `record_positions=True`); merged rows
    have their negative ids (`merged`)."""
    windows: list[int | None] | None = None
    """Each layer's sliding window in columns (None: full attention), where the engine knows them."""
    evicted: bool = False
    """Whether a decode forward evicted visual tokens (a sliding window's own drops are no eviction)."""
    kv_bytes: int | None = 0
    """Bytes held by the KV cache after the last forward, measured from the cache tensors (a static cache: its
    whole buffer); None where the cache keeps data st3 cannot read (e.g. quantized): not measured."""
    kv_bytes_peak: int | None = 0
    """Largest `kv_bytes` seen after any forward of the call (None once one was not measured)."""
    guide_flops: int = 0
    """FLOPs of a guide model the method ran besides the decoder (SGL's small VLM, its decoder at prefill):
    `flops()["guide"]`, apart from the decoder's counts that the planner predicts."""

    # ------------------------------------------------------------------------------------- the record
    def log_kv(self, nbytes: int | None) -> None:
        """Record the KV cache's bytes after a forward (None: not measured)."""
        self.kv_bytes = nbytes
        peak = self.kv_bytes_peak
        self.kv_bytes_peak = None if nbytes is None or peak is None else max(peak, nbytes)

    def log_prefill_layer(self, columns: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> None:
        """Record the rows one layer processed during prefill, each [B, S] (kept as tensors)."""
        self._prefill_log.append((columns, valid, visual))

    def log_merged(self, layer: int, ids: torch.Tensor, valid: torch.Tensor, members: torch.Tensor,
                   columns: torch.Tensor) -> None:  # fmt: skip
        """Record the merged rows added entering `layer`: their ids, which are real, and each one's members (the
        slots, whose ids are `columns`, that it averages)."""
        self._merge_log.append((layer, ids, valid, members, columns))

    def log_decode_step(self, attended: list[tuple[list[int], list[int], list[torch.Tensor] | None]]) -> None:
        """Record, per layer, what one decode forward attended to: (visual tokens, keys) per sample (host counts),
        and the visual columns per sample where positions are recorded."""
        self._decode_log.append(([visual for visual, _, _ in attended], [keys for _, keys, _ in attended]))
        if self.decode_visual_positions is not None:
            self.decode_visual_positions.append([positions for _, _, positions in attended])

    @property
    def prefill_visual_positions(self) -> list[list[torch.Tensor]]:
        """[layer][sample]: sorted columns of the prompt's visual tokens whose key/value the layer holds after
        prefill (merged rows apart: `prefill_merged_positions`)."""
        log = self._prefill_log
        return [[c[m & (c >= 0)].cpu() for c, m in zip(cols, visual & valid)] for cols, valid, visual in log]

    @property
    def prefill_merged_positions(self) -> list[list[list[int]]]:
        """[layer][sample]: ids of the merged rows (`merged`) whose key/value the layer holds after prefill."""
        log = self._prefill_log
        return [[c[m & (c < 0)].tolist() for c, m in zip(cols, visual & valid)] for cols, valid, visual in log]

    @property
    def merged(self) -> dict[int, list[dict[int, list[int]]]]:
        """{layer: [sample]{id: member ids}}: the rows a method merged entering each layer (SparseVLM's recycling),
        each with the ids it averages (prompt columns, or the negative ids of earlier merged rows). A merged row
        takes the position of its prompt's last visual token and sits before the instruction."""
        out = {}
        for layer, ids, valid, members, columns in self._merge_log:
            out[layer] = [{int(i): columns[b][m].tolist() for i, ok, m in zip(ids[b], valid[b], members[b]) if ok}
                          for b in range(ids.shape[0])]  # fmt: skip
        return out

    @property
    def prefill_rows(self) -> list[list[int]]:
        """[layer][sample]: tokens the layer processed during prefill (padding excluded)."""
        return [valid.sum(-1).tolist() for _, valid, _ in self._prefill_log]

    @property
    def decode_visual_counts(self) -> list[list[list[int]]]:
        """[step][layer][sample]: visual tokens the query of each decode forward attended to."""
        return [[list(layer) for layer in visual] for visual, _ in self._decode_log]

    @property
    def decode_keys(self) -> list[list[list[int]]]:
        """[step][layer][sample]: keys (all kinds) the query of each decode forward attended to."""
        return [[list(layer) for layer in keys] for _, keys in self._decode_log]

    def explain(self, method) -> None:
        """At the end of prefill: add to `note` which samples kept every visual token, and which knob let them.

        A method asked to keep more tokens than an image has (`keep=192` on a 20-token Qwen image), or set to
        remove none (`ratio=0`), runs unpruned for those samples: the note says so instead of a silent no-op.
        """
        held = (self._prefill_log[-1][1] & self._prefill_log[-1][2]).sum(-1).tolist() if self._prefill_log else []
        untouched = [b for b, (n, h) in enumerate(zip(self.visual_tokens, held)) if 0 < n <= h]
        if not untouched:
            return
        counts = [self.visual_tokens[b] for b in untouched]
        why = _why_unpruned(method, counts, self.shape.num_layers)
        vta = method.annealing
        if len(untouched) < sum(n > 0 for n in self.visual_tokens):
            some = f"sample {untouched[0]}" if len(untouched) == 1 else f"samples {', '.join(map(str, untouched))}"
            text = f"{some} kept every visual token during prefill: {why}"
        elif vta is not None and vta.final < 1.0:
            text = f"nothing pruned during prefill: {why}; only the decode schedule (VTA) evicts, while generating"
        elif vta is not None:
            final = "anneal_final" if hasattr(method, "anneal_final") else "the decode schedule's final"
            text = f"nothing pruned: {why}, and {final}=1.0 evicts none while decoding"
        else:
            text = f"nothing pruned: {why}"
        self.note = f"{self.note}; {text}" if self.note else text

    # ----------------------------------------------------------------------------------------- derived
    @property
    def pruned(self) -> bool:
        """Whether any layer processed fewer visual tokens than the prompt had, or evicted some while decoding.

        Not read from the decode log: a sliding layer attends to fewer visual tokens once they leave its window,
        as it does unpruned."""
        full = torch.tensor(self.visual_tokens)
        held = [(valid & visual).sum(-1).cpu() for _, valid, visual in self._prefill_log]
        return self.evicted or any(bool((counts < full).any()) for counts in held)

    @property
    def decode_steps(self) -> int:
        return len(self._decode_log)

    @property
    def visual_per_layer(self) -> list[float]:
        """Mean over samples of the visual tokens each layer holds after prefill."""
        return [(valid & visual).sum().item() / self.batch_size for _, valid, visual in self._prefill_log]

    @property
    def visual_per_layer_final(self) -> list[float]:
        """Mean over samples of the visual tokens each layer attended to at the last decode forward."""
        if not self._decode_log:
            return self.visual_per_layer
        return [sum(layer) / self.batch_size for layer in self._decode_log[-1][0]]

    def flops(self) -> dict[str, int]:
        """Theoretical FLOPs of the run and of the same run unpruned, summed over samples."""
        layers = range(self.shape.num_layers)
        rows, decode_keys = self.prefill_rows, self.decode_keys
        out = dict(prefill=0, decode=0)
        for b in range(len(self.prompt_tokens)):
            out["prefill"] += prefill_flops(self.shape, [rows[layer][b] for layer in layers])
            for step in decode_keys:
                out["decode"] += decode_flops(self.shape, [step[layer][b] for layer in layers])
        out["total"] = out["prefill"] + out["decode"]
        full = unpruned_flops(self.shape, list(self.prompt_tokens), len(decode_keys) + 1)
        out |= {"prefill_unpruned": full["prefill"], "decode_unpruned": full["decode"], "total_unpruned": full["total"]}
        return out | {"guide": self.guide_flops}

    @property
    def kv_bytes_unpruned(self) -> int:
        """Bytes the unpruned model's cache would hold after the same forwards (same padded batch); a sliding layer
        holds the last window - 1 tokens, as transformers' own sliding cache does."""
        per_token = self.shape.kv_bytes_per_token(self.dtype_bytes)
        tokens = self.prompt_columns + self.decode_steps
        windows = self.windows or [None] * self.shape.num_layers
        held = sum(tokens if window is None else min(tokens, window - 1) for window in windows)
        return self.batch_size * held * per_token

    def summary(self) -> dict:
        """A JSON-ready digest: counts per layer, FLOPs and KV bytes with their ratios to unpruned."""
        flops = self.flops()
        return {
            "method": self.method,
            "pruned": self.pruned,
            "note": self.note,
            "batch_size": self.batch_size,
            "visual_tokens": self.visual_tokens,
            "prompt_tokens": self.prompt_tokens,
            "decode_steps": self.decode_steps,
            "visual_per_layer": self.visual_per_layer,
            "visual_per_layer_final": self.visual_per_layer_final,
            "mean_visual_per_layer": _mean(self.visual_per_layer),
            "flops": flops,
            "prefill_flops_ratio": _ratio(flops["prefill"], flops["prefill_unpruned"]),
            "total_flops_ratio": _ratio(flops["total"], flops["total_unpruned"]),
            "kv_bytes": self.kv_bytes,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_bytes_unpruned": self.kv_bytes_unpruned,
            "kv_ratio": None if self.kv_bytes is None else _ratio(self.kv_bytes, self.kv_bytes_unpruned),
        }


def _why_unpruned(method, counts: list[int], num_layers: int) -> str:
    """'keep=1000 on 324 visual tokens removes none': the method's budget knob against the samples' token counts."""
    knob = type(method).budget_knob
    tokens = " and ".join(dict.fromkeys(map(str, counts)))
    setting = f"{knob}={getattr(method, knob)!r}" if knob else f"{type(method).__name__}'s settings"
    text = f"{setting} on {tokens} visual tokens removes none"
    if knob and knob.endswith("layer"):
        text += f" (the model has {num_layers} layers)"
    min_keep = getattr(method, "min_keep", 0)
    if min_keep and min_keep >= min(counts):
        text += f" (min_keep={min_keep})"
    return text


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b else 1.0
