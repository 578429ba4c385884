"""Sharded training on two CPU processes over gloo: FSDP2 (`shard_janus`) and DeepSpeed ZeRO-3, each stage's real
trainer against the same trainer under DDP, and FSDP2 around each stage's own loss function (CycleRL: on its own
rollout): one step's loss and update equal the unsharded step's on the same global batch, and the ranks agree.

accelerate turns FSDP on only for GPU processes: `tests/scripts/sharded_trainer.py` sets the state's distributed type
(its docstring says how), and `tests/scripts/fsdp_step.py` applies `fully_shard` the way `shard_janus` does and calls
the stages' loss functions (`pmtp_losses`, `djo_losses`, `image_token_logprobs`) directly. ZeRO-3 runs under
`accelerate launch --config_file recipes/accelerate_configs/zero3.yaml` with `DS_ACCELERATOR=cpu`."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from echogen_rl.models.sharding import prepare_sharding

SCRIPTS = Path(__file__).parent / "scripts"
CONFIGS = Path(__file__).parents[1] / "recipes" / "accelerate_configs"


def _step(checkpoint, out_dir: Path, *args: str, script: str = "fsdp_step.py", deepspeed: str = "") -> list[dict]:
    """Runs `script` on two processes: torch.distributed.run, or with `deepspeed` ("zero2", "zero3"), accelerate
    launch with that shipped config."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    if deepspeed:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{deepspeed}.yaml")]
        cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += [str(SCRIPTS / script), str(checkpoint), str(out_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out_dir / f"rank{i}.pt") for i in range(2)]


def _check_sharded_step(ranks: list[dict], tol: float = 1e-5) -> None:
    first, second = ranks
    # Every parameter is a shard, in units of their own: the layers, the generation path, the frozen towers, the root.
    assert all(first["sharded"].values()) and first["units"] == 4 + 3 + 3 + 1
    # Each rank's loss is the unsharded loss of its own micro-batch.
    for rank in ranks:
        assert rank["loss"].item() == pytest.approx(rank["reference_losses"][rank["rank"]].item(), rel=tol)
    assert first["after"].keys() == first["reference_after"].keys() == first["before"].keys()
    for name, value in first["after"].items():
        assert torch.equal(value, second["after"][name]), name  # the ranks hold the same model
        torch.testing.assert_close(value, first["reference_after"][name], atol=tol, rtol=0, msg=name)
    # The update is not trivially equal: almost every trainable tensor moved, by more than the tolerance.
    moved = [n for n, v in first["after"].items() if (v - first["before"][n]).abs().max() > 100 * tol]
    assert len(moved) >= 0.9 * len(first["after"]), sorted(set(first["after"]) - set(moved))


@pytest.mark.parametrize("stage", ["pmtp", "djo", "cyclerl"])
def test_the_trainer_under_accelerates_fsdp2_path_trains_as_under_ddp(tiny_checkpoint, tmp_path, stage):
    """The real trainer (accelerate's prepare, AdamW on DTensors, clipping, logging), sharded by `shard_janus`,
    against the same trainer under DDP: the same losses and the same weights after three steps."""
    sharded = _step(tiny_checkpoint, tmp_path / "fsdp", "--stage", stage, "--fsdp", script="sharded_trainer.py")
    if stage == "cyclerl-full":  # TRL's reference copy, prepared by TRL for FSDP2
        assert sharded[0]["reference"] is not None and sharded[0]["reference"].startswith("FSDP")
    plain = _step(tiny_checkpoint, tmp_path / "ddp", "--stage", stage, script="sharded_trainer.py")
    assert sharded[0]["fsdp2"] and sharded[0]["sharded"]
    assert sharded[0]["wrapped"] in ("FSDPJanusForConditionalGeneration", "FSDPPeftModel")
    _assert_trains_as_under_ddp(sharded, plain)


def _assert_trains_as_under_ddp(sharded: list[dict], plain: list[dict]) -> None:
    """Three steps: the same losses and weights as DDP (1e-5), the ranks agree, and training moved the weights."""
    assert plain[0]["wrapped"] == "DistributedDataParallel"
    assert len(sharded[0]["losses"]) == 3
    assert sharded[0]["losses"] == pytest.approx(plain[0]["losses"], abs=1e-5)
    after = sharded[0]["after"]
    assert after.keys() == plain[0]["after"].keys() and after
    for name, value in after.items():
        torch.testing.assert_close(value, plain[0]["after"][name], atol=1e-5, rtol=0, msg=name)
        assert torch.equal(value, sharded[1]["after"][name]), name
    moved = [n for n, v in after.items() if not torch.equal(v, sharded[0]["before"][n])]
    assert len(moved) >= 0.9 * len(after), sorted(set(after) - set(moved))


@pytest.mark.slow
def test_full_cyclerl_under_accelerates_fsdp2_path_trains_as_under_ddp(tiny_checkpoint, tmp_path):
    """Full fine-tuning: TRL builds the reference (KL term and grounder) and prepares it for FSDP itself."""
    test_the_trainer_under_accelerates_fsdp2_path_trains_as_under_ddp(tiny_checkpoint, tmp_path, "cyclerl-full")


@pytest.mark.parametrize(
    ("config", "stage"),
    [
        ("zero3", "pmtp"),
        *(pytest.param("zero3", s, marks=pytest.mark.slow) for s in ("djo", "cyclerl", "cyclerl-full")),
        pytest.param("zero2", "pmtp", marks=pytest.mark.slow),
    ],
)
def test_the_trainer_under_deepspeed_trains_as_under_ddp(tiny_checkpoint, tmp_path, config, stage):
    """`accelerate launch` with the shipped zero3.yaml (zero2.yaml) on two CPU processes, DeepSpeed over gloo: the
    real trainer in DeepSpeed's engine, ZeRO-3 partitioning every weight over the ranks (ZeRO-2 the optimizer state),
    against the same trainer under DDP."""
    args = ("--stage", stage, "--deepspeed")
    sharded = _step(tiny_checkpoint, tmp_path / config, *args, script="sharded_trainer.py", deepspeed=config)
    plain = _step(tiny_checkpoint, tmp_path / "ddp", "--stage", stage, script="sharded_trainer.py")
    # accelerate counted one process (what the trainers refuse); the script counted two, as torch.distributed does.
    assert sharded[0]["accelerate_counted"] == 1
    assert sharded[0]["wrapped"] == "DeepSpeedEngine" and sharded[0]["zero_stage"] == int(config[-1])
    if config == "zero2":
        assert sharded[0]["optimizer"] == "DeepSpeedZeroOptimizer"
    else:
        assert sharded[0]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        for rank in sharded:  # each rank holds half of every weight (a shard is padded by at most one element)
            assert 0 <= 2 * rank["local_numel"] - rank["full_numel"] <= rank["tensors"]
    if stage == "cyclerl-full":  # TRL's reference copy, prepared by TRL for DeepSpeed
        assert sharded[0]["reference"] == "DeepSpeedEngine"
    _assert_trains_as_under_ddp(sharded, plain)


def test_a_trainer_refuses_deepspeed_that_counts_fewer_processes_than_launched(monkeypatch):
    """accelerate's DeepSpeed path on CPU processes counts one process: every process would train on the same batches."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    trainer = SimpleNamespace(accelerator=accelerator, is_fsdp_enabled=False)
    with pytest.raises(RuntimeError, match="over the 2 launched processes, but accelerate counts 1"):
        prepare_sharding(trainer)
    accelerator.num_processes = 2
    prepare_sharding(trainer)  # counted: trains


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pmtp", "djo", "cyclerl-full"])
def test_gradient_checkpointing_under_fsdp2_trains_as_without(tiny_checkpoint, tmp_path, stage):
    """The 7B configs turn on gradient checkpointing under FSDP2: recomputing each layer in the backward, inside its
    unit, gives the same losses and weights as DDP without it."""
    args = ("--stage", stage, "--fsdp", "--gradient-checkpointing")
    checkpointed = _step(tiny_checkpoint, tmp_path / "fsdp", *args, script="sharded_trainer.py")
    plain = _step(tiny_checkpoint, tmp_path / "ddp", "--stage", stage, script="sharded_trainer.py")
    assert checkpointed[0]["checkpointing"] and not plain[0]["checkpointing"] and checkpointed[0]["fsdp2"]
    _assert_trains_as_under_ddp(checkpointed, plain)


def _assert_resumes_and_reloads(tiny_checkpoint, tmp_path, stage: str, *run: str, deepspeed: str = "") -> Path:
    """Two steps of `run` with a checkpoint after the first, exported at the end; the same run resumed from that
    checkpoint ends with the same losses and weights, and the export reloads to the trained weights. Returns the
    checkpoint's folder."""
    from transformers import JanusForConditionalGeneration

    export = tmp_path / "export"
    run = ["--stage", stage, *run, "--steps", "2"]
    launch = {"script": "sharded_trainer.py", "deepspeed": deepspeed}
    saving = ("--save-steps", "1", "--export", str(export))
    unbroken = _step(tiny_checkpoint, tmp_path / "unbroken", *run, *saving, **launch)
    checkpoint = tmp_path / "unbroken" / "run" / "checkpoint-1"
    resumed = _step(tiny_checkpoint, tmp_path / "resumed", *run, "--resume", str(checkpoint), **launch)
    assert len(unbroken[0]["losses"]) == 2
    assert resumed[0]["losses"] == pytest.approx(unbroken[0]["losses"], abs=1e-6)
    after = unbroken[0]["after"]
    moved = [n for n, v in after.items() if not torch.equal(v, unbroken[0]["before"][n])]
    assert len(moved) >= 0.9 * len(after)  # training moved the weights compared below
    for name, value in after.items():
        torch.testing.assert_close(resumed[0]["after"][name], value, atol=1e-6, rtol=0, msg=name)
    base = JanusForConditionalGeneration.from_pretrained(export if stage != "cyclerl" else tiny_checkpoint)
    if stage == "cyclerl":  # LoRA: the adapter alone
        from peft import PeftModel

        assert (export / "adapter_model.safetensors").is_file() and not (export / "model.safetensors").exists()
        base = PeftModel.from_pretrained(base, export)
    reloaded = dict(base.named_parameters())
    for name, value in after.items():
        torch.testing.assert_close(reloaded[name], value, atol=0, rtol=0, msg=name)
    assert (export / "tokenizer.json").is_file()
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pmtp", "djo", "cyclerl", "cyclerl-full"])
def test_the_trainers_fsdp2_checkpoint_resumes_and_its_final_save_reloads(tiny_checkpoint, tmp_path, stage):
    """The real trainer under FSDP2: two steps with a checkpoint after the first; the same run resumed from that
    checkpoint (sharded model and optimizer state, read back by the trainer's own resume) ends with the same losses
    and weights; the final `save_model` writes whole weights (or the adapter) that reload to the trained ones."""
    checkpoint = _assert_resumes_and_reloads(tiny_checkpoint, tmp_path, stage, "--fsdp")
    # The checkpoint holds the model's and AdamW's shards (one file per rank), not gathered weights.
    assert not list(checkpoint.glob("*.safetensors"))
    shards = {p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")}
    assert shards == {"__0_0.distcp", "__1_0.distcp"} and (checkpoint / "optimizer_0").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pmtp", "cyclerl"])
def test_the_trainers_zero3_checkpoint_resumes_and_its_final_save_reloads(tiny_checkpoint, tmp_path, stage):
    """Under zero3.yaml: two steps with a checkpoint after the first; resumed from it (each rank's partition of the
    weights and of AdamW's state, read back by DeepSpeed through the trainer's own resume) the run ends with the same
    losses and weights; `save_model` gathers whole weights (zero3_save_16bit_model; float32 here) or the adapter."""
    checkpoint = _assert_resumes_and_reloads(tiny_checkpoint, tmp_path, stage, "--deepspeed", deepspeed="zero3")
    states = {p.name for p in (checkpoint / "global_step1").iterdir()}
    assert states == {f"zero_pp_rank_{r}_mp_rank_00_{s}_states.pt" for r in (0, 1) for s in ("model", "optim")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pmtp", "djo", "cyclerl", "cyclerl-lora"])
def test_a_sharded_step_equals_the_unsharded_step(tiny_checkpoint, tmp_path, stage):
    stage, _, lora = stage.partition("-")
    ranks = _step(tiny_checkpoint, tmp_path, "--stage", stage, *(["--lora"] if lora else []))
    assert ranks[0]["compute_dtype"] == "torch.float32"
    _check_sharded_step(ranks)
    if lora:  # only the adapters train, inside the decoder layers' units
        assert ranks[0]["after"] and all("lora_" in name for name in ranks[0]["after"])
    if stage == "cyclerl":  # the rollout under FSDP2 reads the same weights: the same codes as unsharded
        for rank in ranks:
            unsharded, sharded = rank["rollouts"][rank["rank"]]
            assert torch.equal(unsharded, sharded)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_the_sharded_result_exports_and_reloads(tiny_checkpoint, tmp_path, lora):
    from transformers import JanusForConditionalGeneration

    export = tmp_path / "export"
    args = ["--stage", "pmtp", "--export", str(export), *(["--lora"] if lora else [])]
    trained = _step(tiny_checkpoint, tmp_path / "run", *args)[0]["reference_after"]
    if lora:
        from peft import PeftModel

        base = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
        reloaded = dict(PeftModel.from_pretrained(base, export).named_parameters())
        assert (export / "adapter_model.safetensors").is_file() and not (export / "model.safetensors").exists()
    else:
        reloaded = dict(JanusForConditionalGeneration.from_pretrained(export).named_parameters())
    for name, value in trained.items():  # the unsharded step's weights, which the sharded step equals
        torch.testing.assert_close(reloaded[name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pmtp", "djo"])
def test_bf16_mixed_precision_computes_in_bf16_within_two_percent(tiny_checkpoint, tmp_path, stage):
    ranks = _step(tiny_checkpoint, tmp_path, "--stage", stage, "--bf16")
    assert ranks[0]["compute_dtype"] == "torch.bfloat16"  # the gathered weights the layers compute with
    for rank in ranks:
        reference = rank["reference_losses"][rank["rank"]].item()  # float32, unsharded
        assert torch.isfinite(rank["loss"]) and rank["loss"].item() == pytest.approx(reference, rel=0.02)
    assert all(torch.equal(v, ranks[1]["after"][n]) for n, v in ranks[0]["after"].items())
