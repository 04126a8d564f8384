"""Brain-Diffuser's eight reconstruction metrics (paper_metrics) and the feature networks they need, defined in
torchvision's layout without torchvision (feature_nets). See docs/metrics.md."""
