"""Fetch a BEIR-format collection: a zip archive downloaded (or copied) and unpacked.

The public BEIR archives unpack to ``<name>/corpus.jsonl``, ``queries.jsonl``, ``qrels/``; the
folder holding ``corpus.jsonl`` becomes ``out/<name>``. The archive's sha256 is recorded, and
checked when the recipe pins one.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from readaptir.artifacts import write_json

LOG = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
CHUNK = 1 << 20
TIMEOUT = 60  # seconds without an answer before a download fails (a stalled server)


def beir_url(name: str) -> str:
    return BEIR_URL.format(name=name)


def _download(url: str, target: Path) -> str:
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.URLError as err:  # a mistyped BEIR name is a 404 here
        detail = err if isinstance(err, urllib.error.HTTPError) else err.reason
        raise ValueError(f"{url}: {detail}") from None
    with response, target.open("wb") as handle:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name) as bar:
            while block := response.read(CHUNK):
                handle.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


def fetch(url: str, name: str, out: Path, *, sha256: str | None = None) -> dict:
    """Download ``url`` (http(s) or file), unpack it, and leave the collection in ``out/name``."""
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        archive = Path(scratch) / "archive.zip"
        LOG.info("fetching %s", url)
        got = _download(url, archive)
        if sha256 and got != sha256.lower():
            raise ValueError(
                f"{url}: sha256 is {got}, not {sha256} (the recipe's pin, or a local archive's "
                "content at `readaptir build`)"
            )
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(Path(scratch) / "unpacked")
        except zipfile.BadZipFile:
            raise ValueError(f"{url} is not a zip archive") from None
        found = sorted(Path(scratch, "unpacked").rglob("corpus.jsonl"), key=lambda p: len(p.parts))
        if not found:
            raise ValueError(f"{url}: the archive has no corpus.jsonl")
        shutil.move(str(found[0].parent), out / name)
    info = {"url": url, "sha256": got, "name": name}
    write_json(out / "fetch.json", info)
    return info
