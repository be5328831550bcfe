"""A self-contained chat fine-tuning example, made offline: a small chat JSONL (train and
eval), a tokenizer folder with a chat template (a ``tokenizers`` WordLevel model wrapped in
``PreTrainedTokenizerFast``), and a small random Llama checkpoint saved with
``save_pretrained``. ``splitlearn data --chat DIR`` writes it; ``configs/chat.yaml`` trains on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SPECIAL = ["<unk>", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def synth_chats(num: int, seed: int) -> list[dict[str, Any]]:
    """Conversations about small sums: the user asks, the assistant answers in one sentence."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randrange(0, 6), rng.randrange(0, 5)
        ask = rng.choice(["what is {a} plus {b} ?", "please add {a} and {b} .", "{a} plus {b} makes what ?"])
        msgs = [
            {"role": "user", "content": ask.format(a=NUMBERS[a], b=NUMBERS[b])},
            {"role": "assistant", "content": f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."},
        ]
        rows.append({"messages": msgs})
    return rows


def build_tokenizer(texts: list[str], directory: Path) -> Any:
    """A word-level tokenizer of ``texts`` with the chat template, saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL[3:],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(directory))
    return hf


def build_model(tokenizer: Any, directory: Path, seed: int = 0, layers: int = 4) -> None:
    """A small random Llama checkpoint (safetensors) for the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(directory))


def write_chat_example(
    directory: str | Path, num_train: int = 400, num_eval: int = 40, seed: int = 0
) -> dict[str, Path]:
    """train.jsonl, eval.jsonl, tokenizer/ and model/ under ``directory``."""
    from splitlearn.fsio import atomic_write

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    train, evals = synth_chats(num_train, seed), synth_chats(num_eval, seed + 1)
    paths = {"train": d / "train.jsonl", "eval": d / "eval.jsonl", "tokenizer": d / "tokenizer", "model": d / "model"}
    for key, rows in (("train", train), ("eval", evals)):
        atomic_write(paths[key], "".join(json.dumps(r) + "\n" for r in rows))
    words = [" ".join(m["content"] for m in r["messages"]) for r in train + evals]
    words.append(" ".join(NUMBERS))
    tok = build_tokenizer(words, paths["tokenizer"])
    build_model(tok, paths["model"], seed)
    return paths
