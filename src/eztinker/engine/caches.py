"""Cache surgery for continuous batching: rows of a generation's cache chosen, joined and trimmed.

The running batch keeps one transformers `DynamicCache`, whose layers are of the kinds a family needs:
- full attention (`DynamicLayer`): keys and values (B, H, L, D), one column per attention-mask column;
- sliding-window attention (`DynamicSlidingWindowLayer`, gpt-oss): the last min(L, W-1) columns, and the
  number of columns seen (`cumulative_length`), kept equal to the attention mask's width L;
- linear attention (`LinearAttentionLayer`, Qwen3.5's gated DeltaNet): per row a convolution state
  (B, C, K) and a recurrent state (B, H, dk, dv), which have no sequence dimension;
- both at once (`LinearAttentionAnd…Layer`), or nothing (`DummyLayer`).

Every row's cache is its own: rows are chosen or reordered along the batch dimension; two caches join by
left-padding the attention layers to one width (zeros nobody attends to: the mask is 0 there) and
concatenating rows, linear-attention states simply concatenated; leading columns no row attends to are
cut. Column distances equal position distances (padding is only ever on the left), so a sliding window
measured in columns is the model's window. Layers of any other kind are not `mergeable`: such a batch
admits new rows only when it is empty.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)

_ATTENTION_TYPES = (DynamicLayer, DynamicSlidingWindowLayer)
_MERGEABLE = (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
)


def _is_attention(layer: Any) -> bool:
    return isinstance(layer, _ATTENTION_TYPES)


def _is_linear(layer: Any) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def _has_keys(layer: Any) -> bool:
    return (
        getattr(layer, "is_initialized", False)
        and getattr(layer, "keys", None) is not None
        and layer.keys.numel() > 0
    )


def mergeable(cache: DynamicCache) -> bool:
    """Whether every layer is of a kind this module can join and trim (see the module docstring)."""
    return all(type(layer) in _MERGEABLE for layer in cache.layers)


def select_rows(cache: DynamicCache, index_B: torch.Tensor) -> None:
    """Keep (or repeat, or reorder) the rows `index_B` of every layer, in that order."""
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if isinstance(layer, DummyLayer):
            continue
        if _is_linear(layer):
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = layer.conv_states[i].index_select(0, index_B)
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = layer.recurrent_states[i].index_select(0, index_B)
        if _is_attention(layer):
            if _has_keys(layer):
                layer.keys = layer.keys.index_select(0, index_B)
                layer.values = layer.values.index_select(0, index_B)
        elif not _is_linear(layer):
            layer.batch_select_indices(index_B)


def merge_rows(into: DynamicCache, new: DynamicCache, width: int) -> None:
    """Append `new`'s rows to `into`'s, attention layers left-padded to `width` columns (both masks' width)."""
    pairs: list[tuple[Any, Any]] = list(zip(into.layers, new.layers, strict=True))
    for layer_a, layer_b in pairs:
        if isinstance(layer_a, DummyLayer):
            continue
        if _is_linear(layer_a):
            for i in range(layer_a.number_of_states):
                if layer_a.is_conv_states_initialized[i]:
                    layer_a.conv_states[i] = torch.cat([layer_a.conv_states[i], layer_b.conv_states[i]])
                if layer_a.is_recurrent_states_initialized[i]:
                    layer_a.recurrent_states[i] = torch.cat(
                        [layer_a.recurrent_states[i], layer_b.recurrent_states[i]]
                    )
        if not _is_attention(layer_a) or not _has_keys(layer_a):
            continue
        columns = width
        if isinstance(layer_a, DynamicSlidingWindowLayer):
            columns = min(width, layer_a.sliding_window - 1)
            layer_a.cumulative_length = width
        layer_a.keys = torch.cat([_left_pad(layer_a.keys, columns, 2), _left_pad(layer_b.keys, columns, 2)])
        layer_a.values = torch.cat(
            [_left_pad(layer_a.values, columns, 2), _left_pad(layer_b.values, columns, 2)]
        )


def drop_leading_columns(cache: DynamicCache, start: int) -> None:
    """Cut the first `start` attention columns (columns no row attends to) of every attention layer."""
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if not _is_attention(layer) or not _has_keys(layer):
            continue
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= start
            keep = min(layer.keys.shape[2], layer.cumulative_length)
            layer.keys = layer.keys[:, :, layer.keys.shape[2] - keep :]
            layer.values = layer.values[:, :, layer.values.shape[2] - keep :]
        else:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
