"""Every stage under `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo).

The scripts in tests/scripts/ train a few steps and each rank writes what it saw and its trainable parameters.
Both ranks must finish, see different batches and still end with the same parameters (the gradients were
averaged); in CycleRL a group of images is split over the ranks and its advantages must be normalized by the
statistics of the whole group. With bf16 mixed precision the first loss must also be close to the one a single
fp32 process computes on the same batch.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import JanusForConditionalGeneration

from echogen_rl.trainer.djo_trainer import djo_losses
from echogen_rl.trainer.pmtp_trainer import pmtp_losses

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def _free_port() -> int:
    # Two xdist workers may launch at once: each run gets its own rendezvous port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: str, checkpoint, out_dir: Path, *args: str, precision: str = "no") -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(SCRIPTS / script), str(checkpoint), str(out_dir), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(out_dir / f"rank{i}.pt") for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel" for r in ranks)
    return ranks


def _assert_ranks_agree_after_training(ranks: list[dict]) -> dict[str, torch.Tensor]:
    after, other = ranks[0]["after"], ranks[1]["after"]
    assert after and after.keys() == other.keys()
    for name in after:
        torch.testing.assert_close(after[name], other[name], atol=1e-6, rtol=0, msg=name)
    changed = [n for n in after if not torch.equal(after[n], ranks[0]["before"][n])]
    # The image head and the language model trained; the agreement is not that of untouched weights.
    assert any("generation_head" in n for n in changed) and any("language_model.layers" in n for n in changed)
    return after


def _assert_ranks_saw_different_batches(ranks: list[dict], micro_batches: int) -> None:
    first, second = ranks[0]["batches"], ranks[1]["batches"]
    assert len(first) == len(second) == micro_batches
    assert all(a != b for a, b in zip(first, second))  # else agreeing parameters would prove nothing


def test_pmtp_two_processes_with_gradient_accumulation(tiny_checkpoint, tmp_path):
    ranks = _launch(
        "dist_sft.py",
        tiny_checkpoint,
        tmp_path,
        "--stage",
        "pmtp",
        "--steps",
        "2",
        "--gradient_accumulation_steps",
        "2",
    )
    _assert_ranks_saw_different_batches(ranks, micro_batches=4)
    after = _assert_ranks_agree_after_training(ranks)
    # What no loss reads is frozen (DDP needs a gradient for every trainable parameter).
    assert not any(key in n for n in after for key in ("vision_model", "vqmodel", ".aligner."))


def test_djo_two_processes(tiny_checkpoint, tmp_path):
    ranks = _launch("dist_sft.py", tiny_checkpoint, tmp_path, "--stage", "djo", "--steps", "2")
    _assert_ranks_saw_different_batches(ranks, micro_batches=2)
    _assert_ranks_agree_after_training(ranks)


def _group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)  # TRL's group std is unbiased
    return ((groups - mean) / (std + 1e-4)).flatten()


def test_cyclerl_two_processes_normalize_groups_over_both_ranks(tiny_checkpoint, tmp_path):
    ranks = _launch("dist_cyclerl.py", tiny_checkpoint, tmp_path, "--steps", "2")
    after = _assert_ranks_agree_after_training(ranks)
    assert after and all("lora_" in n for n in after)
    for step in range(2):
        # One group of num_generations=4 images of one prompt, two on each rank.
        prompts = ranks[0]["prompts"][step] + ranks[1]["prompts"][step]
        assert len(prompts) == 4 and len(set(prompts)) == 1
        halves = [torch.tensor(r["rewards"][step]) for r in ranks]
        assert not torch.equal(halves[0], halves[1])  # each rank sampled its own images
        expected = _group_advantages(torch.cat(halves), 4)
        got = torch.tensor(ranks[0]["advantages"][step] + ranks[1]["advantages"][step])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Normalizing each rank's half on its own gives other advantages: the check tells the two apart.
        per_rank = torch.cat([_group_advantages(h, 2) for h in halves])
        assert not torch.allclose(per_rank, expected, atol=1e-2)


def test_cyclerl_two_processes_with_gradient_accumulation(tiny_checkpoint, tmp_path):
    # Two micro-batches per step: one generation batch of 8 images per step, two groups of 4 (a group per rank).
    ranks = _launch("dist_cyclerl.py", tiny_checkpoint, tmp_path, "--steps", "2", "--gradient_accumulation_steps", "2")
    _assert_ranks_agree_after_training(ranks)
    for step in range(2):
        rewards = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        got = torch.tensor(ranks[0]["advantages"][step] + ranks[1]["advantages"][step])
        torch.testing.assert_close(got, _group_advantages(rewards, 4), atol=1e-5, rtol=1e-5)


def _assert_first_loss_matches_one_process(checkpoint, ranks: list[dict], stage: str, tolerance: float) -> None:
    """Each rank's first teacher-forced loss equals the loss one fp32 process computes on the same batch."""
    model = JanusForConditionalGeneration.from_pretrained(checkpoint).train()
    for rank in ranks:
        batch, got = rank["first"]["batch"], rank["first"]["loss"]
        with torch.no_grad():
            if stage == "pmtp":
                out = pmtp_losses(model, batch)
                expected = (out["img"].loss + out["text"].loss).item()
            else:
                expected = djo_losses(model, batch, tau=1.0).l2i.loss.item()
        assert abs(got - expected) <= tolerance * abs(expected), (stage, got, expected)


@pytest.mark.parametrize("stage", ["pmtp", "djo"])
def test_sft_stages_with_bf16_mixed_precision_on_two_processes(tiny_checkpoint, tmp_path, stage):
    """`mixed_precision: bf16` (what every shipped accelerate config sets): fp32 weights, bf16 autocast."""
    ranks = _launch("dist_sft.py", tiny_checkpoint, tmp_path, "--stage", stage, precision="bf16")
    assert all(r["matmul_dtypes"] == {"torch.bfloat16"} for r in ranks)
    _assert_ranks_saw_different_batches(ranks, micro_batches=2)
    after = _assert_ranks_agree_after_training(ranks)
    assert all(p.dtype == torch.float32 for p in after.values())  # the master weights stay fp32
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
    # bf16 rounds every matmul input to 8 bits of mantissa: close to fp32, not equal.
    _assert_first_loss_matches_one_process(tiny_checkpoint, ranks, stage, 2e-2)
