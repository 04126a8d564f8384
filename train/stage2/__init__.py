"""train/stage2."""
