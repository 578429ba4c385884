"""The paper's table for any checkpoint: the published benchmarks' protocols (COCO AP by the InstanceDiffusion
protocol, LayoutSAM-Eval with a vision-language judge, FID, referring-expression grounding), run by
`echogen-rl eval --benchmark ...`. Each protocol choice, and where it departs from the original, is in
`docs/evaluation.md`."""
