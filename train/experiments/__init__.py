"""The paper's experiments on a fitted subject: noise sensitivity (`noise.py`) and latent layers (`layers.py`)."""
