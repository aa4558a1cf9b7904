"""``python -m benchmarks [--family NAME] [--quick] [--results-dir DIR]``: runs every family's
benchmarks, or one, and writes their results (default: ``benchmarks/results``)."""
import argparse

import torch

from benchmarks import (
    bench_generate,
    bench_hf,
    bench_layer,
    bench_moe,
    bench_projection,
    bench_train,
    bench_varlen,
)
from benchmarks.harness import RESULTS_DIR

FAMILIES = {"varlen": bench_varlen.run, "projection": bench_projection.run, "moe": bench_moe.run,
            "layer": bench_layer.run, "hf": bench_hf.run, "generate": bench_generate.run,
            "train": bench_train.run}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", choices=sorted(FAMILIES), help="one family only")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a first look")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the results go")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No GPU here: timing the CPU backends at CPU sizes; GPU figures need a GPU.\n")
    for name, run in FAMILIES.items():
        if args.family in (None, name):
            print(f"== {name}")
            run(device, args.quick, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
