"""Training: config, loop, schedules, EMA, checkpoints, logging, export."""
