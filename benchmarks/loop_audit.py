"""Where DJO's loop signal lives or dies: losses and gradient norms of the loop, per image source, for a checkpoint.

    python benchmarks/loop_audit.py --checkpoint outputs/study/pmtp --out outputs/loop_audit.json

On validation layouts (never the held-out ones), for one checkpoint:

- the grounding loss on the real image, against `L_loop` on the teacher-forced sample, on the model's own T=1
  sample (self-forced) and on its greedy image;
- at each Gumbel temperature `tau`, the gradient norms on `generation_head` and on the last decoder layer from
  `L_L2I`, from `L_loop` through the image side only (a frozen copy reads the image: only the generator gets the
  gradient) and through the grounder only (the rest of the loop's gradient), and the cosine between `L_L2I`'s
  gradient and the loop's image-side gradient.

The JSON records the commit, the hardware and repository-relative paths.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from common import provenance

from echogen_rl.data.collators import LoopLossCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.data.splits import VALIDATION_SEED
from echogen_rl.eval.evaluation import write_report
from echogen_rl.models.loading import load_janus
from echogen_rl.models.modeling import masked_cross_entropy, mixed_forward, unwrap_janus
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.trainer.djo_trainer import djo_losses

SOURCES = {"teacher_forced": ("teacher_forced", 1.0), "self_forced_t1": ("self_forced", 1.0)}
SOURCES["self_forced_greedy"] = ("self_forced", 0.0)


def _groups(janus) -> dict[str, list[torch.nn.Parameter]]:
    return {
        "generation_head": list(janus.model.generation_head.parameters()),
        "last_layer": list(janus.model.language_model.layers[-1].parameters()),
    }


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def audit(model, prompts: PromptBuilder, batches: list[dict], taus: list[float]) -> dict:
    janus = unwrap_janus(model)
    reader = copy.deepcopy(janus).requires_grad_(False)
    special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
    losses = {"i2l_real": []} | {f"loop_{name}": [] for name in SOURCES}
    norms: dict[str, dict] = {}
    for b, batch in enumerate(batches):
        with torch.no_grad():
            hidden = mixed_forward(model, batch["i2l_input_ids"], batch["i2l_image_mask"], batch["i2l_attention_mask"])
            losses["i2l_real"].append(
                masked_cross_entropy(model, hidden, batch["i2l_text_labels"], "text").loss.item()
            )
            for name, (source, temperature) in SOURCES.items():
                torch.manual_seed(b)
                out = djo_losses(
                    model, batch, 1.0, loop_image=source, l2i_weight=0.0, special_ids=special, temperature=temperature
                )
                losses[f"loop_{name}"].append(out.loop.loss.item())
        for tau in taus:
            for name, (source, temperature) in SOURCES.items():
                key = f"{name}/tau{tau:g}"
                row = norms.setdefault(key, {})
                kwargs = dict(loop_image=source, special_ids=special, temperature=temperature)
                # The same noise for both: the difference of their gradients is the grounder's side alone.
                torch.manual_seed(b)
                both = djo_losses(model, batch, tau, **kwargs)
                torch.manual_seed(b)
                image = djo_losses(model, batch, tau, grounder=reader, **kwargs)
                for group, params in _groups(janus).items():
                    l2i = _grads(both.l2i.loss, params)
                    loop_all = _grads(both.loop.loss, params)
                    loop_image = _grads(image.loop.loss, params)
                    loop_grounder = loop_all - loop_image
                    for part, g in (
                        ("l2i", l2i),
                        ("loop_image_side", loop_image),
                        ("loop_grounder_side", loop_grounder),
                    ):
                        row.setdefault(f"{group}/{part}", []).append(float(g.norm()))
                    cos = torch.nn.functional.cosine_similarity(l2i, loop_image, dim=0)
                    row.setdefault(f"{group}/cosine_l2i_loop_image", []).append(float(cos))
                model.zero_grad(set_to_none=True)
    mean = {k: round(float(np.mean(v)), 4) for k, v in losses.items()}
    return {
        "losses": mean,
        "gradient_norms": {k: {m: round(float(np.mean(v)), 6) for m, v in row.items()} for k, row in norms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.55, 0.3])
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_janus(str(args.checkpoint))
    model.eval()
    prompts = PromptBuilder(tokenizer, unwrap_janus(model).config.vision_config.num_image_tokens)
    data = build_shapes_dataset(args.layouts, seed=VALIDATION_SEED)
    collate = LoopLossCollator(prompts)
    batches = [
        collate([data[i] for i in range(s, min(s + args.batch_size, len(data)))])
        for s in range(0, len(data), args.batch_size)
    ]
    result = audit(model, prompts, batches, args.taus)
    checkpoint = args.checkpoint.resolve()
    try:
        checkpoint = checkpoint.relative_to(Path.cwd().resolve())
    except ValueError:
        checkpoint = Path(checkpoint.name)
    report = {
        "checkpoint": str(checkpoint),
        "split": "validation",
        "layouts": len(data),
        "taus": args.taus,
        **result,
        **provenance(),
    }
    print(write_report(report, args.out))
    print(result["losses"])
    for key, row in result["gradient_norms"].items():
        print(key, row)


if __name__ == "__main__":
    main()
