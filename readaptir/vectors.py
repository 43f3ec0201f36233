"""The embed and queries stages' output folders: float16 vectors, with their ids.

Layout (float16 halves disk and RAM; the search scores in float32 and rescores its candidates in
float64, exact for float16 vectors)::

    corpus-00000.npy ...   at most ``shard_size`` passage vectors each, in corpus order
    corpus_ids.json        passage ids in corpus order
    info.json              sizes, the encoding asked for and the settings actually used
    queries.npy            vectors of the judged queries (the queries stage's folder)
    query_ids.json         their ids, in queries-file order

``stages.embed.embed`` writes all of them into one folder. The search stage reads the passages one
shard at a time. A long embedding keeps
its finished shards in a work folder first (``prepare_work``, ``save_shard``, ``complete_shard``),
so that a killed run, or the ranks of a run on several GPUs, can pick them up.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from readaptir.artifacts import atomic_file, write_json

INFO_FILE = "info.json"
CORPUS_IDS = "corpus_ids.json"
QUERY_VECTORS = "queries.npy"
QUERY_IDS = "query_ids.json"
WORK_MANIFEST = "work.json"


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


def save_shard(path: Path, vecs: np.ndarray) -> None:
    """A shard file appears whole or not at all (a resumed run trusts the ones it finds)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, vecs)


def complete_shard(path: Path, rows: int) -> bool:
    """Whether ``path`` holds a finished shard of ``rows`` float16 vectors."""
    try:
        vecs = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return vecs.ndim == 2 and vecs.shape[0] == rows and vecs.dtype == np.float16


def prepare_work(folder: Path, identity: dict) -> None:
    """Keep the shards in ``folder`` only if they were made under ``identity`` (shard size,
    corpus size, model files); otherwise start it afresh."""
    folder = Path(folder)
    manifest = folder / WORK_MANIFEST
    if manifest.is_file() and _read_json(manifest) == json.loads(json.dumps(identity)):
        return
    shutil.rmtree(folder, ignore_errors=True)
    write_json(manifest, identity)
