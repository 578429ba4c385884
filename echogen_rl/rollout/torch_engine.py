"""Image rollouts in plain torch: cond and uncond rows in one batch, KV cache, CFG, seeded sampling."""

from __future__ import annotations

import torch
from transformers import StaticCache

from echogen_rl.models.decoding import cache_kwargs, cached_decoding
from echogen_rl.models.modeling import (
    embed_codes,
    image_logits,
    position_ids_from_mask,
    sampling_logprobs,
    unwrap_janus,
)
from echogen_rl.models.modeling import uncond_prompt_ids as make_uncond
from echogen_rl.models.sharding import gathered_root
from echogen_rl.rollout.base import RolloutEngine, RolloutOutput


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Gumbel(0, 1) noise: `argmax(logp + g)` is an exact sample of `softmax(logp)`.

    Sampling by Gumbel-max rather than `torch.multinomial` keeps the decoding step free of data-dependent
    ops, so the eager and the compiled step sample the same codes from the same generator.
    """
    u = torch.rand(shape, generator=generator, device=device)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


class TorchRolloutEngine(RolloutEngine):
    """Generates with the training model itself (no weight copy), batched, with a static KV cache.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        num_image_tokens (`int`): codes per image.
        bos_token_id, boi_token_id, pad_token_id (`int`): to build the unconditional CFG rows.
        compile (`bool`, *optional*, defaults to `False`): `torch.compile` the decoding step over a static
            cache. Prompts are left-padded to a multiple of `bucket` so that few shapes are compiled; the
            first call per shape pays the compile time, later calls run without per-op Python overhead.
        bucket (`int`, *optional*, defaults to `32`): prompt-length rounding when compiling.

    Positions skip left padding, so a padded prompt gives the same codes as the same prompt alone.
    (transformers' `generate(generation_mode="image")` numbers padded positions too; the two agree on
    unpadded batches, which the tests check.)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_image_tokens: int,
        bos_token_id: int,
        boi_token_id: int,
        pad_token_id: int,
        compile: bool = False,
        bucket: int = 32,
    ):
        self.model = model
        self.num_image_tokens = num_image_tokens
        self.bos_token_id, self.boi_token_id, self.pad_token_id = bos_token_id, boi_token_id, pad_token_id
        self.compile = compile
        self.bucket = bucket
        self._compiled = None

    def _step_fn(self, device: torch.device):
        if not self.compile:
            return self._advance
        if self._compiled is None:
            # GPUs: CUDA graphs replay the step with no launch overhead. CPUs: a C++ wrapper calls the
            # kernels without going back to Python between them.
            if device.type == "cuda":
                self._compiled = torch.compile(self._advance, dynamic=False, mode="reduce-overhead")
            else:
                self._compiled = torch.compile(self._advance, dynamic=False, options={"cpp_wrapper": True})
        return self._compiled

    @staticmethod
    def _select(janus, hidden, noise, n_rows, guidance_scale, temperature, top_k):
        logits = image_logits(janus, hidden)
        cond, uncond = (logits[:n_rows], logits[n_rows:]) if guidance_scale != 1.0 else (logits, None)
        logp = sampling_logprobs(cond, uncond, guidance_scale, temperature, top_k)
        token = (logp + noise).argmax(-1) if noise is not None else logp.argmax(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)

    @classmethod
    def _advance(cls, janus, hidden, noise, mask, positions, cache, n_rows, guidance_scale, temperature, top_k, dtype):
        """Samples the next code from `hidden` and runs the language model one step on it."""
        token, logp = cls._select(janus, hidden, noise, n_rows, guidance_scale, temperature, top_k)
        step = torch.cat([token, token]) if guidance_scale != 1.0 else token
        embeds = embed_codes(janus, step[:, None]).to(dtype)
        out = janus.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(cache),
        )
        return token, logp, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.LongTensor,
        prompt_mask: torch.Tensor,
        guidance_scale: float = 5.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> RolloutOutput:
        with gathered_root(self.model), cached_decoding(unwrap_janus(self.model)):
            return self._generate(prompt_ids, prompt_mask, guidance_scale, temperature, top_k, generator)

    def _generate(self, prompt_ids, prompt_mask, guidance_scale, temperature, top_k, generator) -> RolloutOutput:
        janus = unwrap_janus(self.model)
        B, N = prompt_ids.shape[0], self.num_image_tokens
        ids, mask = prompt_ids, prompt_mask.long()
        if guidance_scale != 1.0:
            # The uncond rows keep the cond rows' attention mask, as transformers' Janus does.
            ids = torch.cat([ids, make_uncond(ids, self.bos_token_id, self.boi_token_id, self.pad_token_id)])
            mask = torch.cat([mask, mask])
        if self.compile and ids.shape[1] % self.bucket:
            extra = self.bucket - ids.shape[1] % self.bucket
            ids = torch.cat([ids.new_full((ids.shape[0], extra), self.pad_token_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)
        R, T = ids.shape
        positions = position_ids_from_mask(mask)
        full_mask = torch.cat([mask, mask.new_zeros(R, N)], dim=1)
        # A preallocated cache: a growing one copies every layer's keys and values at every step.
        cache = StaticCache(config=janus.config.text_config, max_cache_len=T + N)
        # The language model's inputs in the compute dtype: under autocast, so that keys (rotary embeddings follow
        # the input's dtype) and values (the projection's bf16 output) reach the cache in one dtype; before
        # transformers 5.20 a static cache holds both in the first keys' dtype.
        device = ids.device.type
        dtype = janus.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        out = janus.model.language_model(
            inputs_embeds=janus.get_input_embeddings()(ids).to(dtype),
            attention_mask=full_mask,
            position_ids=positions,
            **cache_kwargs(cache),
        )
        hidden = out.last_hidden_state[:, -1]
        positions = positions[:, -1:] + 1
        vocab = janus.model.generation_head.vision_head.out_features
        advance = self._step_fn(ids.device)
        # CUDA graphs (a compiled step on a GPU) reuse their output buffers at every replay: a step's hidden state
        # is copied out before the next replay overwrites it (its codes and log-probs are copied below).
        graphs = self.compile and ids.device.type == "cuda"
        codes = torch.empty(B, N, dtype=torch.long, device=ids.device)
        logprobs = torch.empty(B, N, dtype=torch.float32, device=ids.device)
        for i in range(N):
            noise = gumbel_noise((B, vocab), generator, ids.device) if temperature > 0 else None
            if i + 1 == N:
                codes[:, i], logprobs[:, i] = self._select(janus, hidden, noise, B, guidance_scale, temperature, top_k)
                break
            full_mask[:, T + i] = 1
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            codes[:, i], logprobs[:, i], hidden = advance(
                janus, hidden, noise, full_mask, positions, cache, B, guidance_scale, temperature, top_k, dtype
            )
            if graphs:
                hidden = hidden.clone()
            positions = positions + 1
        return RolloutOutput(codes=codes, logprobs=logprobs)
