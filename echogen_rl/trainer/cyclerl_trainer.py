"""Stage 3, CycleRL: GRPO on images, rewarded by how well the in-model grounder recovers the input layout."""

from __future__ import annotations

import contextlib
import time

import torch
from peft import PeftModel
from trl import GRPOTrainer

from echogen_rl.data.shapes import ShapesConfig, detect_from_codes
from echogen_rl.eval.metrics import filled_box_rate, strict_recall50
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.modeling import freeze_untrained, image_token_logprobs, unwrap_janus
from echogen_rl.models.prompts import PromptBuilder, pad_segments, parse_prompt_text
from echogen_rl.models.sampling import resolve_guidance_scale
from echogen_rl.models.sharding import gathered_root, prepare_sharding, save_fsdp2_model
from echogen_rl.rewards import layout_agreement, load_rewards
from echogen_rl.rollout.base import RolloutEngine
from echogen_rl.rollout.build import build_engine
from echogen_rl.trainer.callbacks import attach_sample_logging
from echogen_rl.trainer.cyclerl_config import CycleRLConfig


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


class CycleRLTrainer(GRPOTrainer):
    """Trainer for Stage 3, CycleRL: layout -> image -> layout, with no image supervision.

    The changes w.r.t. [`~trl.GRPOTrainer`] are two hooks:

    - `_generate`: a rollout is an image (codes from the rollout engine, with CFG), grounded by the model's
      own grounder for the prompt's phrases. The grounder's answer is the completion text; `target_layouts`,
      `recovered_layouts`, `grounding_problems` and `image_codes` reach the reward functions as kwargs.
    - `_get_per_token_logps_and_entropies`: log-probs of the image tokens under `generation_head`, of the
      guided (`logprob_mode="cfg"`) or conditional (`"cond"`) distribution.

    Rewards, group-normalized advantages, `_compute_loss` (loss types, clipping, KL with the disabled adapter
    as reference under PEFT), logging and checkpointing are GRPOTrainer's.

    Args:
        model (`JanusForConditionalGeneration` or `PeftModel`): the policy.
        reward_funcs (`list[str | Callable]`, *optional*, defaults to `["cycle_iou"]`): built-in names,
            `module:function`, `file.py:function` or callables (see `echogen_rl.rewards.registry`).
        args (`CycleRLConfig`): the configuration.
        train_dataset (`datasets.Dataset`): a `prompt` column of L2I user texts (caption + layout text).
        processing_class (`PreTrainedTokenizerBase`): the model's tokenizer.
        rollout_engine (`RolloutEngine`, *optional*): an engine instance; by default the one `args.rollout_engine`
            names, built at the first rollout: the torch engine on the training model, or a colocated vLLM engine.
        shapes_world (`ShapesConfig`, *optional*): the prompts are the shapes world's: log a reward-hacking monitor
            on every rollout batch, read by the oracle detector: `monitor/filled_box_rate` (the share of circles
            and triangles drawn as a filled box of their color) and `monitor/strict50` (the share of entities
            drawn with their color and kind at IoU >= 0.5).
    """

    _tag_names = ["trl", "grpo", "echogen-rl", "cyclerl"]

    def __init__(
        self,
        model,
        reward_funcs=("cycle_iou",),
        args: CycleRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        rollout_engine: RolloutEngine | None = None,
        shapes_world: ShapesConfig | None = None,
        **kwargs,
    ):
        if processing_class is None:
            raise ValueError("CycleRLTrainer needs the model's tokenizer as `processing_class`")
        if args.rollout_engine == "vllm" and rollout_engine is None:
            from echogen_rl.rollout.vllm_engine import import_vllm

            import_vllm()  # fail now, with the install command, not at the first rollout
        if args.mask_truncated_completions:
            raise ValueError("CycleRLConfig: mask_truncated_completions does not apply to images (no EOS)")
        for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
            if dataset is not None:
                if "prompt" not in dataset.column_names:
                    raise ValueError(f"the {name} dataset needs a `prompt` column (see data.random_layouts)")
                parse_prompt_text(dataset[0]["prompt"])  # fail now, not mid-run, on a wrong format
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        super().__init__(
            model,
            reward_funcs=load_rewards(funcs),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if args.grounding_model == "reference" and self.ref_model is None and not is_peft_model(self.model):
            raise ValueError(
                "grounding_model='reference' needs a reference: train with PEFT (the disabled adapter) or beta > 0; "
                "or set grounding_model='policy'"
            )
        if args.rollout_engine == "vllm" and self.is_fsdp_enabled:
            raise ValueError(
                "rollout_engine='vllm' does not support FSDP (the engine would read weight shards); use "
                "rollout_engine='torch', which reads the gathered weights, or recipes/accelerate_configs/ddp.yaml"
            )
        prepare_sharding(self)
        if args.rollout_engine == "vllm" and self.is_deepspeed_enabled:
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin is not None and plugin.zero_stage == 3:
                raise ValueError(
                    "rollout_engine='vllm' does not support DeepSpeed ZeRO-3 (its weights are sharded where the engine "
                    "reads them); use recipes/accelerate_configs/zero2.yaml or ddp.yaml, or rollout_engine='torch'"
                )
        # The latest batch, for the sample and histogram logging (`echogen_rl.trainer.callbacks`); main process's rows first.
        self.last_rollouts: dict | None = None
        self.last_rewards: torch.Tensor | None = None
        attach_sample_logging(self, (eval_dataset, train_dataset))
        freeze_untrained(self.model, text_head=False)  # the loss reads image tokens only
        janus = unwrap_janus(self.model)
        self.args.guidance_scale = resolve_guidance_scale(janus, args.guidance_scale, "CycleRLConfig.guidance_scale")
        self.layout_prompts = PromptBuilder(processing_class, janus.config.vision_config.num_image_tokens)
        self._special_ids = (self.layout_prompts.bos_id, self.layout_prompts.boi_id, self.layout_prompts.pad_id)
        self.rollout_engine = rollout_engine
        self.grounder = None
        if shapes_world is not None and shapes_world.grid_size**2 != self.layout_prompts.num_image_tokens:
            raise ValueError(
                f"shapes_world: a {shapes_world.grid_size}x{shapes_world.grid_size} grid, but the model draws "
                f"{self.layout_prompts.num_image_tokens} image tokens; set shapes_grid_size to the model's grid"
            )
        self.shapes_world = shapes_world

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """As `Trainer.save_model`; under FSDP2 the final save writes the whole weights ([`save_fsdp2_model`]),
        while each checkpoint keeps the shards for resuming."""
        if _internal_call or not save_fsdp2_model(self, output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def _ensure_engines(self) -> None:
        # Built on first use: the accelerator has wrapped the model by then, and we generate with its inner module.
        if self.rollout_engine is None:
            accelerator, args = self.accelerator, self.args
            options = {}
            if args.rollout_engine == "vllm":
                options = dict(
                    cfg=args.guidance_scale != 1.0,
                    dtype=torch.bfloat16 if args.bf16 else None,
                    max_model_len=args.vllm_max_model_length,
                    max_num_seqs=max(args.generation_batch_size // accelerator.num_processes, 1),
                    gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                    kv_cache_gib=args.vllm_kv_cache_gib,
                    enforce_eager=args.vllm_enforce_eager,
                    seed=args.seed + accelerator.process_index,
                    step=self.state.global_step,
                )
            self.rollout_engine = build_engine(
                args.rollout_engine,
                accelerator.unwrap_model(self.model),
                self.layout_prompts.num_image_tokens,
                self._special_ids,
                compile=args.rollout_compile,
                process_index=accelerator.process_index,
                local_process_index=accelerator.local_process_index,
                num_processes=accelerator.num_processes,
                **options,
            )
            if args.rollout_engine == "vllm":
                accelerator.wait_for_everyone()
        if self.grounder is None:
            if self.args.grounding_model == "reference" and self.ref_model is not None:
                grounding = self.accelerator.unwrap_model(self.ref_model)
            else:  # the policy, or under PEFT the policy with its adapter disabled (see `_ground`)
                grounding = self.accelerator.unwrap_model(self.model)
            self.grounder = Grounder(grounding, self.layout_prompts, self.args.grounding_batch_size)

    def _ground(self, codes: torch.Tensor, phrases: list[list[str]]):
        model = self.accelerator.unwrap_model(self.model)
        use_reference_adapter = self.args.grounding_model == "reference" and self.ref_model is None
        context = model.disable_adapter() if use_reference_adapter else contextlib.nullcontext()
        with context:
            return self.grounder(codes, phrases, self.args.grounding_max_new_tokens)

    def _generate(self, prompts: list):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        self._ensure_engines()
        start = time.perf_counter()
        self.rollout_engine.sync_weights(self.accelerator.unwrap_model(self.model), step=self.state.global_step)
        sync_s = time.perf_counter() - start
        targets = [parse_prompt_text(p) for p in prompts]
        segments = [self.layout_prompts.l2i_prompt(t) for t in targets]
        batch = pad_segments(segments, self.layout_prompts.pad_id, "left")

        # Under `bf16: true` the weights stay float32: generate and ground in bf16 too, as the loss's forward does.
        with self.accelerator.autocast():
            start = time.perf_counter()
            rollout = self.rollout_engine.generate(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                guidance_scale=self.args.guidance_scale,
                temperature=self.args.temperature,
                top_k=self.args.top_k or None,
            )
            rollout_s = time.perf_counter() - start
            start = time.perf_counter()
            grounded = self._ground(rollout.codes, [t.phrases for t in targets])
            grounding_s = time.perf_counter() - start

        recovered = [g.layout for g in grounded]
        cycle = [layout_agreement(t, r) for t, r in zip(targets, recovered)]
        metrics = self._metrics[mode]
        gathered = (
            self.accelerator.gather(
                torch.tensor(
                    [
                        sum(cycle),
                        len(cycle),
                        sum(g.malformed for g in grounded),
                        sum(bool(g.problems) for g in grounded),
                    ],
                    device=device,
                    dtype=torch.float32,
                )
            )
            .view(-1, 4)
            .sum(0)
        )
        metrics["cycle_miou"].append((gathered[0] / gathered[1]).item())
        # Unreadable answers, and answers with any problem (also a well-formed one that misnames or skips a phrase).
        metrics["grounding/parse_failure_rate"].append((gathered[2] / gathered[1]).item())
        metrics["grounding/problem_rate"].append((gathered[3] / gathered[1]).item())
        metrics["rollout/images_per_second"].append(len(prompts) / max(rollout_s, 1e-9))
        metrics["grounding/seconds"].append(grounding_s)
        metrics["rollout/weight_sync_seconds"].append(sync_s)
        if self.shapes_world is not None:
            for name, value in self._shape_monitor(rollout.codes, targets).items():
                metrics[name].append(value)

        self.last_rollouts = {"codes": rollout.codes.cpu(), "targets": targets, "recovered": recovered}
        extra_fields = {
            "target_layouts": targets,
            "recovered_layouts": recovered,
            "grounding_problems": [g.problems for g in grounded],
            "image_codes": rollout.codes.tolist(),
        }
        prompt_ids = [s.input_ids for s in segments]
        completions = [g.text for g in grounded]
        return prompt_ids, rollout.codes.tolist(), None, completions, rollout.logprobs.tolist(), extra_fields, None, []

    def _shape_monitor(self, codes: torch.Tensor, targets: list) -> dict[str, float]:
        """The oracle's reading of the rollouts, summed over processes: does the policy paint boxes for shapes?"""
        detections = [detect_from_codes(row, self.shapes_world) for row in codes.tolist()]
        sums = []
        for values in (filled_box_rate(detections, targets), strict_recall50(detections, targets)):
            scored = [v for v in values if v is not None]
            sums += [sum(scored), len(scored)]
        totals = self.accelerator.gather(torch.tensor(sums, device=self.accelerator.device)).view(-1, 4).sum(0)
        return {
            "monitor/filled_box_rate": (totals[0] / totals[1].clamp(min=1)).item(),
            "monitor/strict50": (totals[2] / totals[3].clamp(min=1)).item(),
        }

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.last_rewards = rewards.detach().float().cpu()  # [all processes' completions, reward functions]
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.last_rollouts is not None:
            self.last_rollouts["advantages"] = output["advantages"].detach().float().cpu()
        return output

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **kwargs,
    ):
        """Log-probs [B, N] of the image codes (the last `logits_to_keep` tokens) under `generation_head`."""
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            # The reference under FSDP2 is one unit (TRL's): gathered for the call and the head after it, then freed.
            gathered = gathered_root(model) if model is self.ref_model else contextlib.nullcontext()
            with self.accelerator.autocast(), gathered:
                out = image_token_logprobs(
                    model,
                    ids[:, :-logits_to_keep],
                    mask[:, :-logits_to_keep],
                    ids[:, -logits_to_keep:],
                    self._special_ids,
                    self.args.guidance_scale,
                    self.args.temperature,
                    self.args.top_k or None,
                    self.args.logprob_mode,
                    return_entropy=compute_entropy,
                )
            logp, entropy = out if compute_entropy else (out, None)
            logps.append(logp)
            if compute_entropy:
                entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None
