"""Cached, no-grad decoding through the language model of `JanusForConditionalGeneration`: prefill a prompt into
a KV cache, then one step at a time, under the installed transformers' cache keyword."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from echogen_rl.models.modeling import unwrap_janus


def _cache_keyword() -> str:
    """The language model's KV-cache keyword: `cache` from transformers 5.20, `past_key_values` before."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def cache_kwargs(cache) -> dict:
    """`{keyword: cache, "use_cache": True}` under the installed transformers' keyword.

    Passed under the wrong name, the cache is swallowed by `**kwargs` and decoding silently runs without it.
    """
    return {CACHE_KEYWORD: cache, "use_cache": True}


@contextlib.contextmanager
def cached_decoding(janus):
    """Turns gradient checkpointing off in the language model's layers for a no-grad decoding loop.

    Before transformers 5.20 a checkpointed layer in training mode drops the KV cache even under `torch.no_grad`
    (later versions check `torch.is_grad_enabled()`), and decoding then breaks on the mask's shape.
    """
    layers = [m for m in janus.model.language_model.modules() if getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


@torch.no_grad()
def prefill(
    model: torch.nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.LongTensor
) -> tuple[torch.Tensor, DynamicCache]:
    """Runs the language model over a prompt and returns (last hidden states [B, T, H], the KV cache).

    Inference only: calls the inner language model directly (no wrapper acts on a no-grad rollout).
    """
    janus = unwrap_janus(model)
    cache = DynamicCache(config=janus.config.text_config)
    with cached_decoding(janus):
        out = janus.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **cache_kwargs(cache)
        )
    return out.last_hidden_state, cache


@torch.no_grad()
def decode_step(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """One cached decoding step: `embeds` [B, 1, H] -> last hidden state [B, H]."""
    janus = unwrap_janus(model)
    with cached_decoding(janus):
        out = janus.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **cache_kwargs(cache)
        )
    return out.last_hidden_state[:, -1]
