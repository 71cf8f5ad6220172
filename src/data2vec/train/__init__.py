"""Training: loop, optimizer and schedules, checkpoints, distributed setup, logging."""
