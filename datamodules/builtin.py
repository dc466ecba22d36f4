"""Built-in data written to disk on demand, so tiny configs run offline through the same loaders as real data.

``builtin:sft`` is an Alpaca-format instruction set of four string tasks a tiny character-level model can learn
in a minute on a CPU (reverse, sort, uppercase, repeat). ``builtin:preference`` is a pair set with one rule a tiny
random model can pick up from preferences alone: the chosen response writes the word in the case the prompt asks for,
the rejected one in the other case.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

from recipes.modules.cache import cache_dir

BUILTIN_PREFIX = "builtin:"

_TASKS: dict[str, Callable[[str], str]] = {
    "Reverse the letters of the word.": lambda w: w[::-1],
    "Sort the letters of the word alphabetically.": lambda w: "".join(sorted(w)),
    "Write the word in capital letters.": str.upper,
    "Repeat the word twice, separated by a space.": lambda w: f"{w} {w}",
}


def builtin_sft_rows(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca rows (instruction, input, output) over random lowercase words of 3-6 letters."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for _ in range(n):
        instruction, fn = rng.choice(list(_TASKS.items()))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        rows.append({"instruction": instruction, "input": word, "output": fn(word)})
    return rows


def builtin_preference_rows(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """``n`` generic rows (prompt, chosen, rejected): "Write <word> in capital|small letters." -> the word in the
    asked case (chosen) or the other case (rejected). Telling them apart needs the prompt, not just the response."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        upper = rng.random() < 0.5
        asked, other = (word.upper(), word) if upper else (word, word.upper())
        prompt = f"Write {word} in {'capital' if upper else 'small'} letters.\n"
        rows.append({"prompt": prompt, "chosen": asked, "rejected": other})
    return rows


def resolve_builtin(source: str) -> str:
    """Map ``builtin:<name>`` to a JSONL file written once under the cache folder; other sources pass through."""
    if not source.startswith(BUILTIN_PREFIX):
        return source
    name = source[len(BUILTIN_PREFIX):]
    writers = {"sft": builtin_sft_rows, "preference": builtin_preference_rows}
    if name not in writers:
        raise ValueError(f"Unknown built-in data set {source!r}; available: "
                         + ", ".join(BUILTIN_PREFIX + k for k in writers))
    path = cache_dir() / f"{name}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in writers[name]():
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    return str(path)
