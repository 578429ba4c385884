"""Janus image generation as a vLLM model, with classifier-free guidance inside the model.

vLLM has no Janus model and no CFG. This module gives it one, for image tokens only:

- The vocabulary is the image codebook. A prompt arrives as `prompt_embeds` (its text embeddings, made by the
  trainer's own `embed_tokens`); each generated code is embedded by `generation_embeddings ->
  generation_aligner`, as in `JanusForConditionalGeneration`, and read out by `generation_head`.
- CFG without two requests: with `janus_cfg: true` the engine's hidden size is `2H`. The prompt embeddings are
  `[cond | uncond]`; every decoder layer exists twice, the second copy sharing every weight with the first but
  owning its attention module, hence a KV cache of its own; `compute_logits` returns `u + s * (c - u)`. vLLM's
  sampler (temperature, top-k, seeds) and its processed log-probs then act on the guided distribution.
- The scale `s` is an attribute the engine sets before each batch of requests (the engine runs in the trainer's
  process). `compute_logits` runs outside any captured CUDA graph, so changing it needs no recapture.

Weights load from the names of a Hugging Face Janus checkpoint (or the live trainer model): q/k/v and gate/up
are fused as vLLM's Llama fuses them; the vision tower, the VQ decoder and the text head are not needed.

Importing this module imports vLLM; `echogen_rl.rollout.vllm_plugin` registers it without importing it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer

from echogen_rl.rollout.vllm_plugin import vllm_name

STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


class GenerationAligner(nn.Module):
    """transformers' `JanusVQVAEAlignerMLP`: fc1 -> (GELU -> hidden layer) * (depth - 1)."""

    def __init__(self, in_dim: int, hidden: int, depth: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.hidden_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.activation_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.activation_fn(x))
        return x


class GenerationHead(nn.Module):
    """transformers' `JanusVQVAEHead`: proj_out -> GELU -> vision_head."""

    def __init__(self, hidden: int, proj_dim: int, vocab: int):
        super().__init__()
        self.proj_out = nn.Linear(hidden, proj_dim)
        self.activation_fn = nn.GELU()
        self.vision_head = nn.Linear(proj_dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.activation_fn(self.proj_out(x)))


class JanusImageGenForVLLM(nn.Module):
    """Janus's image-token generation path for vLLM (see the module docstring for the layout of the streams).

    The vLLM config is a Llama config with `hidden_size` = the prompt-embedding width (`2H` with CFG, `H`
    without) and the extra keys `janus_hidden_size`, `janus_cfg`, `gen_embed_dim`, `gen_aligner_depth`,
    `gen_head_proj_dim`; `vocab_size` is the codebook size. `echogen_rl.rollout.vllm_engine.vllm_config_dict`
    writes it from a `JanusConfig`.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.hidden = hidden = config.janus_hidden_size
        self.cfg = bool(config.janus_cfg)
        self.guidance_scale = 1.0
        text_config = copy.deepcopy(config)
        text_config.hidden_size = hidden
        self.num_layers = n = config.num_hidden_layers
        streams = 2 if self.cfg else 1
        # Distinct layer indices (the prefixes) give each stream's attention its own KV cache.
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(vllm_config, prefix=f"layers.{i}", config=text_config) for i in range(streams * n)]
        )
        for i in range(n, streams * n):  # the uncond copy shares every weight with the cond layer
            cond, uncond = self.layers[i - n], self.layers[i]
            uncond.input_layernorm = cond.input_layernorm
            uncond.post_attention_layernorm = cond.post_attention_layernorm
            uncond.mlp = cond.mlp
            uncond.self_attn.qkv_proj = cond.self_attn.qkv_proj
            uncond.self_attn.o_proj = cond.self_attn.o_proj
            uncond.self_attn.rotary_emb = cond.self_attn.rotary_emb
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.generation_embeddings = nn.Embedding(config.vocab_size, config.gen_embed_dim)
        self.generation_aligner = GenerationAligner(config.gen_embed_dim, hidden, config.gen_aligner_depth)
        self.generation_head = GenerationHead(hidden, config.gen_head_proj_dim, config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        embeds = self.generation_aligner(self.generation_embeddings(input_ids))
        return torch.cat([embeds, embeds], dim=-1) if self.cfg else embeds  # a code feeds both streams

    def _stream(self, layers, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer in layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        if not self.cfg:
            return self._stream(self.layers, positions, inputs_embeds)
        n, h = self.num_layers, self.hidden
        cond = self._stream(self.layers[:n], positions, inputs_embeds[:, :h].contiguous())
        uncond = self._stream(self.layers[n:], positions, inputs_embeds[:, h:].contiguous())
        return torch.cat([cond, uncond], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cond = self.generation_head(hidden_states[:, : self.hidden])
        if not self.cfg or self.guidance_scale == 1.0:
            return cond.float()
        uncond = self.generation_head(hidden_states[:, self.hidden :])
        return (uncond + self.guidance_scale * (cond - uncond)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads Hugging Face Janus names; names this model does not use are skipped."""
        params = dict(self.named_parameters())
        loaded = set()
        for hf_name, weight in weights:
            name = vllm_name(hf_name)
            if name is None:
                continue
            for fused, shard, shard_id in STACKED:
                if shard in name:
                    name = name.replace(shard, fused)
                    param = params[name]
                    param.weight_loader(param, weight, shard_id)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
