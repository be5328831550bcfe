"""The ``splitlearn`` command line. User errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EPILOG = """overrides are key=value pairs merged over the config file, e.g.
  splitlearn train configs/quickstart.yaml train.steps=20 train.lr=3e-4"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitlearn",
        description=(
            "Fine-tune a Hugging Face causal LM split between edge devices and the cloud: "
            "the model is cut into segments, one per device of your topology, and trained as a "
            "pipeline of Ray actors over torch.distributed. Raw inputs stay on the device that owns them."
        ),
        epilog="Run 'splitlearn COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="plan, place and train a run",
        description=(
            "Load the config, cut the model into one segment per device, place one Ray worker per "
            "stage (an embedded local cluster unless ray.address or RAY_ADDRESS is set), train, and "
            "write the run directory: config.yaml, plan.yaml, metrics.jsonl, summary.json, checkpoint/."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _add_config_args(p)
    p.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default=None,
        help="progress display (default: runtime.progress, 'auto' = bar on a terminal)",
    )

    p = sub.add_parser(
        "validate",
        help="check a config and print it resolved",
        description="Merge the config file with the overrides, check every key, and print the resolved config "
        "(with the topology it names) and the plan it gives. Touches no cluster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _add_config_args(p)
    p.add_argument("--no-plan", action="store_true", help="skip building the plan (no model construction)")

    p = sub.add_parser(
        "data",
        help="write the quickstart corpus",
        description="Write the small synthetic corpus the quickstart trains on (deterministic for a seed).",
        parents=[common],
    )
    p.add_argument("output", nargs="?", default="data/quickstart.txt", help="file to write")
    p.add_argument("--docs", type=int, default=600, help="number of documents (default 600)")
    p.add_argument("--seed", type=int, default=0)

    from splitlearn.cli_cluster import add_cluster_commands

    add_cluster_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from splitlearn.errors import UserError

    try:
        if args.command == "train":
            from splitlearn.config import load_config
            from splitlearn.trainer import train

            logging.getLogger("splitlearn").setLevel(logging.DEBUG if args.verbose else logging.INFO)
            cfg = load_config(args.config, args.overrides)
            result = train(cfg, progress=args.progress)
            print(f"run directory: {result.run_dir}")
            return 0
        if args.command == "validate":
            from splitlearn.config import load_config
            from splitlearn.trainer import make_plan

            cfg = load_config(args.config, args.overrides)
            print(cfg.to_yaml().rstrip())
            print(f"# topology '{cfg.topology.name}': {', '.join(cfg.topology.device_names)}")
            if not args.no_plan:
                print(make_plan(cfg).table())
            return 0
        if args.command == "data":
            from splitlearn.data import write_synth_corpus

            path = write_synth_corpus(args.output, args.docs, args.seed)
            print(f"wrote {path} ({path.stat().st_size} bytes)")
            return 0
        from splitlearn.cli_cluster import CLUSTER_COMMANDS, run_cluster_command

        if args.command in CLUSTER_COMMANDS:
            return run_cluster_command(args)
    except UserError as e:
        print(f"splitlearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitlearn: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
