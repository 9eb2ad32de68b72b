"""Fine-tuning (`llmc finetune`, kind finetune): the recipe, the driver, the per-worker loop (`worker`), the
DeepSpeed / DDP strategy, evaluation, the step schedule and the resource plan."""
