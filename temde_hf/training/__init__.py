"""Training T-EMDE dual encoders with `accelerate`: from one CPU to many GPUs.

Modules, in data-flow order: `arguments` (settings dataclasses, YAML/JSON + CLI) · `batches` (seeded,
resumable, sharded pair order) · `losses` (negatives gathered across processes with gradients) ·
`accumulation` (gradient caching: accumulation that keeps every negative) · `optim` (per-tower LR,
freezing, schedules) · `checkpointing` (atomic checkpoints, exact resume) · `loop` (the loop) ·
`curves` · `train` (``main(argv) -> metrics``, the ``temde-hf train`` command). Nothing is imported
here, so ``import temde_hf.training`` stays cheap.
"""
