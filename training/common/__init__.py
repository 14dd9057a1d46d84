"""What the SFT and RL trainers share: config helpers, manifest rows, LoRA / EMA, checkpoints, logs, seeds,
LR schedules, atomic folder writes and the CLI error handling."""
