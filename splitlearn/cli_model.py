"""The commands after training: ``export``, ``generate`` and ``curves``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MODEL_COMMANDS = ("export", "generate", "curves")


def add_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "export",
        help="write a run's fine-tuned model as one Hugging Face directory",
        description=(
            "Place the run's workers again, have each load its stage of the newest whole checkpoint from its own "
            "node, gather every stage's tensors through Ray (LoRA merged in) and write one directory that "
            "AutoModelForCausalLM and AutoTokenizer load: sharded safetensors in the training dtype, config.json, "
            "generation_config.json and the tokenizer's files. Written beside --out and renamed at the end."
        ),
        epilog="example:\n  splitlearn export runs/chat --out models/chat-tuned",
        formatter_class=fmt,
        parents=[common],
    )
    p.add_argument("run_dir", help="a run directory (run.json, plan.yaml, checkpoint/)")
    p.add_argument("--out", required=True, help="directory to create (must be new or empty)")
    p = sub.add_parser(
        "generate",
        help="sample text from an exported model or a run",
        description=(
            "Load an exported directory (or a run directory's export/, exported first when missing) with "
            "transformers and continue the prompt; with a chat template the prompt is a user turn."
        ),
        epilog='example:\n  splitlearn generate runs/chat --prompt "what is two plus three ?"',
        formatter_class=fmt,
        parents=[common],
    )
    p.add_argument("model", help="an exported model directory or a run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the prompt as it is, without the chat template")
    p = sub.add_parser(
        "curves",
        help="draw a run's loss, eval loss and tokens/s to a PNG",
        description="Read the run's metrics.jsonl and draw training loss and eval loss by step, and tokens per second.",
        epilog="example:\n  splitlearn curves runs/chat --out curves.png",
        formatter_class=fmt,
        parents=[common],
    )
    p.add_argument("run_dir", help="a run directory (metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")


def run_model_command(args: argparse.Namespace) -> int:
    if args.command == "export":
        from splitlearn.export import export_run

        info = export_run(args.run_dir, args.out)
        print(
            f"exported step {info['step']} to {info['dir']}: {info['tensors']} tensors in {info['files']} "
            f"safetensors file(s), {info['dtype']}, {info['lora_modules']} LoRA modules merged, "
            f"tokenizer {'included' if info['tokenizer'] else 'none (byte tokenizer)'}"
        )
        return 0
    if args.command == "generate":
        from splitlearn.export import generate

        text = generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed, chat=not args.raw)
        print(text)
        return 0
    from splitlearn.curves import draw_curves
    from splitlearn.fsio import check_writable

    check_writable(args.out)
    drawn = draw_curves(Path(args.run_dir), Path(args.out))
    print(f"wrote {args.out}: {drawn['steps']} steps, {drawn['evals']} evals")
    return 0
