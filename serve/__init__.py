"""brainrecon.serve: serving and scaling out on the runtime API (`brainrecon.runtime.Reconstructor`) only.

    triton_server.py  recon-serve: the tritonserver that PyTriton bundles, on a private repository holding one
                      Python-backend model `brainrecon` (triton_models/runtime_model.py), dynamic batching with a
                      queue limit and timeout; each bad request gets its own error
    tritonserver.py   runs the tritonserver binary bundled in the PyTriton wheel on a model repository of our own
    triton_requests.py  one execution of a `brainrecon` Python-backend model: each request checked on its own, one
                      response (or one-line error) per request
    client.py         a small client (tritonclient) that turns error responses into one-line exceptions
    ray_batch.py      recon-batch: many betas files through a pool of Ray actors, one shard at a time; run.json per
                      output folder, resumable, PNGs written as made, per-shard errors and timeouts
    triton_models/    the Python-backend `model.py` files: recon-serve's, and those `recon-export --format triton` copies
    stream.py         recon-stream: a run's volumes as they arrive (replayed or a watched folder) -> each trial's
                      online beta (LSS GLM) -> normalised with a calibration run -> its PNGs; faults, resume, latency
    viewer.py         recon-stream --view and recon-view: the live page (Starlette + uvicorn on 127.0.0.1,
                      server-sent events) and its on-the-page latency

The Triton and Ray modules run in the serving environment (`make serve-env`: numpy < 2 for
PyTriton, tritonclient, Ray); stream.py and viewer.py in either environment (the `live` extra). Importing the
package itself imports none of them.
"""
