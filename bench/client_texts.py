"""Non-IID client texts for split-federated runs: each client a different kind of text
(stories, arithmetic, weather reports, recipes), generated from a seed, no download.

    python bench/client_texts.py data/clients     # writes stories.txt, arithmetic.txt, ...
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["ana", "ben", "cy", "dot", "eli", "fay", "gus", "ida", "jon", "kai", "lu", "max"]


def stories(rng: random.Random) -> str:
    """The quickstart corpus's kind: counting stories."""
    lines = (ROOT / "data" / "quickstart.txt").read_text().split("\n\n")
    return rng.choice(lines).strip()


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    op = rng.choice("+-")
    return f"{a} {op} {b} = {a + b if op == '+' else a - b}."


def weather(rng: random.Random) -> str:
    city = rng.choice(["oslo", "lima", "cairo", "perth", "quito", "riga", "hanoi", "dakar"])
    day = rng.choice(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"])
    sky = rng.choice(["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"])
    return f"on {day} the weather in {city} was {sky}, {rng.randint(-10, 38)} degrees and {rng.randint(5, 95)}% humid."


def recipes(rng: random.Random) -> str:
    item = rng.choice(["flour", "sugar", "rice", "milk", "butter", "beans", "oats", "salt"])
    verb = rng.choice(["stir", "whisk", "fold", "bake", "boil", "fry", "chill", "mash"])
    return f"{rng.choice(NAMES)}: add {rng.randint(1, 5)} cups of {item}, then {verb} for {rng.randint(2, 40)} minutes."


KINDS: dict[str, Callable[[random.Random], str]] = {
    "stories": stories,
    "arithmetic": arithmetic,
    "weather": weather,
    "recipes": recipes,
}


def client_text(kind: str, seed: int, num_bytes: int = 16_000) -> str:
    rng, out, size = random.Random(seed), [], 0
    while size < num_bytes:
        line = KINDS[kind](rng)
        out.append(line)
        size += len(line) + 2
    return "\n\n".join(out) + "\n"


def write_clients(directory: Path, num_clients: int, num_bytes: int = 16_000) -> list[Path]:
    """``num_clients`` files, the kinds in turn (client i: kind i % 4, seeded by i)."""
    directory.mkdir(parents=True, exist_ok=True)
    kinds = list(KINDS)
    paths = []
    for i in range(num_clients):
        kind = kinds[i % len(kinds)]
        name = kind if i < len(kinds) else f"{kind}-{i}"
        path = directory / f"{name}.txt"
        path.write_text(client_text(kind, seed=i, num_bytes=num_bytes))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_clients(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "data" / "clients"), 4):
        print(p)
