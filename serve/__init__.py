"""brainrecon.serve: serving and scaling out on the runtime API (`brainrecon.runtime.Reconstructor`) only.

    triton_server.py  recon-serve: a Triton server through PyTriton, model `brainrecon`, dynamic batching
    client.py         a small client (tritonclient) that turns error responses into one-line exceptions
    ray_batch.py      recon-batch: many betas files through a Ray Data actor pool, resumable, atomic outputs
    triton_models/    the Python-backend `model.py` files that `recon-export --format triton` copies

These modules run in the serving environment (`make serve-env`: numpy < 2 for PyTriton, tritonclient, Ray);
importing the package itself imports none of them.
"""
