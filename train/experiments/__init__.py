"""Studies on a fitted subject: noise sensitivity (`noise.py`), latent layers (`layers.py`), training curves
(`curves.py`); `plots.py` holds their shared figure style."""
