"""Registered weights on disk: a cache directory, downloads with a progress bar, verification.

The cache is `$KAPAO_HOME/weights` (default `~/.cache/kapao/weights`). A download goes to a
temporary file in that directory and is renamed into place only after its size and sha256 (when
known) check out, so the cache never holds a partial or unverified file, even after Ctrl-C.
The URL base can be replaced (`base_url=` or `$KAPAO_WEIGHTS_URL`): the file is then fetched from
`<base>/<name>.pt`, e.g. from a mirror or a local server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from kapao.errors import KapaoError
from kapao.weights.registry import REGISTRY, RegisteredWeights, get, looks_like_name
from kapao.weights.shipped import shipped_weights

ENV_HOME = "KAPAO_HOME"
ENV_URL = "KAPAO_WEIGHTS_URL"
_CHUNK = 1 << 20


def cache_dir(root: str | Path | None = None) -> Path:
    """Where registered weights are kept: `<root or $KAPAO_HOME or ~/.cache/kapao>/weights`."""
    base = root or os.environ.get(ENV_HOME) or Path("~/.cache/kapao")
    return Path(base).expanduser() / "weights"


def weights_url(entry: RegisteredWeights, base_url: str | None = None) -> str:
    base = base_url or os.environ.get(ENV_URL)
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise KapaoError if the file's sha256 differs from `expected` (hex)."""
    try:
        got = sha256_of(path)
    except OSError as e:
        raise KapaoError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if got != expected.lower():
        raise KapaoError(f"{what}: sha256 mismatch (expected {expected.lower()}, got {got}); the file is corrupt "
                         "or not the published one: download it again")  # fmt: skip


def fetch(
    name: str | RegisteredWeights,
    cache: str | Path | None = None,
    base_url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Local path of registered weights, downloading them into the cache if missing.

    `sha256` overrides the registry's checksum (both are verified on download; an explicit one is
    also verified on a cached file). Raises KapaoError for unknown names and failed downloads.
    """
    entry = name if isinstance(name, RegisteredWeights) else get(name)
    expected = sha256 or entry.sha256
    target = cache_dir(cache) / entry.filename
    if target.is_file():
        if entry.size is not None and target.stat().st_size != entry.size:
            raise KapaoError(
                f"{target}: cached file has {target.stat().st_size} bytes, expected {entry.size}; "
                "delete it to download again"
            )
        if sha256:
            verify_sha256(target, sha256, str(target))
        return target
    url = weights_url(entry, base_url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise KapaoError(f"{target.parent}: cannot write the weights cache ({e.strerror}); set ${ENV_HOME}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(url, out, entry, progress)
        if entry.size is not None and tmp.stat().st_size != entry.size:
            raise KapaoError(f"{url}: downloaded {tmp.stat().st_size} bytes, expected {entry.size}; try again")
        if expected:
            verify_sha256(tmp, expected, url)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _download(url: str, out, entry: RegisteredWeights, progress: bool) -> None:
    hint = f"download it by hand from {entry.page_url} into {cache_dir()}" if url == entry.url else f"check ${ENV_URL}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            if "text/html" in (resp.headers.get("Content-Type") or ""):
                raise KapaoError(f"{url}: the server sent a web page instead of {entry.filename}; {hint}")
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.filename,
                      disable=not progress, file=sys.stderr) as bar:  # fmt: skip
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise KapaoError(f"{url}: HTTP {e.code} {e.reason} while downloading {entry.name}; {hint}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, short reads
        reason = getattr(e, "reason", e)
        raise KapaoError(f"{url}: cannot download {entry.name} ({reason}); check the network or {hint}") from None
    if total is not None and received != total:
        raise KapaoError(f"{url}: download of {entry.name} stopped after {received} of {total} bytes; try again")


def resolve(
    path_or_name: str | Path,
    cache: str | Path | None = None,
    base_url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> tuple[Path, RegisteredWeights | None]:
    """A local file as is (sha256-checked if given), or a registry name fetched into the cache."""
    p = Path(path_or_name).expanduser()
    shipped = shipped_weights(str(path_or_name)) if not p.exists() else None
    if shipped is not None:
        return shipped, None
    if p.exists():
        if sha256 and p.is_file():
            verify_sha256(p, sha256, str(p))
        return p, None
    if isinstance(path_or_name, str) and looks_like_name(path_or_name):
        entry = get(path_or_name)
        return fetch(entry, cache=cache, base_url=base_url, sha256=sha256, progress=progress), entry
    raise KapaoError(f"{p}: file not found; check the path or use a registered name ({', '.join(REGISTRY)})")
