"""The embed stage's output folder: float16 vectors in shards, with their ids.

Layout (float16 halves disk and RAM; scoring happens in float32 later)::

    corpus-00000.npy ...   at most ``shard_size`` passage vectors each, in corpus order
    corpus_ids.json        passage ids in corpus order
    queries.npy            vectors of the judged queries
    query_ids.json         their ids, in queries-file order
    info.json              sizes, the encoding asked for and the settings actually used

The embed stage writes it, the search stage reads it one shard at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

INFO_FILE = "info.json"
CORPUS_IDS = "corpus_ids.json"
QUERY_VECTORS = "queries.npy"
QUERY_IDS = "query_ids.json"


def shard_file(folder: Path, shard: int) -> Path:
    return Path(folder) / f"corpus-{shard:05d}.npy"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_embeddings(folder: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(passage ids, float16 vectors) for each corpus shard of an embed folder, in order."""
    folder = Path(folder)
    info = _read_json(folder / INFO_FILE)
    ids = _read_json(folder / CORPUS_IDS)
    offset = 0
    for shard in range(info["shards"]):
        vecs = np.load(shard_file(folder, shard))
        yield ids[offset : offset + len(vecs)], vecs
        offset += len(vecs)
    if offset != len(ids):
        raise ValueError(f"{folder}: shards hold {offset} vectors but {CORPUS_IDS} has {len(ids)}")


def load_queries_embeddings(folder: Path) -> tuple[list[str], np.ndarray]:
    """(query ids, float16 vectors) of an embed folder."""
    folder = Path(folder)
    ids = _read_json(folder / QUERY_IDS)
    vecs = np.load(folder / QUERY_VECTORS)
    if len(ids) != len(vecs):
        raise ValueError(f"{folder}: {len(vecs)} query vectors but {len(ids)} query ids")
    return ids, vecs
