"""Evaluation on a subject's test set: the reconstructions recon-reconstruct writes and the results tables of
recon-eval stage1 / stage2 (stage1.py, stage2.py), and Brain-Diffuser's eight reconstruction metrics (paper_metrics)
with the feature networks they need, defined in torchvision's layout without torchvision (feature_nets). See
docs/metrics.md."""
