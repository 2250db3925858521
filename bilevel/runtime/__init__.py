"""Infrastructure: atomic files, checkpoints, distributed training, precision, seeding, progress and reports."""
