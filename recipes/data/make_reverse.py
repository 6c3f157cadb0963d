"""Write the quickstart task: reverse a short random string (prompt/completion jsonl).

``python recipes/data/make_reverse.py`` regenerates ``reverse/train.jsonl`` and
``reverse/validation.jsonl`` deterministically (fixed seed); ``datasets`` names the
splits after the file names, so a recipe sets ``data.path: recipes/data/reverse`` and
``data.eval_split: validation``. A record reads
``{"prompt": "reverse kqbfz =", "completion": " zfbqk"}``.

Why this task: a transformer learns reversal by attending to a position computed from
the prompt's length, which a tiny model picks up in a few CPU minutes, and whether it
did is unambiguous (exact match). Chance level: a model that knows the format but
guesses the letters gets a string of length L right with probability 26**-L, so
exact-match accuracy at chance is below 0.2% (L >= 2); see :mod:`pp_ext.training.accuracy`.
Eval strings never occur in the training file.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).resolve().parent / "reverse"
MIN_LEN, MAX_LEN = 2, 6
TRAIN, EVAL, SEED = 6000, 300, 0


def record(text: str) -> dict[str, str]:
    return {"prompt": f"reverse {text} =", "completion": f" {text[::-1]}"}


def strings(count: int, rng: random.Random, exclude: set[str]) -> list[str]:
    """``count`` distinct random lowercase strings, none of them in ``exclude``."""
    out: dict[str, None] = {}
    while len(out) < count:
        text = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
        if text not in exclude:
            out[text] = None
    return list(out)


def main(out: Path = OUT) -> None:
    rng = random.Random(SEED)
    evals = strings(EVAL, rng, set())
    out.mkdir(exist_ok=True)
    for name, texts in (("train", strings(TRAIN, rng, set(evals))), ("validation", evals)):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(record(text)) + "\n" for text in texts)


if __name__ == "__main__":
    main()
