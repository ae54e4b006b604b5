"""Read COCO-format keypoint annotations (COCO `person_keypoints_*.json`, CrowdPose, any K).

One JSON file becomes flat arrays (all persons of all images, with per-image offsets), validated
once: a file that cannot be used at all raises one clear `KapaoError`; a bad image entry or a bad
annotation is skipped and counted in an `AnnotationSummary` (counts + first examples), so a
training run never dies deep inside a worker on one odd record.

Official semantics: crowd regions (`iscrowd=1`) are dropped for training and kept for val
(`keep_crowd`); CrowdPose keypoints are clipped to the image (`clip_keypoints`). Keypoints with
v = 0 are stored as (0, 0, 0).

The parsed arrays are cached in an .npz keyed by a hash of the JSON bytes, the options and the
image files' (name, size, mtime), so a second start skips the JSON parse and the image checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kapao.errors import KapaoError

CACHE_VERSION = 1
CHECK_MODES = ("none", "exists", "header", "decode")
MAX_EXAMPLES = 3

# Reasons a record is skipped, with what they mean (shown by AnnotationSummary).
REASONS = {
    "bad_image_entry": "image entries without a usable id / file_name / width / height",
    "duplicate_image_id": "image entries whose id was already listed",
    "missing_image": "image files not found",
    "unreadable_image": "image files that could not be read",
    "size_mismatch": "images whose real size differs from the JSON width/height",
    "unknown_image_id": "annotations whose image_id is not in 'images'",
    "on_skipped_image": "annotations of skipped images",
    "wrong_keypoint_count": "annotations with another number of keypoints",
    "bad_keypoints": "annotations with missing or non-numeric keypoints",
    "bad_visibility": "annotations with visibility flags other than 0, 1, 2",
    "bad_box": "annotations with a missing or non-numeric bbox",
    "empty_box": "annotations with a zero or negative box width or height",
}


@dataclass
class AnnotationSummary:
    """What was read from one annotation file and what was skipped (and why)."""

    source: str
    images_listed: int = 0
    images_kept: int = 0
    annotations_listed: int = 0
    persons_kept: int = 0
    crowd_skipped: int = 0
    visible_keypoints: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    from_cache: bool = False

    def add(self, reason: str, message: str, count: int = 1) -> None:
        """Count `count` records skipped for `reason`; keep the first few messages as examples."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if message and len(ex) < MAX_EXAMPLES:
            ex.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        """Human-readable report: one headline, then one line per skip reason with an example."""
        head = (f"{self.source}: {self.images_kept}/{self.images_listed} images, {self.persons_kept} persons "
                f"({self.visible_keypoints} visible keypoints) from {self.annotations_listed} annotations")
        if self.crowd_skipped:
            head += f", {self.crowd_skipped} crowd regions left out"
        if self.from_cache:
            head += " [cache]"
        out = [head]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            ex = self.examples.get(reason, [])
            out.append(f"  skipped {n} {REASONS.get(reason, reason)}" + (f", e.g. {ex[0]}" if ex else ""))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass(frozen=True)
class ImageAnnotations:
    """The persons of one image (n of them, K keypoints each), in the JSON's annotation order."""

    image_id: int
    file: Path
    height: int
    width: int
    boxes: np.ndarray  # (n, 4) float64 COCO xywh in pixels (top-left x, top-left y, w, h)
    keypoints: np.ndarray  # (n, K, 3) float64 (x, y, v) in pixels; v in {0, 1, 2}
    iscrowd: np.ndarray  # (n,) bool
    ann_ids: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def stem(self) -> str:
        return self.file.stem


@dataclass
class KeypointAnnotations:
    """All images of one annotation file as flat arrays; `ann[i]` is image i's `ImageAnnotations`.

    Persons of image i are rows `offsets[i]:offsets[i+1]` of boxes / keypoints / iscrowd / ann_ids.
    """

    json_path: Path
    image_dir: Path | None
    keypoint_names: tuple[str, ...]
    image_ids: np.ndarray  # (N,) int64
    files: np.ndarray  # (N,) str, file names relative to image_dir
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (N + 1,) int64
    boxes: np.ndarray  # (M, 4) float64
    keypoints: np.ndarray  # (M, K, 3) float64
    iscrowd: np.ndarray  # (M,) bool
    ann_ids: np.ndarray  # (M,) int64
    summary: AnnotationSummary

    @property
    def num_keypoints(self) -> int:
        return self.keypoints.shape[1]

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> Path:
        name = str(self.files[i])
        return self.image_dir / name if self.image_dir is not None else Path(name)

    def __getitem__(self, i: int) -> ImageAnnotations:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return ImageAnnotations(
            image_id=int(self.image_ids[i]),
            file=self.path(i),
            height=int(self.heights[i]),
            width=int(self.widths[i]),
            boxes=self.boxes[s:e],
            keypoints=self.keypoints[s:e],
            iscrowd=self.iscrowd[s:e],
            ann_ids=self.ann_ids[s:e],
        )

    def __iter__(self) -> Iterator[ImageAnnotations]:
        return (self[i] for i in range(len(self)))


# ----------------------------------------------------------------------------------------------
# Image headers: size without decoding


def image_size_from_header(path: Path) -> tuple[int, int] | None:
    """(height, width) read from a PNG or JPEG header (a few hundred bytes), None for other formats.
    Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
            w, h = struct.unpack(">II", head[16:24])
            return int(h), int(w)
        if head[:2] != b"\xff\xd8":
            return None
        f.seek(2)
        while True:
            b = f.read(1)
            while b and b != b"\xff":
                b = f.read(1)
            while b == b"\xff":  # fill bytes
                b = f.read(1)
            if not b:
                return None
            marker = b[0]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                continue
            seg = f.read(2)
            if len(seg) < 2:
                return None
            length = struct.unpack(">H", seg)[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                sof = f.read(5)
                if len(sof) < 5:
                    return None
                h, w = struct.unpack(">HH", sof[1:5])
                return int(h), int(w)
            f.seek(length - 2, os.SEEK_CUR)


def _decoded_size(path: Path) -> tuple[int, int] | None:
    import cv2  # only when decoding is asked for

    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if im is None else (int(im.shape[0]), int(im.shape[1]))


# ----------------------------------------------------------------------------------------------
# Parsing


def _keypoint_names(path: Path, data: dict[str, Any], k: int) -> tuple[str, ...]:
    """Names from the categories that declare keypoints; a file for another K is an error."""
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict) and isinstance(c.get("keypoints"), list)]
    if not cats:
        return ()
    counts = sorted({len(c["keypoints"]) for c in cats})
    if k not in counts:
        raise KapaoError(
            f"{path}: its categories have {'/'.join(map(str, counts))} keypoints but the keypoint schema has {k}; "
            "use the data YAML whose 'keypoints' match this file"
        )
    return tuple(str(n) for n in next(c for c in cats if len(c["keypoints"]) == k)["keypoints"])


def _positive_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int) and v > 0:
        return v
    if isinstance(v, float) and v.is_integer() and v > 0:
        return int(v)
    return None


def _to_float_rows(rows: list[Any], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of numbers -> ((n, width) float64, (n,) ok). Rows that are not numbers get ok=False."""
    n = len(rows)
    try:
        arr = np.array(rows, dtype=np.float64).reshape(n, width)
        return arr, np.isfinite(arr).all(1)
    except (TypeError, ValueError):
        arr = np.zeros((n, width), np.float64)
        ok = np.zeros(n, bool)
        for i, r in enumerate(rows):
            try:
                arr[i] = np.asarray(r, dtype=np.float64)
                ok[i] = bool(np.isfinite(arr[i]).all())
            except (TypeError, ValueError):
                pass
        return arr, ok


def _parse(path: Path, data: dict[str, Any], image_dir: Path | None, k: int, check_images: str) -> dict[str, Any]:
    """Validate and flatten; returns the arrays (crowd included, no clipping) and the summary."""
    summary = AnnotationSummary(source=str(path))
    images = data["images"]
    anns = data["annotations"]
    summary.images_listed = len(images)
    summary.annotations_listed = len(anns)

    # Images, in JSON order: entry checks first, then the file checks (in parallel: I/O bound).
    seen: set[int] = set()
    entries: list[tuple[int, str, int, int]] = []
    skipped_ids: set[int] = set()
    for entry in images:
        if not isinstance(entry, dict):
            summary.add("bad_image_entry", f"image entry {str(entry)[:60]!r} is not an object")
            continue
        iid, name = entry.get("id"), entry.get("file_name")
        h, w = _positive_int(entry.get("height")), _positive_int(entry.get("width"))
        if isinstance(iid, bool) or not isinstance(iid, int) or not isinstance(name, str) or not name or not h or not w:
            summary.add("bad_image_entry", f"image {iid!r} ({name!r}): needs an int id, a file_name and width/height > 0")
            if isinstance(iid, int) and not isinstance(iid, bool):
                skipped_ids.add(iid)
            continue
        if iid in seen or iid in skipped_ids:
            summary.add("duplicate_image_id", f"image id {iid} ({name}) is listed twice; the first entry is used")
            continue
        seen.add(iid)
        entries.append((iid, name, h, w))
    if image_dir is not None and check_images != "none":
        def check(e: tuple[int, str, int, int]) -> tuple[str, str] | None:
            return _check_image(image_dir / e[1], e[2], e[3], check_images)

        workers = min(8, (os.cpu_count() or 1) * 2) if len(entries) > 256 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                problems = list(pool.map(check, entries, chunksize=64))
        else:
            problems = [check(e) for e in entries]
        for e, problem in zip(entries, problems):
            if problem is not None:
                summary.add(*problem)
                skipped_ids.add(e[0])
        entries = [e for e, problem in zip(entries, problems) if problem is None]
    img_index = {e[0]: i for i, e in enumerate(entries)}
    ids = [e[0] for e in entries]
    files = [e[1] for e in entries]
    hs = [e[2] for e in entries]
    ws = [e[3] for e in entries]

    # Annotations: cheap structural checks per record, then vectorized value checks.
    cand, cand_img, kp_rows, box_rows, cand_ids, cand_crowd = [], [], [], [], [], []
    for a in anns:
        if not isinstance(a, dict):
            summary.add("bad_keypoints", f"annotation {str(a)[:60]!r} is not an object")
            continue
        aid, iid = a.get("id"), a.get("image_id")
        where = f"annotation {aid} (image {iid})"
        if iid not in img_index:
            if iid in skipped_ids:
                summary.add("on_skipped_image", f"{where}: its image was skipped")
            else:
                summary.add("unknown_image_id", f"{where}: image_id is not in 'images'")
            continue
        kps = a.get("keypoints")
        if not isinstance(kps, list):
            summary.add("bad_keypoints", f"{where}: no 'keypoints' list")
            continue
        if len(kps) != 3 * k:
            summary.add("wrong_keypoint_count", f"{where}: {len(kps)} keypoint values, expected {3 * k} ({k} x 3)")
            continue
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            summary.add("bad_box", f"{where}: bbox {str(box)[:40]} is not [x, y, w, h]")
            continue
        cand.append(a)
        cand_img.append(img_index[iid])
        cand_ids.append(_int_or(aid, -1))
        cand_crowd.append(bool(a.get("iscrowd", 0)))
        kp_rows.append(kps)
        box_rows.append(box)

    kp, kp_ok = _to_float_rows(kp_rows, 3 * k)
    box, box_ok = _to_float_rows(box_rows, 4)
    kp = kp.reshape(-1, k, 3)
    vis_ok = np.isin(kp[..., 2], (0.0, 1.0, 2.0)).all(1)
    size_ok = (box[:, 2] > 0) & (box[:, 3] > 0)
    keep = np.ones(len(cand), bool)
    for ok, reason, what in (
        (kp_ok, "bad_keypoints", "non-numeric or non-finite keypoints"),
        (vis_ok, "bad_visibility", "visibility flags must be 0, 1 or 2"),
        (box_ok, "bad_box", "non-numeric or non-finite bbox"),
        (size_ok, "empty_box", "bbox width and height must be > 0"),
    ):
        bad = np.flatnonzero(keep & ~ok)
        for j in bad[:MAX_EXAMPLES]:
            summary.add(reason, f"annotation {cand[j].get('id')} (image {cand[j].get('image_id')}): {what}")
        if len(bad) > MAX_EXAMPLES:
            summary.add(reason, "", count=len(bad) - MAX_EXAMPLES)
        keep &= ok

    idx = np.flatnonzero(keep)
    img_of = np.asarray(cand_img, np.int64)[idx] if len(idx) else np.zeros(0, np.int64)
    order = np.argsort(img_of, kind="stable")  # group by image, JSON order within an image
    idx, img_of = idx[order], img_of[order]
    kp = kp[idx]
    kp[kp[..., 2] == 0] = 0.0  # unlabelled keypoints are (0, 0, 0)
    counts = np.bincount(img_of, minlength=len(ids))
    ann_ids = np.asarray(cand_ids, np.int64).reshape(-1)[idx]
    iscrowd = np.asarray(cand_crowd, bool).reshape(-1)[idx]
    summary.images_kept = len(ids)
    return {
        "image_ids": np.asarray(ids, np.int64),
        "files": np.asarray(files, dtype=str) if files else np.zeros(0, "<U1"),
        "heights": np.asarray(hs, np.int64),
        "widths": np.asarray(ws, np.int64),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "boxes": box[idx].reshape(-1, 4),
        "keypoints": kp.reshape(-1, k, 3),
        "iscrowd": iscrowd,
        "ann_ids": ann_ids,
        "summary": summary,
    }


def _int_or(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _check_image(p: Path, h: int, w: int, mode: str) -> tuple[str, str] | None:
    """(reason, message) when the image file is unusable, else None."""
    if not p.is_file():
        return "missing_image", f"{p} not found"
    if mode == "exists":
        return None
    try:
        size = _decoded_size(p) if mode == "decode" else image_size_from_header(p)
    except OSError as e:
        return "unreadable_image", f"{p}: {e}"
    if size is None:
        return ("unreadable_image", f"{p}: cv2 cannot decode it") if mode == "decode" else None
    if size != (h, w):
        return "size_mismatch", f"{p} is {size[1]}x{size[0]} but the JSON says {w}x{h}"
    return None


# ----------------------------------------------------------------------------------------------
# Cache


def _stat_signature(image_dir: Path | None, files: np.ndarray, check_images: str) -> str:
    """Hash of (name, size, mtime) of the image files, so added/removed/changed images rebuild."""
    h = hashlib.blake2b(digest_size=16)
    if image_dir is None or check_images == "none":
        return "-"
    for name in files.tolist():
        try:
            st = os.stat(image_dir / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()


def _cache_file(json_path: Path, opts: str, cache_dir: Path | None) -> Path:
    tag = hashlib.blake2b(f"{json_path.resolve()}|{opts}".encode(), digest_size=6).hexdigest()
    name = f"{json_path.stem}.{tag}.kapao-cache.npz"
    return (cache_dir or json_path.parent) / name


def _write_cache(path: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Atomic write (temp file + rename); False when the directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as its JSON
        os.replace(tmp, path)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


def _read_cache(path: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                return None
            arrays = {k: z[k] for k in z.files if k != "meta"}
        return arrays, meta
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # unreadable or stale cache: rebuild


def default_cache_dir() -> Path:
    """Where annotation caches go unless a cache_dir is given."""
    return Path(os.environ.get("KAPAO_CACHE", Path.home() / ".cache" / "kapao")) / "annotations"


# ----------------------------------------------------------------------------------------------
# Public entry point


def load_keypoint_annotations(
    json_path: str | Path,
    image_dir: str | Path | None,
    num_keypoints: int,
    *,
    keep_crowd: bool = False,
    clip_keypoints: bool = False,
    check_images: str = "header",
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> KeypointAnnotations:
    """Read and validate a COCO-format keypoint JSON with `num_keypoints` keypoints per person.

    image_dir:      folder the `file_name`s are relative to (None: no file checks, names kept as is).
    keep_crowd:     keep `iscrowd=1` regions (official val behaviour); False drops them (training).
    clip_keypoints: clip keypoint x to [0, W] and y to [0, H] (the official CrowdPose behaviour).
    check_images:   'none', 'exists' (stat), 'header' (size from the PNG/JPEG header, default) or
                    'decode' (cv2.imread, slow): missing, unreadable or wrongly sized images are skipped.
    cache:          reuse / write `<json stem>.<tag>.kapao-cache.npz` in `cache_dir` (default
                    `default_cache_dir()`, i.e. $KAPAO_CACHE or ~/.cache/kapao/annotations).
    """
    if check_images not in CHECK_MODES:
        raise KapaoError(f"check_images={check_images!r}; use one of {', '.join(CHECK_MODES)}")
    if num_keypoints < 1:
        raise KapaoError(f"num_keypoints={num_keypoints}; a keypoint schema has at least one keypoint")
    json_path = Path(json_path)
    img_dir = Path(image_dir) if image_dir is not None else None
    if img_dir is not None and check_images != "none" and not img_dir.is_dir():
        raise KapaoError(f"{img_dir}: image folder not found (images of {json_path}); check the data YAML's *_images")
    if not json_path.is_file():
        raise KapaoError(f"{json_path}: annotation file not found; check the path (or the data YAML's *_annotations)")

    opts = f"v{CACHE_VERSION}|k={num_keypoints}|check={check_images}|dir={img_dir.resolve() if img_dir else '-'}"
    loaded = None
    cache_paths: list[Path] = []
    raw: bytes | None = None
    key = ""
    if cache:
        raw = json_path.read_bytes()
        key = hashlib.blake2b(raw, digest_size=20).hexdigest() + "|" + opts
        # the user's cache folder by default: dataset folders may be shared or read-only
        dirs = [Path(cache_dir) if cache_dir is not None else default_cache_dir()]
        cache_paths = [_cache_file(json_path, opts, d if d != json_path.parent else None) for d in dirs]
        for cp in cache_paths:
            if cp.is_file():
                hit = _read_cache(cp, key)
                if hit is not None and hit[1].get("images") == _stat_signature(img_dir, hit[0]["files"], check_images):
                    loaded = hit
                    break

    if loaded is not None:
        arrays, meta = loaded
        summary = AnnotationSummary(**meta["summary"])
        summary.from_cache = True
        names = tuple(meta["keypoint_names"])
    else:
        if raw is None:
            raw = json_path.read_bytes()
        data = _decode_json(json_path, raw)
        names = _keypoint_names(json_path, data, num_keypoints)
        parsed = _parse(json_path, data, img_dir, num_keypoints, check_images)
        summary = parsed.pop("summary")
        arrays = parsed
        if cache:
            meta = {
                "key": key,
                "images": _stat_signature(img_dir, arrays["files"], check_images),
                "keypoint_names": list(names),
                "summary": {k: v for k, v in asdict(summary).items() if k != "from_cache"},
            }
            for cp in cache_paths:
                if _write_cache(cp, arrays, meta):
                    break

    return _finish(json_path, img_dir, names, arrays, summary, keep_crowd, clip_keypoints)


def _decode_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KapaoError(f"{path}: not valid JSON ({e}); re-download or repair the file") from None
    if not isinstance(data, dict):
        raise KapaoError(f"{path}: expected a COCO-format object with 'images' and 'annotations' at the top level")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise KapaoError(f"{path}: '{key}' is missing or not a list; this is not a COCO-format annotation file")
    return data


def _finish(
    json_path: Path,
    img_dir: Path | None,
    names: tuple[str, ...],
    a: dict[str, Any],
    summary: AnnotationSummary,
    keep_crowd: bool,
    clip_keypoints: bool,
) -> KeypointAnnotations:
    """Apply the split semantics (crowd, clipping) to the cached/parsed arrays."""
    boxes, kps, crowd, ann_ids, offsets = a["boxes"], a["keypoints"].copy(), a["iscrowd"], a["ann_ids"], a["offsets"]
    if not keep_crowd and crowd.any():
        keep = ~crowd
        img_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        counts = np.bincount(img_of[keep], minlength=len(offsets) - 1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        summary.crowd_skipped = int(crowd.sum())
        boxes, kps, crowd, ann_ids = boxes[keep], kps[keep], crowd[keep], ann_ids[keep]
    if clip_keypoints and len(kps):
        img_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        kps[..., 0] = np.clip(kps[..., 0], 0, a["widths"][img_of][:, None])
        kps[..., 1] = np.clip(kps[..., 1], 0, a["heights"][img_of][:, None])
    summary.persons_kept = len(boxes)
    summary.visible_keypoints = int((kps[..., 2] > 0).sum())
    return KeypointAnnotations(
        json_path=json_path,
        image_dir=img_dir,
        keypoint_names=names,
        image_ids=a["image_ids"],
        files=a["files"],
        heights=a["heights"],
        widths=a["widths"],
        offsets=offsets,
        boxes=boxes,
        keypoints=kps,
        iscrowd=crowd,
        ann_ids=ann_ids,
        summary=summary,
    )
