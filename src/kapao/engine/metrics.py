"""OKS keypoint AP: COCO (pycocotools), CrowdPose (xtcocotools) or any keypoint schema.

`evaluate_keypoints` is the one place that scores COCO-format keypoint results, so `kapao val`,
training and a user running the reference tool by hand on the saved results JSON all get the same
numbers. The reference tools do the arithmetic; this module validates the inputs (one-line
`KapaoError`s instead of asserts deep inside pycocotools), copies them (the tools write into the
dicts they are given), handles the cases the tools crash on (no detections) and names the stats.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kapao.errors import KapaoError
from kapao.io.writers import write_json
from kapao.schema import KeypointSchema

# Names of the stats in the order each reference tool's summarize() returns them.
COCO_STATS = ("AP", "AP50", "AP75", "AP_medium", "AP_large", "AR", "AR50", "AR75", "AR_medium", "AR_large")
# CrowdPose: "easy/medium/hard" are crowd-index groups of images, not object sizes.
CROWDPOSE_STATS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")

# What `evaluator=` accepts, per protocol (the schema's `evaluator` field); the first is the default.
EVALUATORS = {"coco": ("pycocotools", "faster"), "crowdpose": ("xtcocotools",)}
_TOOL_NAMES = {"pycocotools": "pycocotools", "faster": "faster-coco-eval", "xtcocotools": "xtcocotools"}

# pycocotools' default sigmas (its Params.kpt_oks_sigmas), used for a 17-keypoint schema without any.
COCO_SIGMAS_TENTHS = (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07,
                      0.87, 0.87, 0.89, 0.89)


@dataclass(frozen=True)
class KeypointMetrics:
    """The summary stats of one evaluation, named as the reference tool orders them.

    A stat of -1 means undefined (as pycocotools reports it): no ground truth in that area range or
    crowd-index group.
    """

    protocol: str  # 'coco' or 'crowdpose'
    evaluator: str  # the tool that computed the numbers: pycocotools, xtcocotools or faster-coco-eval
    stats: dict[str, float]
    num_images: int  # images evaluated
    num_results: int  # detections scored (in the evaluated images)
    sigmas: tuple[float, ...] = ()
    seconds: float = 0.0  # the evaluator's own time (evaluate + accumulate + summarize)
    notes: tuple[str, ...] = field(default=())
    backend: str = ""  # the runtime that made the predictions, when the caller knows it

    @property
    def ap(self) -> float:
        """OKS AP@[.5:.95], the headline number (and the training fitness)."""
        return self.stats["AP"]

    @property
    def ap50(self) -> float:
        return self.stats["AP50"]

    @property
    def ap75(self) -> float:
        return self.stats["AP75"]

    @property
    def ar(self) -> float:
        return self.stats["AR"]

    def __getitem__(self, name: str) -> float:
        return self.stats[name]

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "evaluator": self.evaluator,
            "stats": dict(self.stats),
            "num_images": self.num_images,
            "num_results": self.num_results,
            "sigmas": list(self.sigmas),
            "seconds": self.seconds,
            "notes": list(self.notes),
            "backend": self.backend,
        }

    def table(self) -> str:
        """A printable two-row table (names, values to 3 decimals; '-' where undefined)."""
        head = (f"OKS keypoint AP ({self.protocol}, {self.evaluator}): "
                f"{self.num_images} images, {self.num_results} results")
        widths = [max(len(n), 5) for n in self.stats]
        names = "  ".join(n.rjust(w) for n, w in zip(self.stats, widths))
        values = "  ".join((f"{v:.3f}" if v >= 0 else "-").rjust(w) for v, w in zip(self.stats.values(), widths))
        return "\n".join([head, names, values, *(f"note: {n}" for n in self.notes)])

    def to_json(self, path: str | Path) -> Path:
        """Write `as_dict()` as JSON, atomically (temp file in the same folder, then rename)."""
        return write_json(path, self.as_dict(), indent=2)


def read_json(path: str | Path) -> Any:
    """Read a JSON file, or a gzip of one (`.gz`), with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise KapaoError(f"{p}: file not found; give the path of a COCO-format JSON file")
    try:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise KapaoError(f"{p}: not readable as JSON ({str(e).splitlines()[0]}); is the file complete?") from None


def gt_as_results(gt: str | Path | dict[str, Any]) -> list[dict[str, Any]]:
    """Ground truth fed back as predictions: a perfect detector's COCO results list.

    One result per non-crowd annotation with at least one labelled keypoint: the GT keypoints, with
    keypoint confidence 1 where labelled (v > 0) and 0 elsewhere, and score 1. Scoring it must give
    AP = AR = 1 (where defined).
    """
    data = read_json(gt) if isinstance(gt, (str, Path)) else gt
    out = []
    for a in data.get("annotations", []):
        kp = a.get("keypoints") or []
        if a.get("iscrowd", 0) or not any(v > 0 for v in kp[2::3]):
            continue
        kps: list[float] = []
        for x, y, v in zip(kp[0::3], kp[1::3], kp[2::3]):
            kps += [float(x), float(y), 1.0 if v > 0 else 0.0]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "keypoints": kps, "score": 1.0})
    return out


def oks_sigmas(schema: KeypointSchema) -> np.ndarray:
    """The schema's OKS sigmas, computed as the reference tools write them (tenths / 10).

    pycocotools, xtcocotools and crowdposetools define sigmas as `np.array([.26, ...]) / 10`; 0.026
    from a YAML differs from .26/10 in the last bit, so we divide the same way to get bit-identical OKS.
    """
    k = schema.num_keypoints
    if schema.oks_sigmas:
        tenths = [float(f"{s * 10:.12g}") for s in schema.oks_sigmas]
    elif k == len(COCO_SIGMAS_TENTHS):
        tenths = list(COCO_SIGMAS_TENTHS)
    else:
        raise KapaoError(
            f"{schema.source}: keypoints.oks_sigmas is missing; OKS AP for {k} keypoints needs one sigma "
            "per keypoint in the data YAML"
        )
    return np.array(tenths) / 10.0


def evaluate_keypoints(
    gt: str | Path | dict[str, Any],
    results: str | Path | Sequence[dict[str, Any]],
    schema: KeypointSchema,
    image_ids: Sequence[int] | None = None,
    evaluator: str | None = None,
    verbose: bool = False,
) -> KeypointMetrics:
    """Score COCO-format keypoint results against COCO-format ground truth with OKS AP.

    gt: annotation file (`.json` or `.json.gz`) or its loaded dict. results: results file or a list of
    `{"image_id", "category_id", "keypoints": [x, y, c] * K, "score"}`. The protocol is
    `schema.evaluator`: 'coco' -> pycocotools `COCOeval(gt, dt, 'keypoints')` with the schema's sigmas
    (10 stats); 'crowdpose' -> xtcocotools `keypoints_crowd`, `use_area=False` (9 stats).
    image_ids restricts the evaluation to those images (as val does for the images it ran on).
    evaluator: None (the protocol's default) or 'pycocotools' / 'faster' (faster-coco-eval) for
    'coco', 'xtcocotools' for 'crowdpose'. The caller's dicts are not modified.
    """
    protocol = schema.evaluator
    choices = EVALUATORS[protocol]
    tool = evaluator or choices[0]
    if tool not in choices:
        raise KapaoError(
            f"{schema.source}: evaluator {evaluator!r} does not support the {protocol!r} protocol; "
            f"use one of {list(choices)}"
        )
    sigmas = oks_sigmas(schema)
    gt_data, gt_src = _load_gt(gt)
    dets, res_src = _load_results(results)
    _check_gt(gt_data, gt_src, schema, protocol)
    gt_ids = {img["id"] for img in gt_data["images"]}
    _check_results(dets, res_src, gt_src, gt_ids, schema.num_keypoints)
    ids = _select_images(image_ids, gt_ids, gt_src)
    selected = gt_ids if ids is None else set(ids)
    num_results = sum(1 for d in dets if d["image_id"] in selected)

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    notes: list[str] = []
    t0 = time.perf_counter()
    with quiet:
        if tool == "pycocotools":
            stats = _eval_pycocotools(gt_data, dets, sigmas, ids)
        elif tool == "faster":
            stats = _eval_faster(gt_data, dets, sigmas, ids, verbose)
        else:
            stats = _eval_crowdpose(gt_data, dets, sigmas, ids, notes)
    seconds = time.perf_counter() - t0
    names = COCO_STATS if protocol == "coco" else CROWDPOSE_STATS
    return KeypointMetrics(
        protocol=protocol,
        evaluator=_TOOL_NAMES[tool],
        stats={n: float(v) for n, v in zip(names, stats)},
        num_images=len(selected),
        num_results=num_results,
        sigmas=tuple(float(s) for s in sigmas),
        seconds=seconds,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- inputs


def _load_gt(gt: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(gt, (str, Path)):
        data = read_json(gt)
        src = str(gt)
        if not isinstance(data, dict):
            raise KapaoError(f"{src}: expected a COCO annotation file (a mapping with images, annotations, categories)")
        return data, src
    if not isinstance(gt, dict):
        raise KapaoError(f"ground truth: expected a path or a COCO annotation dict, got {type(gt).__name__}")
    # The tools write 'ignore'/'_ignore' into annotations: copy them (their values are flat).
    data = dict(gt)
    for key in ("images", "categories"):
        if key in gt:
            data[key] = copy.deepcopy(gt[key])
    if isinstance(gt.get("annotations"), list):
        data["annotations"] = [_copy_flat(a) for a in gt["annotations"]]
    return data, "<ground truth dict>"


def _load_results(results: str | Path | Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    if isinstance(results, (str, Path)):
        data, src = read_json(results), str(results)
        if not isinstance(data, list):
            raise KapaoError(f"{src}: expected a COCO results list [{{image_id, category_id, keypoints, score}}, ...]")
        return data, src
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise KapaoError(f"results: expected a path or a list of result dicts, got {type(results).__name__}")
    # loadRes adds id/area/bbox to every result: copy them.
    return [_copy_flat(r) for r in results], "<results list>"


def _copy_flat(d: Any) -> Any:
    """Copy a dict and its list values (enough for COCO records, which the tools only add keys to)."""
    if not isinstance(d, dict):
        return d
    return {k: (list(v) if isinstance(v, list) else v) for k, v in d.items()}


def _check_gt(data: dict[str, Any], src: str, schema: KeypointSchema, protocol: str) -> None:
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise KapaoError(f"{src}: no '{key}' list; expected a COCO keypoint annotation file")
    if not data["categories"]:
        raise KapaoError(f"{src}: 'categories' is empty; add the person category")
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img:
            raise KapaoError(f"{src}: an entry of 'images' has no 'id'")
    k = schema.num_keypoints
    need = ["id", "image_id", "category_id", "keypoints", "bbox", "iscrowd"]
    need.append("area" if protocol == "coco" else "num_keypoints")
    for a in data["annotations"]:
        if not isinstance(a, dict):
            raise KapaoError(f"{src}: an entry of 'annotations' is not a mapping")
        missing = [f for f in need if f not in a]
        if missing:
            why = ("OKS divides by the object area" if "area" in missing else
                   "CrowdPose ignores persons by their num_keypoints" if "num_keypoints" in missing else
                   "every keypoint annotation needs it")
            raise KapaoError(f"{src}: annotation {a.get('id', '?')} has no {missing} ({why}); "
                             "fix the annotation file or use the data YAML it belongs to")
        n = len(a["keypoints"])
        if n != 3 * k:
            raise KapaoError(
                f"{src}: annotation {a['id']} has {n // 3} keypoints ({n} numbers) but the schema "
                f"({schema.source}) has {k}; evaluate with the data YAML these annotations belong to"
            )


def _check_results(dets: list[Any], src: str, gt_src: str, gt_ids: set[int], k: int) -> None:
    unknown: set[Any] = set()
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise KapaoError(
                f"{src}: result {i} is not a mapping; expected {{image_id, category_id, keypoints, score}}"
            )
        missing = [f for f in ("image_id", "category_id", "keypoints", "score") if f not in d]
        if missing:
            raise KapaoError(f"{src}: result {i} has no {missing}; each result needs image_id, category_id, "
                             "keypoints and score")
        if not hasattr(d["keypoints"], "__len__") or len(d["keypoints"]) != 3 * k:
            n = len(d["keypoints"]) if hasattr(d["keypoints"], "__len__") else "no list of"
            raise KapaoError(f"{src}: result {i} has {n} keypoint numbers, expected {3 * k} ([x, y, c] x {k})")
        if not (isinstance(d["score"], numbers.Real) and math.isfinite(d["score"])):
            raise KapaoError(f"{src}: result {i} has score {d['score']!r}; expected a finite number")
        if d["image_id"] not in gt_ids:
            unknown.add(d["image_id"])
    if dets:
        kps = np.asarray([d["keypoints"] for d in dets], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(kps).all(axis=1))
        if bad.size:
            raise KapaoError(f"{src}: result {int(bad[0])} has non-finite keypoints (nan/inf); "
                             "fix the predictions before evaluating")
    if unknown:
        shown = sorted(unknown, key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else str(v)))[:10]
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        raise KapaoError(
            f"{src}: results name image ids that are not in {gt_src}: {shown}{more}; evaluate against "
            "the annotation file the predictions were made for (image ids come from it, not from file names)"
        )


def _select_images(image_ids: Sequence[int] | None, gt_ids: set[int], src: str) -> list[int] | None:
    if image_ids is None:
        return None
    ids = sorted(set(image_ids))
    unknown = [i for i in ids if i not in gt_ids]
    if unknown:
        raise KapaoError(f"{src}: image_ids {unknown[:10]} are not in the annotation file; pass ids from its 'images'")
    return ids


# ----------------------------------------------------------------------------- evaluators


def _index(coco_cls: type, data: dict[str, Any]) -> Any:
    """A COCO api object over an in-memory dataset (the constructors only read files)."""
    c = coco_cls()
    c.dataset = data
    c.createIndex()
    return c


def _load_dets(coco_cls: type, coco_gt: Any, dets: list[dict[str, Any]]) -> Any:
    """loadRes, or an empty results object: pycocotools' loadRes fails on an empty list."""
    if dets:
        return coco_gt.loadRes(dets)
    empty = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
             "annotations": []}
    return _index(coco_cls, empty)


def _eval_pycocotools(gt: dict[str, Any], dets: list[dict[str, Any]], sigmas: np.ndarray,
                      ids: list[int] | None) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = _index(COCO, gt)
    coco_dt = _load_dets(COCO, coco_gt, dets)
    e = COCOeval(coco_gt, coco_dt, "keypoints")
    e.params.kpt_oks_sigmas = sigmas
    if ids is not None:
        e.params.imgIds = ids
    e.evaluate()
    e.accumulate()
    e.summarize()
    return list(e.stats[: len(COCO_STATS)])


def faster_available() -> bool:
    """Whether the optional faster-coco-eval evaluator is installed."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _eval_faster(gt: dict[str, Any], dets: list[dict[str, Any]], sigmas: np.ndarray,
                 ids: list[int] | None, verbose: bool) -> list[float]:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise KapaoError("evaluator 'faster' needs faster-coco-eval: pip install faster-coco-eval "
                         "(or use the default pycocotools)") from None

    say = print if verbose else (lambda *a, **k: None)
    coco_gt = COCO(print_function=say)
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dets) if dets else _load_dets(COCO, coco_gt, dets)
    e = COCOeval_faster(coco_gt, coco_dt, "keypoints", kpt_oks_sigmas=list(sigmas), print_function=say)
    e.params.kpt_oks_sigmas = sigmas
    if ids is not None:
        e.params.imgIds = ids
    e.evaluate()
    e.accumulate()
    e.summarize()
    return list(e.stats[: len(COCO_STATS)])


def _eval_crowdpose(gt: dict[str, Any], dets: list[dict[str, Any]], sigmas: np.ndarray,
                    ids: list[int] | None, notes: list[str]) -> list[float]:
    """xtcocotools 'keypoints_crowd' (the crowdposetools protocol): OKS with area = w*h*0.53 of the GT
    box (`use_area=False`), persons ignored by their `num_keypoints`, plus AP per crowd-index group."""
    try:
        from xtcocotools.coco import COCO
        from xtcocotools.cocoeval import COCOeval
    except (ImportError, ValueError) as e:  # ValueError: a wheel built against numpy 1.x under numpy 2
        raise KapaoError(
            f"CrowdPose evaluation needs a working xtcocotools ({str(e).splitlines()[0]}); reinstall it built for "
            "this numpy: pip install --force-reinstall --no-deps --no-build-isolation --no-binary xtcocotools "
            "xtcocotools"
        ) from None

    crowd_index = {img["id"]: img.get("crowdIndex") for img in gt["images"]}
    evaluated = sorted(crowd_index) if ids is None else ids
    lacking = [i for i in evaluated if crowd_index[i] is None]
    if lacking:
        notes.append(
            f"{len(lacking)} of {len(evaluated)} images have no 'crowdIndex' (e.g. {lacking[:3]}): they count "
            "in AP/AR but in none of AP_easy/medium/hard"
        )

    class CrowdPoseEval(COCOeval):
        """xtcocotools' get_type_result reads the GT file again by name and needs crowdIndex on every
        image; this one reads the in-memory GT, keeps the evaluated images and skips those without."""

        def get_type_result(self, first: float = 0.01, second: float = 0.85) -> list[float]:
            keep = [i for i in evaluated if crowd_index[i] is not None]
            groups = ([i for i in keep if crowd_index[i] < first],
                      [i for i in keep if first <= crowd_index[i] < second],
                      [i for i in keep if crowd_index[i] >= second])
            out = []
            for group in groups:
                if not group:  # what xtcocotools gives for a group without ground truth
                    out.append(-1.0)
                    continue
                self.params.imgIds = group
                self.evaluate()
                self.accumulate()
                # As xtcocotools/crowdposetools: the mean over the whole precision array, to 4 decimals.
                out.append(round(float(np.mean(self.eval["precision"][:, :, :, 0, :])), 4))
            self.params.imgIds = list(evaluated)
            return out

    coco_gt = _index(COCO, gt)
    coco_dt = _load_dets(COCO, coco_gt, dets)
    e = CrowdPoseEval(coco_gt, coco_dt, "keypoints_crowd", sigmas=sigmas, use_area=False)
    e.params.imgIds = list(evaluated)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return list(e.stats[: len(CROWDPOSE_STATS)])
