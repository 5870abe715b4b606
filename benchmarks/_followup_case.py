"""Shared set-up of the follow-up benchmarks (`followup_ab.py`, `followup_stages.py`, `followup_cold.py`):
their common options and the NIAH document `followup.py` uses, encoded once or read back from --encoding."""
from __future__ import annotations

import argparse
import os
import tempfile


def parser(doc: str) -> argparse.ArgumentParser:
    """--tokens, --repeats and --encoding; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--encoding", default=None, help="encoding directory to keep and reuse (default: a temporary one)")
    return p


def niah_encoding(tokens: int, encoding: str | None, prefix: str):
    """(pc, cfg, case, encoded): the bundled model, 12 new tokens, the NIAH case of `tokens` tokens
    (depth 0.4, seed 5, natural question) and its encoding, read from `encoding` where one is, else made
    there (or in a new temporary directory named `prefix`...)."""
    from parallelcomp_triton import ParallelComp, ParallelCompConfig
    from parallelcomp_triton.tasks import niah_case

    pc = ParallelComp.from_pretrained(None)
    cfg = ParallelCompConfig(max_new_tokens=12)
    case = niah_case(pc.tokenizer, tokens, depth=0.4, seed=5, question="natural")
    path = encoding or os.path.join(tempfile.mkdtemp(prefix=prefix), "enc")
    if os.path.exists(os.path.join(path, "meta.json")):
        return pc, cfg, case, pc.load_encoded(path)
    return pc, cfg, case, pc.encode(case.context, config=cfg, path=path)
