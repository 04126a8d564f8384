"""brainrecon.serve: serving and scaling out on the runtime API (`brainrecon.runtime.Reconstructor`) only.

    triton_server.py  recon-serve: the tritonserver that PyTriton bundles, on a private repository holding one
                      Python-backend model `brainrecon` (triton_models/runtime_model.py), dynamic batching with a
                      queue limit and timeout; each bad request gets its own error
    client.py         a small client (tritonclient) that turns error responses into one-line exceptions
    ray_batch.py      recon-batch: many betas files through a pool of Ray actors, one shard at a time; run.json per
                      output folder, resumable, PNGs written as made, per-shard errors and timeouts
    triton_models/    the Python-backend `model.py` files: recon-serve's, and those `recon-export --format triton` copies

These modules run in the serving environment (`make serve-env`: numpy < 2 for PyTriton, tritonclient, Ray);
importing the package itself imports none of them.
"""
