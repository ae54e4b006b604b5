"""The export cache: torch weights exported once (ONNX, INT8 IR) and reused by later runs.

Entries live in `$KAPAO_HOME/exports` (default `~/.cache/kapao/exports`), one folder per key:
the weights' content hash (sha256 of the file, not its name or path), the input-shape policy, the
kapao version, the ONNX opset and graph revision, and for INT8 the calibration images. A changed
file, a new kapao or a new graph layout therefore never reuses a stale entry.

Robustness: an entry is built into a temporary name beside it and renamed into place, so a killed
export leaves no half-written entry under the real name (its temporary files are removed by the
next build); two processes building the same entry take turns on a lock file, and the second
finds the first one's entry; an entry that fails to load (corrupted on disk) is rebuilt once; a
cache folder that cannot be written falls back to a temporary folder for this run, with one line
saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from kapao.errors import KapaoError
from kapao.weights.download import ENV_HOME, cache_dir, sha256_of

T = TypeVar("T")
ONNX_OPSET = 17


@dataclass(frozen=True)
class ExportKey:
    """Everything an exported file depends on besides the code that wrote it."""

    weights_sha256: str
    shape_policy: str  # "dynamic", or "HxW" for a fixed-size graph
    kapao_version: str
    opset: int
    graph_revision: int
    artifact: str  # "onnx-fp32", "openvino-int8", "onnxruntime-int8"
    calibration: str = ""  # digest of the calibration images (INT8 only)

    def folder_name(self) -> str:
        """By content only: the same weights under another name or path share the entry."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.artifact}-{digest}"


def exports_root() -> Path:
    """`$KAPAO_HOME/exports` (beside the weights cache)."""
    return cache_dir().parent / "exports"


def weights_digest(path: Path) -> str:
    """sha256 of a weights file; memoised beside the cache by (path, size, mtime) so that a large
    official checkpoint is not hashed on every run."""
    st = path.stat()
    memo = exports_root() / "digests.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = sha256_of(path)
    known = known if isinstance(known, dict) else {}
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".digests.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


def calibration_digest(files: list[Path]) -> str:
    """Digest of a calibration set: the images' names, sizes and contents."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(sha256_of(f).encode())
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
        return True
    except OSError:
        return False


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on `lock_path` (POSIX flock; without fcntl, no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: builds may race; each still writes atomically
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_artifact(
    key: ExportKey,
    stem: str,
    filename: str,
    build: Callable[[Path], None],
    open_entry: Callable[[Path], T],
    what: str,
    quiet: bool = False,
) -> T:
    """`open_entry(path)` of the cached file for `key`, building it first with `build(path)` when
    it is missing or does not open (build writes `path` itself, atomically, and may write files
    beside it). `what` names the artifact in the one-line messages ("kapao_s_coco as ONNX")."""
    root = exports_root()
    if not _writable(root):
        fallback = Path(tempfile.mkdtemp(prefix="kapao-exports-"))
        _say(f"kapao: the export cache {root} is not writable; building {what} in {fallback} for this run "
             f"(set {ENV_HOME} to a writable folder to keep it)", quiet=False)
        root = fallback
    folder = root / key.folder_name()
    path = folder / filename
    if path.is_file():
        try:
            return open_entry(path)
        except KapaoError as e:
            _say(f"kapao: the cached {what} does not load ({e}); rebuilding it", quiet=False)
    with _locked(root / f"{folder.name}.lock"):
        if path.is_file():  # another process may have built it while we waited
            try:
                return open_entry(path)
            except KapaoError:
                pass
        for stale in [folder, *root.glob(f".{folder.name}.*")]:  # a broken entry, a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp_folder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
        try:
            _say(f"kapao: exporting {what} once (cached in {folder})", quiet)
            build(tmp_folder / filename)
            (tmp_folder / "key.json").write_text(json.dumps({**asdict(key), "built_from": stem}, indent=1))
            os.replace(tmp_folder, folder)
        finally:
            if tmp_folder.exists():
                shutil.rmtree(tmp_folder, ignore_errors=True)
    return open_entry(path)


def _say(line: str, quiet: bool) -> None:
    if not quiet:
        print(line, file=sys.stderr)
