"""Theoretical cost of a decoder stack: FLOPs and KV-cache bytes from token counts.

Counted: the decoder layers' matrix products (q/k/v/o projections, the gated MLP, and the two attention
products QK^T and AV over the (query, key) pairs that are actually attended, causal). Not counted: the
vision tower, the projector, embeddings, norms, softmax and the LM head, which pruning does not change.
One multiply-add is 2 FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder stack that its cost depends on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def linear_params_per_layer(self) -> int:
        """Weights multiplied once per token per layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + mlp

    def layer_flops(self, rows: int, pairs: int) -> int:
        """FLOPs of one layer for `rows` query tokens attending to `pairs` (query, key) pairs in total."""
        return 2 * rows * self.linear_params_per_layer + 4 * self.num_heads * self.head_dim * pairs

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token occupies in one layer's KV cache."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


def causal_pairs(rows: int) -> int:
    """(query, key) pairs of causal self-attention over `rows` tokens, each query seeing itself."""
    return rows * (rows + 1) // 2


def prefill_flops(shape: Shape, rows_per_layer: list[int]) -> int:
    """FLOPs of a prefill in which layer l processes rows_per_layer[l] tokens of one sample."""
    return sum(shape.layer_flops(rows, causal_pairs(rows)) for rows in rows_per_layer)


def decode_flops(shape: Shape, keys_per_layer: list[int]) -> int:
    """FLOPs of one decode forward of one sample whose query attends to keys_per_layer[l] keys at layer l."""
    return sum(shape.layer_flops(1, keys) for keys in keys_per_layer)


def unpruned_flops(shape: Shape, prompt_tokens: list[int], new_tokens: int) -> dict[str, int]:
    """FLOPs of the unpruned model over samples of `prompt_tokens` each generating `new_tokens`: one prefill
    and N - 1 decode forwards, the t-th attending to prompt + t + 1 keys (the first token comes from prefill).
    The one formula that every ratio "to unpruned" (trace, planner, matched budgets, bench) divides by."""
    layers = shape.num_layers
    prefill = sum(prefill_flops(shape, [tokens] * layers) for tokens in prompt_tokens)
    decode = sum(
        decode_flops(shape, [tokens + t + 1] * layers) for tokens in prompt_tokens for t in range(new_tokens - 1)
    )
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}
