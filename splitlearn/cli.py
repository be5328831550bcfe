"""The ``splitlearn`` command line. User errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from splitlearn.config import PROGRESS_MODES

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
    for add in (
        _add_train,
        _add_validate,
        _add_check_model,
        _add_plan,
        _add_privacy,
        _add_profile,
        _add_timeline,
        _add_data,
        _add_shard,
    ):
        add(sub, common)
    from splitlearn.cli_cluster import add_cluster_commands
    from splitlearn.cli_model import add_model_commands

    add_model_commands(sub, common)
    add_cluster_commands(sub, common)
    return parser


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
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
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest whole checkpoint (default: the newest run of this config)",
    )
    p.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default=None,
        help="progress display (default: runtime.progress, 'auto' = bar on a terminal)",
    )


def _add_validate(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _add_check_model(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "check-model",
        help="check that the split model computes what the model computes",
        description=(
            "Build a scaled-down copy of the configured model family (or of the local checkpoint's config) "
            "with random weights, cut it at several cut lists, and compare the loss and every gradient with "
            "the unsplit model's, with and without padding, in fp32. Prints a verdict per cut list; exit code 2 "
            "when one differs. `validate` and `train` run a quick version of it before planning."
        ),
        epilog="example:\n  splitlearn check-model configs/quickstart.yaml model.family=gemma2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _add_config_args(p)


def _add_plan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "plan",
        help="plan the run: which device runs which layers; compare partitioners",
        description=(
            "Cut the model over the topology's devices with the configured partitioner (plan.partitioner), "
            "print the plan with its predicted step time, bottleneck and memory, and write plan.yaml. "
            "Costs come from plan.profile (a `splitlearn profile` output) or are counted on the meta device."
        ),
        epilog="examples:\n  splitlearn plan configs/quickstart.yaml plan.partitioner=optimal\n"
        "  splitlearn plan configs/quickstart.yaml --compare uniform,balanced,optimal --timeline t.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _add_config_args(p)
    p.add_argument("--out", default="plan.yaml", help="where to write the plan (default plan.yaml)")
    p.add_argument("--compare", metavar="A,B,...", help="partitioners to compare side by side")
    p.add_argument("--timeline", metavar="PNG", help="draw the simulated schedule of the plan as a Gantt chart")
    p.add_argument("--memory", metavar="PNG", help="draw predicted memory per device against its capacity")


def _add_profile(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "profile",
        help="measure each layer: params, FLOPs, cut bytes, memory, time",
        description=(
            "Build the run's model on this machine and profile each layer of the chain (embed, blocks, head) "
            "for one micro-batch (train.batch_size / train.micro_batches rows of data.seq_len tokens): "
            "parameters, forward/backward FLOPs (torch FlopCounterMode), bytes crossing a cut, bytes saved "
            "for backward, median forward/backward time. Prints a table and writes profile.json."
        ),
        epilog="examples:\n  splitlearn profile configs/quickstart.yaml\n"
        "  splitlearn profile configs/quickstart.yaml --layers 1:3 --calibrate --out q.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _add_config_args(p)
    p.add_argument("--layers", help="chain range a:b to profile (default: all; 0 is embed, the last is head)")
    p.add_argument("--out", default="profile.json", help="where to write the profile (default profile.json)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also measure this machine's effective FLOP/s (matmul), stored in the profile",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="where to run (default: cuda if available, else cpu)"
    )
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default from the config)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default data.seq_len)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per layer, median reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _add_timeline(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "timeline",
        help="draw a traced step of a run next to the simulator's replay of it",
        description=(
            "Draw one step of a run made with runtime.trace=true as it ran (each stage's forwards, "
            "backwards and optimizer step; each transfer from its send to its receive), above the "
            "simulator's replay of the same plan and links on the compute the run measured."
        ),
        epilog="example:\n  splitlearn train configs/quickstart.yaml runtime.trace=true runtime.run_name=q\n"
        "  splitlearn timeline runs/q --out q.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("run_dir", help="a run directory (plan.yaml, metrics.jsonl)")
    p.add_argument("--step", type=int, default=None, help="the step to draw (default: the traced step of median time)")
    p.add_argument("--out", default="timeline.png", help="PNG to write (default timeline.png)")


def _add_data(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "data",
        help="write the quickstart corpus, or the chat example",
        description=(
            "Write the small synthetic corpus the quickstart trains on (deterministic for a seed); with --chat, "
            "a folder with a chat JSONL (train.jsonl, eval.jsonl), a tokenizer folder with a chat template and a "
            "small random Llama checkpoint (model/), for configs/chat.yaml."
        ),
        parents=[common],
    )
    p.add_argument("output", nargs="?", default=None, help="file to write (default data/quickstart.txt; data/chat)")
    p.add_argument("--chat", action="store_true", help="write the chat example folder instead")
    p.add_argument("--docs", type=int, default=600, help="number of documents (default 600)")
    p.add_argument("--seed", type=int, default=0)


def _add_shard(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "shard",
        help="cut a local checkpoint into one directory per stage of a plan",
        description=(
            "Write one directory per stage of a plan (stage_0, stage_1, ...) under --out, each holding the "
            "checkpoint's config and only that stage's tensors (names and dtype as stored), so a device "
            "receives and stores only its segment. Point model.path at a stage's directory on that stage's "
            "node; a worker refuses a directory sharded for another stage."
        ),
        epilog="example:\n  splitlearn plan run.yaml --out plan.yaml\n"
        "  splitlearn shard /models/my-llama --plan plan.yaml --out /models/my-llama-stages",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("model_dir", help="a local checkpoint directory (config.json + safetensors)")
    p.add_argument("--plan", required=True, help="a plan written by `splitlearn plan` (plan.yaml)")
    p.add_argument("--out", required=True, help="directory to create, one stage_<i> directory per stage")
    p.add_argument("--adapter-module", default=None, help="module that registers the model's family, if not built in")


def _add_privacy(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "privacy",
        help="measure what leaves the data owner at each candidate cut (attacks) and what bounding it costs",
        description=(
            "Run the attacks (nearest-neighbour and learned inversion of the owner's activations, labels from "
            "the gradients a U-shaped tail sends back) on the run's model for 0..privacy.max_owner_blocks "
            "blocks on the owner; print the recovery rates and the best plan's cost at each; cache the figures "
            "(privacy.cache_dir) for `splitlearn plan` and `train` to bound the plan by privacy.max_token_recovery."
        ),
        parents=[common],
    )
    _add_config_args(p)
    p.add_argument("--remeasure", action="store_true", help="measure again even when cached")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options: `train CONFIG --progress log a.b=1`
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from splitlearn import logs

    logs.setup(args.verbose)  # library notices go to the run's log, not the screen
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from splitlearn.errors import StageFailed, UserError

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "train":
            from splitlearn.config import load_config
            from splitlearn.trainer import train

            logging.getLogger("splitlearn").setLevel(logging.DEBUG if args.verbose else logging.INFO)
            cfg = load_config(args.config, args.overrides)
            result = train(cfg, progress=args.progress, resume=args.resume)
            print(f"run directory: {result.run_dir}")
            return 0
        if args.command == "validate":
            return _validate(args)
        if args.command == "check-model":
            return _check_model(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "shard":
            return _shard(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "privacy":
            from splitlearn.config import load_config
            from splitlearn.privacy.report import privacy_command

            print(privacy_command(load_config(args.config, args.overrides), args.remeasure))
            return 0
        if args.command == "timeline":
            from splitlearn.plan_report import draw_run_timeline

            step, measured, replayed = draw_run_timeline(args.run_dir, args.out, args.step)
            print(f"step {step}: {measured:.1f} ms measured (first action to last), {replayed:.1f} ms replayed")
            print(f"wrote {args.out}")
            return 0
        if args.command == "data" and args.chat:
            from splitlearn.chat_example import write_chat_example

            paths = write_chat_example(args.output or "data/chat", seed=args.seed)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
            return 0
        if args.command == "data":
            from splitlearn.config import directory_problem
            from splitlearn.data import write_synth_corpus
            from splitlearn.errors import ConfigError
            from splitlearn.fsio import check_writable

            out = args.output or "data/quickstart.txt"
            if args.docs < 1:
                raise ConfigError(f"--docs: must be >= 1, got {args.docs}")
            problem = directory_problem(Path(out).parent)
            if problem:
                raise ConfigError(f"cannot write {out}: {problem}")
            if Path(out).parent.is_dir():
                check_writable(out)
            path = write_synth_corpus(out, args.docs, args.seed)
            print(f"wrote {path} ({path.stat().st_size} bytes)")
            return 0
        from splitlearn.cli_cluster import CLUSTER_COMMANDS
        from splitlearn.cli_model import MODEL_COMMANDS, run_model_command
        from splitlearn.cluster_commands import run_cluster_command

        if args.command in MODEL_COMMANDS:
            if args.command == "export":
                logging.getLogger("splitlearn").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
            return run_model_command(args)

        if args.command in CLUSTER_COMMANDS:
            return run_cluster_command(args)
    except UserError as e:
        print(f"splitlearn: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"splitlearn: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("splitlearn: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("splitlearn: interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that every ``finally`` runs: the workers and an
    embedded Ray cluster are shut down as on Ctrl-C (Python's default would exit at once)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _validate(args: argparse.Namespace) -> int:
    """Every check first (the config, the data, the model and the plan), then the output:
    an error is the only line printed."""
    from splitlearn.config import load_config
    from splitlearn.planning import check_data, make_plan

    cfg = load_config(args.config, args.overrides)
    check_data(cfg, embedded=not (cfg.run.ray.address or os.environ.get("RAY_ADDRESS")))
    table = None
    if not args.no_plan:
        from splitlearn.models.check import require_exact

        require_exact(cfg.run.model)
        table = make_plan(cfg).table()
    print(cfg.to_yaml().rstrip())
    print(f"# topology '{cfg.topology.name}': {', '.join(cfg.topology.device_names)}")
    if table is not None:
        print(table)
    return 0


def _check_model(args: argparse.Namespace) -> int:
    from splitlearn.config import load_config
    from splitlearn.errors import ModelError
    from splitlearn.models.build import hf_config
    from splitlearn.models.check import TOLERANCE, check_model, wrong_split_line

    cfg = load_config(args.config, args.overrides)
    family = hf_config(cfg.run.model).model_type
    adapter, checks = check_model(cfg.run.model)
    print(f"family {family}, adapter {adapter}: a tiny copy, split vs unsplit, fp32, tolerance {TOLERANCE:g}")
    for c in checks:
        print(f"  {c.line()}")
    bad = next((c for c in checks if not c.exact), None)
    if bad is not None:
        raise ModelError(wrong_split_line(family, adapter, bad))
    print(f"exact: every cut list, packed and padded ({len(checks)} checks)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from partitioners import PARTITIONERS
    from partitioners.planner.explain import unused_devices
    from splitlearn.config import load_config
    from splitlearn.errors import ConfigError
    from splitlearn.fsio import atomic_write, check_writable
    from splitlearn.plan_report import compare, draw_memory, draw_timeline
    from splitlearn.planning import make_plan, plan_request

    cfg = load_config(args.config, args.overrides)
    names = [n.strip() for n in args.compare.split(",") if n.strip()] if args.compare else []
    for n in names:
        if n not in PARTITIONERS:
            raise ConfigError(f"--compare: '{n}' is not one of {', '.join(PARTITIONERS)}")
    for target in (args.out, args.timeline, args.memory):  # fail before planning, not after printing
        if target:
            check_writable(target)
    req = plan_request(cfg)
    plan = make_plan(cfg, request=req)
    print(plan.table())
    for dev, why in unused_devices(req, plan).items():
        print(f"unused {dev}: {why}")
    if names:
        _, table = compare(cfg, names)
        print()
        print(table)
    atomic_write(args.out, plan.to_yaml())
    print(f"wrote {args.out}")
    if args.timeline:
        draw_timeline(plan, args.timeline)
        print(f"wrote {args.timeline}")
    if args.memory:
        draw_memory(plan, cfg, args.memory)
        print(f"wrote {args.memory}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from splitlearn.config import load_config
    from splitlearn.errors import ConfigError
    from splitlearn.fsio import atomic_write, check_writable
    from splitlearn.planning import check_batch_fits
    from splitlearn.profile_report import profile_model, profile_table

    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    check_writable(args.out)
    if args.micro_batch is not None:
        if args.micro_batch < 1:
            raise ConfigError(f"--micro-batch: must be >= 1, got {args.micro_batch}")
        cfg.run.train.batch_size = args.micro_batch * cfg.run.train.micro_batches
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len: must be >= 2, got {args.seq_len}")
    if args.seq_len is not None:
        cfg.run.data.seq_len = args.seq_len
    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    check_batch_fits(cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    prof, span = profile_model(
        cfg, layers=args.layers, device=device, repeats=args.repeats, calibrate=args.calibrate, threads=args.threads
    )
    print(profile_table(prof, span))
    atomic_write(args.out, prof.to_json())
    print(f"wrote {args.out}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    """``splitlearn shard``: the stage directories are written beside ``--out`` and renamed to
    it at the end, so a failure leaves nothing at ``--out``."""
    import shutil
    import tempfile

    from cluster.tables import render_table
    from splitlearn.config import ModelConfig, directory_problem
    from splitlearn.errors import ConfigError
    from splitlearn.models.build import meta_model
    from splitlearn.models.hf_checkpoint import write_stage_dirs
    from splitlearn.plan_report import read_plan

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; give a new directory")
    problem = directory_problem(out.parent)
    if problem:
        raise ConfigError(f"--out: {problem}")
    plan = read_plan(Path(args.plan), "--plan")
    model = meta_model(ModelConfig(path=args.model_dir, adapter_module=args.adapter_module))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = write_stage_dirs(model, Path(args.model_dir), plan.ranges, partial)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    table = [
        [str(r["stage"]), "+".join(s.devices), f"[{s.start},{s.stop})", str(r["keys"]), f"{r['bytes'] / 1e6:.1f}"]
        for r, s in zip(rows, plan.stages, strict=True)
    ]
    print(render_table(["stage", "devices", "chain", "tensors", "MB"], table, numeric=("tensors", "MB")))
    print(f"wrote {out}: one directory per stage (stage_<i>); set model.path to it on that stage's node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
