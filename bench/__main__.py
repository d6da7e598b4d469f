"""Run the benchmarks: `python -m bench [name ...] [--json PATH] [--quick]`."""
import argparse
import importlib
import inspect

from bench.common import environment, print_table, save_json

BENCHMARKS = ["confusion_matrix", "copy_paste", "decode", "archive", "saliency", "train", "bilateral", "loaded", "memory",
              "quality", "openvocab", "discover"]
# Run by name only (minutes each on a CPU): official = side by side with the official scripts.
ON_REQUEST = ["official"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=BENCHMARKS,
                        help=f"any of {BENCHMARKS + ON_REQUEST}; default: {BENCHMARKS}")
    parser.add_argument("--json", default="bench/results/latest.json", help="write all rows here")
    parser.add_argument("--stages", action="store_true",
                        help="with loaded: whole stages (archive .. discover) on a ci toy world, not the ops")
    parser.add_argument("--quick", action="store_true", help="a smaller smoke run, for the benchmarks that have one")
    parser.add_argument("--stage", action="append", default=None,
                        help="with loaded --stages: time only this stage (repeatable; the others run once at 1 thread)")
    args = parser.parse_args()
    env = environment()
    print("environment:", ", ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    for name in args.names:
        module = importlib.import_module(f"bench.bench_{name}")
        if args.stages and name == "loaded":
            part = module.run_stages(stages=args.stage or module.STAGE_NAMES)
        elif args.quick and "quick" in inspect.signature(module.run).parameters:
            part = module.run(quick=True)
        else:
            part = module.run()
        print_table(part, name)
        rows += part
    save_json(rows, args.json)
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
