"""The training engine: strategies (single, ddp, fsdp, zero1-3), one loop, objectives, checkpoints, metrics.

Entry point: :func:`trainer.run.run` with a :class:`trainer.config.RunConfig`.
"""
