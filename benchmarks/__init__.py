"""Benchmarks: the logic of `recon-bench` (runtime_vs_torch.py) and the scripts of `make bench`; results in results/."""
