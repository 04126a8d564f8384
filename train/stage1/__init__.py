"""train/stage1."""
