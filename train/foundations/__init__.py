"""train/foundations."""
