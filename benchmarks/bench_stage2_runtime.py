"""Two-stage end-to-end benchmark (issues 6 and 13): the torch-free runtime (ONNX Runtime fp32 with and without the
K/V-once UNet, OpenVINO f32 and bf16) vs the torch reference in eager fp32 and in torch's fastest CPU mode, on the
same exported model directory, with the per-stage split; optionally the curves over batch sizes and their plot.
Results: benchmarks/results/stage2_runtime.json (+ stage2_runtime_curves.png). The same as `recon-bench`; the logic
is brainrecon/benchmarks/runtime_vs_torch.py.

    python benchmarks/bench_stage2_runtime.py --model-dir engines/subj01 --betas data/subj01/test_betas.npy \\
        --limit 32 [--repeats 3] [--threads 2] [--curves 1,4,16,64] [--check benchmarks/targets.json]
        [--pipelines torch,ort_fp32_plain,ort_fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from brainrecon.benchmarks.runtime_vs_torch import CI_PIPELINES, DEFAULT_PIPELINES, bench_and_write

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
    parser.add_argument(
        "--pipelines",
        default=None,
        help="comma-separated (runtime_vs_torch.PIPELINES); default: the CI set with --check, else all",
    )
    parser.add_argument(
        "--curves", default="", help="batch sizes for the curves, e.g. 1,4,16,64 (none: skip)"
    )
    parser.add_argument("--curve-repeats", type=int, default=3)
    parser.add_argument(
        "--curve-pipelines", default=None, help="pipelines of the curves (default: --pipelines)"
    )
    parser.add_argument(
        "--torch-candidates",
        default="eager,channels_last,bf16,compile,compile_bf16",
        help="torch CPU modes tried for torch_best (runtime_vs_torch.TORCH_MODES)",
    )
    parser.add_argument(
        "--torch-modes", type=Path, default=None, help="a torch_modes JSON measured earlier on this machine"
    )
    args = parser.parse_args()
    pipelines = args.pipelines or ",".join(CI_PIPELINES if args.check is not None else DEFAULT_PIPELINES)

    line, misses = bench_and_write(
        args.model_dir,
        args.betas,
        args.out,
        args.limit,
        args.repeats,
        args.threads,
        args.check,
        args.note,
        tuple(p for p in pipelines.split(",") if p),
        tuple(int(b) for b in args.curves.split(",") if b),
        args.curve_repeats,
        json.loads(args.torch_modes.read_text()) if args.torch_modes else None,
        tuple(m for m in args.torch_candidates.split(",") if m),
        tuple(p for p in args.curve_pipelines.split(",") if p) if args.curve_pipelines else None,
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
