"""Where DJO's loop image comes from: the model's own samples, made differentiable by straight-through Gumbel-Softmax.

The method feeds the generator's *generated* image tokens to the grounder. Three sources (`DJOConfig.loop_image`):

- `teacher_forced`: the logits of one L2I pass over the *true* codes, sampled position by position. Every position
  sees the true prefix, so the grounder reads the real image with a few one-cell changes (kept as a comparison).
- `self_forced`: the whole image sampled free-running without grad (the rollout engine), then one L2I pass over
  the model's own codes gives logits `z_t`; a straight-through Gumbel sample whose forward value is exactly the
  sampled code ([`gumbel_at`]) carries the gradient to every position's logits.
- `autoregressive`: a differentiable rollout: each step's straight-through Gumbel sample, embedded, is the next
  step's input ([`autoregressive_loop`]). N sequential forwards with their graphs kept: the tiny world's 64 fit,
  a real-size image does not ([`autoregressive_memory_gib`]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from echogen_rl.models.modeling import image_logits, mixed_forward, soft_code_embeddings
from echogen_rl.rollout.torch_engine import TorchRolloutEngine, gumbel_noise

LOOP_IMAGES = ("teacher_forced", "self_forced", "autoregressive")


def gumbel_at(
    logits: torch.Tensor, codes: torch.LongTensor, tau: float, hard: bool = True, generator=None
) -> torch.Tensor:
    """A straight-through Gumbel-Softmax sample of `logits` [..., V] whose forward value is `one_hot(codes)`
    (`hard=False`: the soft sample itself, whose argmax is `codes`).

    The Gumbel perturbations are drawn *conditioned on* their argmax being `codes` (the top-down Gumbel-max
    construction: the maximum is `Gumbel(logsumexp z)`, each other value a Gumbel of its logit truncated below
    it), so the soft sample is the one that would have produced the sampled code; its gradient flows back.
    """
    z = logits.float()
    shape = z.shape
    top = torch.logsumexp(z, dim=-1, keepdim=True) + gumbel_noise(shape[:-1] + (1,), generator, z.device)
    others = z + gumbel_noise(shape, generator, z.device)
    # -log(exp(-top) + exp(-g)): below `top` everywhere, so `codes` stays the argmax.
    truncated = -torch.logaddexp(-top, -others)
    perturbed = truncated.scatter(-1, codes[..., None], top)
    soft = F.softmax(perturbed / tau, dim=-1)
    if not hard:
        return soft
    return F.one_hot(codes, shape[-1]).to(soft.dtype) - soft.detach() + soft


def gumbel_softmax(
    logits: torch.Tensor, tau: float, hard: bool = True, generator=None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """A Gumbel-Softmax sample of `logits` [..., V] with its `noise` (drawn from `generator` when unset);
    `hard`: straight-through, one-hot at the perturbed argmax in the forward pass, the soft sample's gradient."""
    perturbed = logits + (noise if noise is not None else gumbel_noise(logits.shape, generator, logits.device))
    soft = F.softmax(perturbed / tau, dim=-1)
    if not hard:
        return soft
    return F.one_hot(perturbed.argmax(-1), logits.shape[-1]).to(soft.dtype) - soft.detach() + soft


def image_prompts(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """The L2I prompts of a `LoopLossCollator` batch (each row up to its first image position), left-padded."""
    ids, image_mask = batch["l2i_input_ids"], batch["l2i_image_mask"]
    lengths = image_mask.float().argmax(1)  # the first image position
    width = int(lengths.max())
    prompt = ids.new_full((ids.shape[0], width), pad_id)
    mask = torch.zeros_like(prompt)
    for b, n in enumerate(lengths.tolist()):
        prompt[b, width - n :] = ids[b, :n]
        mask[b, width - n :] = 1
    return prompt, mask


@torch.no_grad()
def sample_images(
    model,
    batch: dict[str, torch.Tensor],
    special_ids: tuple[int, int, int],
    guidance_scale: float,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """The model's own images for a `LoopLossCollator` batch, free-running: codes [B, N] by the torch engine."""
    bos, boi, pad = special_ids
    n = int(batch["l2i_image_mask"][0].sum())
    prompt, mask = image_prompts(batch, pad)
    engine = TorchRolloutEngine(model, n, bos, boi, pad)
    return engine.generate(prompt, mask, guidance_scale, temperature, None, generator).codes


def self_forced_logits(model, batch: dict[str, torch.Tensor], codes: torch.LongTensor) -> torch.Tensor:
    """Image logits [B * N, V] of one L2I pass over the model's own `codes` (in place of the true ones), at the
    positions that predict each code, in row-major order."""
    ids = batch["l2i_input_ids"].clone()
    ids[batch["l2i_image_mask"]] = codes.reshape(-1).to(ids.dtype)
    hidden = mixed_forward(model, ids, batch["l2i_image_mask"], batch["l2i_attention_mask"])
    return image_logits(model, hidden[batch["l2i_image_labels"] != -100]).float()


def autoregressive_loop(
    model,
    batch: dict[str, torch.Tensor],
    pad_id: int,
    tau: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """A differentiable rollout: at each step the straight-through Gumbel sample of the next code's logits,
    embedded, is the next input. Returns the samples `y` [B, N, V] (one-hot forward, soft gradient) and their
    codes [B, N].

    Args:
        noise (`torch.Tensor` of shape `[B, N, V]`, *optional*): the Gumbel noise to use (zeros: greedy decoding);
            drawn from `generator` when unset.
    """
    prompt, mask = image_prompts(batch, pad_id)
    B, n = prompt.shape[0], int(batch["l2i_image_mask"][0].sum())
    samples, embeds = [], []
    for t in range(n):
        ids = torch.cat([prompt, prompt.new_zeros(B, t)], dim=1)
        image_mask = torch.cat(
            [torch.zeros_like(prompt, dtype=torch.bool), prompt.new_ones(B, t, dtype=torch.bool)], 1
        )
        attention = torch.cat([mask, mask.new_ones(B, t)], dim=1)
        image_embeds = torch.stack(embeds, dim=1).reshape(B * t, -1) if t else None
        hidden = mixed_forward(model, ids, image_mask, attention, image_embeds=image_embeds)
        z = image_logits(model, hidden[:, -1]).float()  # [B, V]
        y = gumbel_softmax(z, tau, True, generator, noise[:, t] if noise is not None else None)
        samples.append(y)
        embeds.append(soft_code_embeddings(model, y))
    y = torch.stack(samples, dim=1)
    return y, y.detach().argmax(-1)


def autoregressive_memory_gib(
    hidden_size: int, num_layers: int, prompt_length: int, num_image_tokens: int, batch_size: int, bytes_per=4
) -> float:
    """A lower bound on the activations an autoregressive loop keeps for its backward: N forwards of `P + t`
    tokens, about 16 hidden-sized tensors per token and layer (attention and MLP inputs and outputs, the MLP's
    4x-wide intermediate), in `bytes_per` bytes each."""
    tokens = sum(prompt_length + t for t in range(num_image_tokens))
    return batch_size * tokens * num_layers * hidden_size * 16 * bytes_per / 2**30
