"""Fetch a BEIR-format collection: a zip archive downloaded (or copied) and unpacked.

The public BEIR archives unpack to ``<name>/corpus.jsonl``, ``queries.jsonl``, ``qrels/``; the
folder holding ``corpus.jsonl`` becomes ``out/<name>``, once it holds the three. The archive's
sha256 is recorded, and checked when the recipe pins one.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import lzma
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tqdm.auto import tqdm

from readaptir.artifacts import write_json
from readaptir.corpus import has_passages
from readaptir.fingerprint import project_path

LOG = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
CHUNK = 1 << 20
TIMEOUT = 60  # seconds without an answer before a download fails (a stalled server)
# what unpacking an archive may fail with: a damaged one (its index, a CRC, a compressed stream),
# a member name that is not UTF-8 though flagged so, a compression method or an encryption
# zipfile lacks; and an OSError without an errno (a damaged bz2 stream), not one with one (a full
# disk, which ``atomic_output`` names)
UNPACK_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    UnicodeDecodeError,
    NotImplementedError,
    RuntimeError,
)


def beir_url(name: str) -> str:
    return BEIR_URL.format(name=name)


def file_url_path(url: str) -> str | None:
    """The path a ``file:`` URL names, as written (a relative one lies under the project root);
    None for another scheme."""
    return url2pathname(urlparse(url).path) if urlparse(url).scheme == "file" else None


def _opened(url: str, root: Path | None) -> str:
    """What to open for ``url``: a relative ``file:`` path lies under the project root, where the
    build read it, whatever the working folder of the stage."""
    path = file_url_path(url)
    if root is None or path is None:
        return url
    return project_path(root, path).absolute().as_uri()


def _download(url: str, target: Path, root: Path | None = None) -> str:
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(_opened(url, root), timeout=TIMEOUT)
    except urllib.error.URLError as err:  # a mistyped BEIR name is a 404 here
        detail = err if isinstance(err, urllib.error.HTTPError) else err.reason
        raise ValueError(f"{url}: {detail}") from None
    except (OSError, http.client.HTTPException) as err:  # no answer, or a closed connection
        raise ValueError(f"{url}: {type(err).__name__}: {err}") from None
    received = 0
    with response, target.open("wb") as handle:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name) as bar:
            while True:
                try:  # the writes' errors (a full disk) are left as they are
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise ValueError(
                        f"{url}: the download failed after {received} bytes: "
                        f"{type(err).__name__}: {err}"
                    ) from None
                if not block:
                    break
                handle.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise ValueError(f"{url}: received {received} of {total} bytes: the connection was cut")
    return digest.hexdigest()


def _unpack(url: str, archive: Path, into: Path) -> None:
    """Unpack ``archive`` into ``into``, if its declared size fits the free space."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            size = sum(member.file_size for member in zipped.infolist())
            into.mkdir()
            free = shutil.disk_usage(into).free
            if size > free:
                raise ValueError(
                    f"{url} unpacks to {size / 1e9:.1f} GB and {into} has {free / 1e9:.1f} GB free"
                )
            zipped.extractall(into)
    except (*UNPACK_ERRORS, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a full disk (ENOSPC), named by ``atomic_output``; bz2's damage has no errno
        raise ValueError(
            f"{url} is not a zip archive that unpacks: {type(err).__name__}: {err}"
        ) from None


def _collection(url: str, unpacked: Path) -> Path:
    """The one folder of ``unpacked`` holding a BEIR collection: corpus, queries and judgments."""
    found = sorted(p.parent for p in unpacked.rglob("corpus.jsonl") if p.is_file())
    if not found:
        raise ValueError(f"{url}: the archive has no corpus.jsonl")
    if len(found) > 1:
        folders = ", ".join(str(p.relative_to(unpacked)) for p in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise ValueError(
            f"{url}: the archive holds {len(found)} collections ({folders}{more}); a recipe's "
            "corpus is one: unpack it and give the folder as `corpus: {path: ...}`"
        )
    folder = found[0]
    missing = [
        name
        for name, present in (
            ("queries.jsonl", (folder / "queries.jsonl").is_file()),
            ("qrels/*.tsv", any((folder / "qrels").glob("*.tsv"))),
        )
        if not present
    ]
    if missing:
        where = folder.relative_to(unpacked)
        raise ValueError(f"{url}: {where} has corpus.jsonl but no {' and no '.join(missing)}")
    if not has_passages(folder / "corpus.jsonl"):
        raise ValueError(f"{url}: its corpus.jsonl is empty (no passages)")
    return folder


def fetch(
    url: str, name: str, out: Path, *, sha256: str | None = None, root: Path | None = None
) -> dict:
    """Download ``url`` (http(s) or file; a relative file path under ``root``), unpack it, and
    leave the collection in ``out/name``."""
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        archive = Path(scratch) / "archive.zip"
        LOG.info("fetching %s", url)
        got = _download(url, archive, root)
        if sha256 and got != sha256.lower():
            raise ValueError(
                f"{url}: sha256 is {got}, not {sha256} (the recipe's pin, or a local archive's "
                "content at `readaptir build`)"
            )
        _unpack(url, archive, Path(scratch) / "unpacked")
        shutil.move(str(_collection(url, Path(scratch) / "unpacked")), out / name)
    info = {"url": url, "sha256": got, "name": name}
    write_json(out / "fetch.json", info)
    return info
