"""brainrecon: two-stage fMRI-to-image reconstruction, from training to a lean deployable runtime.

The core package is torch-free: configs, manifests, errors, the NSD reader, the simulated subject,
images, metrics and CLI wiring. `brainrecon.train` (torch), `brainrecon.export` (torch, onnx) and
`brainrecon.runtime` (numpy, onnxruntime, optional TensorRT) live in the top-level folders of the repo.
"""

__version__ = "0.1.0"
