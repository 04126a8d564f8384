"""Two-stage end-to-end benchmark (issue 6): the torch-free runtime (ONNX Runtime fp32, fp16) vs the torch reference
pipeline on the same exported model directory, with the per-stage split. Results: benchmarks/results/stage2_runtime.json.
The same as `recon-bench`; the logic is brainrecon/benchmarks/runtime_vs_torch.py.

    python benchmarks/bench_stage2_runtime.py --model-dir engines/subj01 --betas data/subj01/test_betas.npy
        [--repeats 3] [--threads 2] [--check benchmarks/targets.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from brainrecon.benchmarks.runtime_vs_torch import bench_and_write

RESULTS = Path(__file__).parent / "results" / "stage2_runtime.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model dir (recon-export)")
    parser.add_argument("--betas", type=Path, required=True, help="z-scored betas .npy (test_betas.npy)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N betas only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check", type=Path, default=None, help="targets JSON; exit 1 below a floor")
    parser.add_argument("--note", default="", help="How the model dir was made (recorded with the results).")
    args = parser.parse_args()

    line, misses = bench_and_write(
        args.model_dir, args.betas, args.out, args.limit, args.repeats, args.threads, args.check, args.note
    )
    print(line)
    for miss in misses:
        print(f"regression: {miss}", file=sys.stderr)
    if misses:
        sys.exit(1)
    if args.check is not None:
        print(f"speedups at or above the floors in {args.check}")


if __name__ == "__main__":
    main()
