"""The default path (`KAPAO(weights)`, backend "auto") against the official demo pipeline, and what it costs.

    python benchmarks/bench_default.py [--weights W] [--images DIR] [--n 4] [--imgsz 640 1024 1280]
                                       [--rounds 3] [--threads 2] [--mixed 12] [--skip-install]

Paths are measured side by side in one process, alternating round by round (ABBA), each number the
median of the rounds' means (the machine is shared: compare only within one run). Tables:
1. official-style torch eager vs kapao default, end to end per image (read + letterbox + forward +
   NMS + fusion) at each --imgsz on --n images, and a headline row (the first image at 1024).
   Official style: `demos/image.py` as shared/golden/e2e/README.md writes it (cv2.imread, letterbox,
   torch `/ 255`, checkpoint BN-fused as `attempt_load`, fp32 forward under no_grad, torch/torchvision
   NMS + rescaling from `torch_postprocess_ref.py`, then keypoint-object fusion). Kapao default:
   `KAPAO(weights, threads=T)(path, imgsz=S)` (the cached dynamic ONNX on ONNX Runtime, NumPy
   pre/post). Poses: counts and mean/min OKS of matched pairs against the official style.
2. the first KAPAO() (one-time export into an empty $KAPAO_HOME, a temp dir) vs later ones (same
   process, new process): construction and first/second image seconds.
3. NumPy vs the old torch post-processing (`bench_postprocess.py`'s cases and equality check).
4. one dynamic-shape export vs one fixed-shape export per letterbox shape on --mixed photos at 1024.
5. site-packages size and `import kapao` time: tests/test_no_torch.py's base venv vs the main venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kapao.data.letterbox import prepare_input, preprocess_demo, read_image, to_input_batch
from kapao.engine.predictor import KAPAO
from kapao.postprocess import postprocess
from kapao.presets import get_preset
from kapao.results import Poses
from kapao.runtime.bench import match_poses

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KAPAO_SHARED", REPO.parent / "shared"))
IDLE_S = 0.05  # after torch work: libgomp workers spin ~5-10 ms and would slow the next ORT forward
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

try:  # kapao's old torch/torchvision post-processing (benchmarks/, beside this script)
    import torch_postprocess_ref as torch_ref
except ImportError as e:  # pragma: no cover - the reference is a benchmark file
    torch_ref, TORCH_REF_ERROR = None, str(e)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def loadavg() -> str:
    return f"(load average {os.getloadavg()[0]:.1f})"


def idle() -> None:
    time.sleep(IDLE_S)


def agreement(refs: list[Poses], others: list[Poses], sigmas: tuple[float, ...]) -> str:
    """'n_ref/n_other, matched, mean OKS, min OKS' of greedy one-to-one pairs (see match_poses)."""
    oks, unmatched = match_poses(refs, others, sigmas)
    a, b = sum(map(len, refs)), sum(map(len, others))
    tail = f"mean {np.mean(oks):.6f} min {min(oks):.6f}" if oks else "-"
    return f"{a}/{b} {len(oks)} matched, {unmatched} unmatched, OKS {tail}"


class OfficialStyle:
    """The official demo pipeline, one image: (path, imgsz) -> (Poses, forward ms)."""

    def __init__(self, weights: str):
        from kapao.weights.loader import load

        t0 = time.perf_counter()
        model, _ = load(weights)
        self.model = model.fuse().eval()  # attempt_load: .float().fuse().eval()
        self.load_s = time.perf_counter() - t0
        self.schema, self.stride = model.schema, int(model.max_stride)
        self.preset = get_preset("demo")

    def __call__(self, path: Path, imgsz: int) -> tuple[Poses, float]:
        img = read_image(path)
        chw, _, _ = preprocess_demo(img, imgsz, self.stride)
        x = torch.from_numpy(chw)[None].float() / 255.0
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(x)  # (1, N, 57) decoded rows, input pixels
        fwd = (time.perf_counter() - t0) * 1e3
        hw, orig = tuple(chw.shape[1:]), [img.shape[:2]]
        if torch_ref is None:
            return postprocess(out.numpy(), self.preset, hw, orig, self.schema)[0], fwd
        pd, kd = torch_ref.run_nms(out, self.preset, self.schema.num_keypoints)
        return torch_ref.postprocess_dets(pd, kd, self.preset, hw, orig, self.schema)[0], fwd


def kapao_call(model: KAPAO) -> Callable[[Path, int], tuple[Poses, float]]:
    """The default API call on a path, with its forward ms read from the model's stage times."""

    def run(path: Path, imgsz: int) -> tuple[Poses, float]:
        before = model.times.ms["forward"]
        poses = model(str(path), imgsz=imgsz)
        return poses, model.times.ms["forward"] - before

    return run


def alternate(items: list[Any], imgsz: int, rounds: int, runners: dict[str, Callable], warm: bool = True) -> dict[str, Any]:
    """warm: each runner over `items` once untimed first (every input shape seen once). Then
    `rounds` timed passes in ABBA order -> {name: (median total ms/item, median forward ms/item,
    poses of the warm-up pass, else of the first timed round)}."""
    poses = {k: [fn(p, imgsz)[0] for p in items] for k, fn in runners.items()} if warm else {k: [] for k in runners}
    tot: dict[str, list[float]] = {k: [] for k in runners}
    fwd: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            idle()
            t, f = 0.0, 0.0
            for p in items:
                t0 = time.perf_counter()
                out, ms = runners[k](p, imgsz)
                t += (time.perf_counter() - t0) * 1e3
                f += ms
                if r == 0 and not warm:
                    poses[k].append(out)
            tot[k].append(t / len(items))
            fwd[k].append(f / len(items))
    return {k: (med(tot[k]), med(fwd[k]), poses[k]) for k in runners}


def table_pipeline(args, paths: list[Path], official: OfficialStyle, model: KAPAO) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Table 1 -> kapao's raw rows (1, N, 57) for the headline image at 1024, its input and original (H, W)."""
    print(f"\n1. official-style torch eager (fused, fp32) vs kapao default (auto), end to end, ms per image {loadavg()}")
    head = f"{'imgsz':>5} {'images':>6} {'official':>9} {'(fwd)':>7} {'kapao':>8} {'(fwd)':>7} {'speed-up':>8}  poses official/kapao, agreement"
    print(head + "\n" + "-" * (len(head) + 30))
    runners = {"official": official, "kapao": kapao_call(model)}
    sigmas = model.schema.oks_sigmas
    rows = [(1024, paths[:1], max(args.rounds, 7), "headline: 1 image")] + [(s, paths, args.rounds, "") for s in args.imgsz]
    for imgsz, files, rounds, note in rows:
        res = alternate(files, imgsz, rounds, runners)
        (ot, of, op), (kt, kf, kp) = res["official"], res["kapao"]
        print(f"{imgsz:>5} {len(files):>6} {ot:>9.1f} {of:>7.1f} {kt:>8.1f} {kf:>7.1f} {ot / kt:>7.2f}x  "
              f"{agreement(op, kp, sigmas)}" + (f"  [{note}, {rounds} rounds]" if note else ""))
    print(f"rounds: {args.rounds} (headline {max(args.rounds, 7)}); (fwd) = the forward alone; speed-up = official / kapao;"
          " OKS of matched official/kapao pose pairs")
    if torch_ref is None:
        print(f"(official-style NMS fell back to kapao.postprocess: {TORCH_REF_ERROR})")
    img = read_image(paths[0])
    chw = preprocess_demo(img, 1024, model.stride)[0]
    return model.backend(to_input_batch([chw])), tuple(chw.shape[1:]), img.shape[:2]


def first_vs_later(args, image: Path, home: Path) -> tuple[list[str], KAPAO, OfficialStyle]:
    """Table 2 (measured first, while $KAPAO_HOME = `home` is empty) -> its lines, the first KAPAO
    and the official-style model."""
    os.environ["KAPAO_HOME"] = str(home)
    lines = [f"\n2. first call (one-time export into an empty $KAPAO_HOME) vs later calls, 1024, one image {loadavg()}",
             f"{'call':<38} {'construct s':>11} {'1st image s':>11} {'2nd image s':>11}", "-" * 74]

    def timed(make: Callable[[], Any]) -> tuple[Any, float, float, float]:
        t0 = time.perf_counter()
        m = make()
        t1 = time.perf_counter()
        run = m if isinstance(m, OfficialStyle) else kapao_call(m)
        run(image, 1024)
        t2 = time.perf_counter()
        run(image, 1024)
        return m, t1 - t0, t2 - t1, time.perf_counter() - t2

    first, c, i1, i2 = timed(lambda: KAPAO(args.weights, threads=args.threads))
    lines.append(f"{'KAPAO(w): first (exports to ONNX)':<38} {c:>11.2f} {i1:>11.2f} {i2:>11.2f}")
    later = [timed(lambda: KAPAO(args.weights, threads=args.threads))[1:] for _ in range(3)]
    c, i1, i2 = (med([x[j] for x in later]) for j in range(3))
    lines.append(f"{'KAPAO(w): later, same process (med 3)':<38} {c:>11.2f} {i1:>11.2f} {i2:>11.2f}")
    child = (f"import json, sys, time; t0 = time.perf_counter(); from kapao import KAPAO; t1 = time.perf_counter(); "
             f"m = KAPAO({args.weights!r}, threads={args.threads}); t2 = time.perf_counter(); m({str(image)!r}, imgsz=1024); "
             f"t3 = time.perf_counter(); m({str(image)!r}, imgsz=1024); "
             f"print(json.dumps([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3, 'torch' in sys.modules]))")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=dict(os.environ), cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if r.returncode == 0:
        imp, c, i1, i2, torch_in = json.loads(r.stdout.strip().splitlines()[-1])
        lines.append(f"{'KAPAO(w): later, new process':<38} {c:>11.2f} {i1:>11.2f} {i2:>11.2f}"
                     f"  (process wall {wall:.2f} s, import {imp:.2f} s, torch imported: {'yes' if torch_in else 'no'})")
    else:
        lines.append(f"KAPAO(w): later, new process: failed ({r.stderr.strip().splitlines()[-1:]})")
    official, _, i1, i2 = timed(lambda: OfficialStyle(args.weights))
    lines.append(f"{'official style: load .pt + fuse':<38} {official.load_s:>11.2f} {i1:>11.2f} {i2:>11.2f}")
    entries = sorted(p.name for p in (home / "exports").iterdir() if p.is_dir()) if (home / "exports").is_dir() else []
    lines.append(f"cache: {home}/exports, entries {entries}; backend {first.backend.name}")
    return lines, first, official


def table_postprocess(args, own_pred: np.ndarray, own_hw: tuple[tuple[int, int], tuple[int, int]], schema) -> None:
    print(f"\n3. post-processing (NMS + rescale + fusion -> Poses): NumPy (kapao.postprocess) vs the old torch path, ms {loadavg()}")
    try:
        import bench_postprocess as bp
    except ImportError as e:
        print(f"skipped: benchmarks/bench_postprocess.py not importable ({e})")
        return
    golden = SHARED / "golden"
    cases = [("trained-like", "synthetic 1024, 20 persons", bp.synthetic_trained(), (1024, 1024), (1024, 1024))]
    if (golden / "postprocess.npz").is_file():
        cases.insert(0, ("trained-like", "golden crafted 640", np.load(golden / "postprocess.npz")["crafted_pred"], (448, 640), (426, 640)))
    shipped = bp.shipped_trained(SHARED)
    if shipped is not None:
        cases.append(("trained-like", "shipped KAPAO-N scene 640", shipped[0], (640, 640), shipped[1]))
    cases.append(("junk-heavy", f"{Path(args.weights).stem} 1024 headline", own_pred, *own_hw))
    head = f"{'kind':<13} {'case':<34} {'preset':<6} {'torch':>8} {'numpy':>8} {'speed-up':>8} same"
    print(head + "\n" + "-" * len(head))
    for kind, name, pred, input_hw, orig_hw in cases:
        tpred = torch.from_numpy(np.ascontiguousarray(pred))
        for preset in ("demo", "val"):
            p = get_preset(preset)
            run = {"torch": lambda: bp.ref.postprocess(tpred, p, input_hw, [orig_hw], schema),
                   "numpy": lambda: postprocess(pred, p, input_hw, [orig_hw], schema)}
            times: dict[str, list[float]] = {k: [] for k in run}
            for k, fn in run.items():
                fn()  # warm-up
            for _ in range(args.repeat):  # alternating
                for k, fn in run.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            t, n = med(times["torch"]), med(times["numpy"])
            ok = bp.same(pred, preset, input_hw, orig_hw)
            print(f"{kind:<13} {name:<34} {preset:<6} {t:>8.2f} {n:>8.2f} {t / n:>7.2f}x {'yes' if ok else 'NO'}")
    print(f"medians of {args.repeat} alternating runs; same = identical detections (order too) and poses")


def table_shapes(args, files: list[Path], sigmas: tuple[float, ...], work: Path) -> None:
    from kapao.runtime.cache import ONNX_OPSET
    from kapao.runtime.export import export_onnx
    from kapao.runtime.onnx_backend import OnnxBackend
    from kapao.weights.loader import load

    imgsz = 1024
    print(f"\n4. dynamic-shape export vs one fixed-shape export per letterbox shape: {len(files)} mixed photos at {imgsz} {loadavg()}")
    model, _ = load(args.weights)
    stride = int(model.max_stride)
    shapes = sorted({prepare_input(read_image(p), imgsz, stride, None)[0].shape[1:] for p in files})
    export_s: dict[str, float] = {"dynamic": 0.0, "per-shape": 0.0}
    load_s = dict(export_s)
    graphs: dict[str, dict] = {"dynamic": {}, "per-shape": {}}
    export_onnx(model, work / "warm-up.onnx", imgsz=shapes[0], opset=ONNX_OPSET)  # untimed: the first export's one-off costs
    for policy, targets in (("dynamic", [None]), ("per-shape", shapes)):
        for hw in targets:
            out = work / (f"fixed_{hw[0]}x{hw[1]}.onnx" if hw else "dynamic.onnx")
            t0 = time.perf_counter()
            export_onnx(model, out, imgsz=hw or imgsz, dynamic=hw is None, opset=ONNX_OPSET)
            t1 = time.perf_counter()
            graphs[policy][hw] = OnnxBackend(out, threads=args.threads)
            export_s[policy] += t1 - t0
            load_s[policy] += time.perf_counter() - t1

    def runner(policy: str) -> Callable[[int], tuple[Poses, float]]:
        def run(i: int) -> tuple[Poses, float]:
            img = read_image(files[i])
            chw = prepare_input(img, imgsz, stride, None)[0]
            g = graphs[policy][None] if policy == "dynamic" else graphs[policy][chw.shape[1:]]
            t0 = time.perf_counter()
            pred = g(to_input_batch([chw]))
            f = (time.perf_counter() - t0) * 1e3
            return postprocess(pred, "demo", chw.shape[1:], [img.shape[:2]], g.schema)[0], f

        return run

    runners = {k: runner(k) for k in graphs}
    idx = list(range(len(files)))
    first: dict[str, float] = {}
    for k, fn in runners.items():  # first pass: every shape new to the session (what a folder run pays once)
        idle()
        t0 = time.perf_counter()
        for i in idx:
            fn(i)
        first[k] = (time.perf_counter() - t0) * 1e3 / len(idx)
    res = alternate(idx, imgsz, args.rounds, {k: (lambda fn: lambda i, _s: fn(i))(fn) for k, fn in runners.items()}, warm=False)
    head = f"{'policy':<10} {'graphs':>6} {'export s':>8} {'load s':>7} {'1st pass':>8} {'total':>7} {'forward':>7}  poses vs dynamic"
    print(f"shapes (H, W): {', '.join(f'{h}x{w}' for h, w in shapes)}")
    print(head + "\n" + "-" * (len(head) + 20))
    for k in graphs:
        tot, fwd, poses = res[k]
        agree = "-" if k == "dynamic" else agreement(res["dynamic"][2], poses, sigmas)
        print(f"{k:<10} {len(graphs[k]):>6} {export_s[k]:>8.1f} {load_s[k]:>7.2f} {first[k]:>8.1f} {tot:>7.1f} {fwd:>7.1f}  {agree}")
    saved = res["dynamic"][0] - res["per-shape"][0]
    extra = (export_s["per-shape"] + load_s["per-shape"]) - (export_s["dynamic"] + load_s["dynamic"])
    if len(shapes) < 2:
        verdict = "one shape only: pass --mixed with more images for a mixed folder"
    elif abs(saved) < 0.03 * res["dynamic"][0]:
        verdict = f"equal within noise (<3 %), and dynamic needs one export instead of {len(shapes)}"
    elif saved <= 0:
        verdict = f"dynamic is {-saved:.1f} ms/image faster (or equal) and needs one export instead of {len(shapes)}"
    else:
        verdict = (f"per-shape is {saved:.1f} ms/image faster once exported; its {extra:.1f} s of extra exports "
                   f"pay back after ~{extra * 1e3 / saved:.0f} images of those shapes")
    print(f"ms per image; 1st pass: the first pass over the folder (every shape new to its session), total/forward: "
          f"median of {args.rounds} later rounds; {verdict}")


def base_venv() -> Path | None:
    """The newest complete base venv that tests/test_no_torch.py builds (or None)."""
    root = Path(os.environ.get("KAPAO_TEST_CACHE", "~/.cache/kapao-tests")).expanduser()
    ready = [p for p in root.glob("venv-base-*") if (p / ".kapao-ready").is_file() and (p / "bin" / "python").is_file()]
    return max(ready, key=lambda p: p.stat().st_mtime) if ready else None


def site_packages_mb(python: Path) -> tuple[Path, float]:
    """The venv's site-packages folder and its size on disk (du), MB."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    sp = Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    return sp, int(subprocess.run(["du", "-sk", str(sp)], capture_output=True, text=True, check=True).stdout.split()[0]) / 1024


def import_time(python: Path, repeat: int = 5) -> tuple[float, bool]:
    """Median seconds of `import kapao` in fresh interpreters, and whether it imported torch."""
    code = "import sys, time; t = time.perf_counter(); import kapao; print(time.perf_counter() - t, 'torch' in sys.modules)"
    runs = []
    for _ in range(repeat + 1):  # the first one only warms the file cache
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(), check=True)
        runs.append(out.stdout.split())
    return med([float(r[0]) for r in runs[1:]]), any(r[1] == "True" for r in runs[1:])


def torch_extra_mb(skip: set[str]) -> tuple[float, list[str]]:
    """MB of the distributions `kapao[torch]` adds: the requirement closure (in this venv) of
    pyproject.toml's torch extra, minus `skip` (the base install's), summed over their RECORD files."""
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    todo = [Requirement(r) for r in extra]
    seen: set[str] = set()
    total = 0
    while todo:
        req = todo.pop()
        name = norm_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        if name not in skip:
            total += sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
        todo += [r for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate({"extra": ""})]
    return total / 2**20, sorted(seen - skip)


def norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def table_install() -> None:
    print(f"\n5. install size and `import kapao` time (fresh interpreter, median of 5) {loadavg()}")
    head = f"{'install':<44} {'site-packages MB':>16} {'import kapao s':>14} torch imported"
    print(head + "\n" + "-" * len(head))
    base = base_venv()
    base_mb, sp = None, None
    if base is None:
        print(f"{'base (no torch)':<44} {'n/a':>16} {'n/a':>14}  (no base venv yet: run "
              "`.venv/bin/python -m pytest -q tests/test_no_torch.py` to build it)")
    else:
        sp, base_mb = site_packages_mb(base / "bin" / "python")
        s, t = import_time(base / "bin" / "python")
        print(f"{'base, ' + base.name:<44} {base_mb:>16.0f} {s:>14.3f} {'yes' if t else 'no'}")
    main_py = Path(sys.executable)
    s, t = import_time(main_py)
    print(f"{'main venv (torch + all extras)':<44} {site_packages_mb(main_py)[1]:>16.0f} {s:>14.3f} {'yes' if t else 'no'}")
    if base_mb is not None:
        skip = {norm_name(p.name.split("-")[0]) for p in sp.glob("*.dist-info")}
        extra, names = torch_extra_mb(skip)
        print(f"{'base + kapao[torch] (base + what it adds)':<44} {base_mb + extra:>16.0f} {'':>14}")
        print(f"base / with torch = 1/{(base_mb + extra) / base_mb:.1f}; kapao[torch] adds {extra:.0f} MB: {', '.join(names)} "
              f"(sizes of this venv's {torch.__version__} wheels)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(SHARED / "golden" / "e2e" / "kapao_s_coco_seed0.pt"))
    ap.add_argument("--images", default=str(SHARED / "data" / "coco_mini" / "images"), help="folder of images")
    ap.add_argument("--n", type=int, default=4, help="images per size in table 1")
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 1024, 1280])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path (>= 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    ap.add_argument("--mixed", type=int, default=12, help="images for table 4 (first N of the folder)")
    ap.add_argument("--repeat", type=int, default=15, help="post-processing runs per case in table 3")
    ap.add_argument("--skip-install", action="store_true", help="skip table 5 (install size, import time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"{args.images}: no images")
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads}, load {os.getloadavg()[0]:.1f}")
    print(f"weights {args.weights}\nimages {args.images} (table 1: first {args.n}; headline: {paths[0].name})")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kapao-bench-") as tmp:
        (Path(tmp) / "home").mkdir()
        lines2, model, official = first_vs_later(args, paths[0], Path(tmp) / "home")  # first: the cache starts empty
        pred, input_hw, orig_hw = table_pipeline(args, paths[: args.n], official, model)
        print("\n".join(lines2))
        table_postprocess(args, pred, (input_hw, orig_hw), model.schema)
        table_shapes(args, paths[: args.mixed], model.schema.oks_sigmas, Path(tmp))
    if not args.skip_install:
        table_install()
    print(f"\n{time.perf_counter() - t_start:.0f} s in all {loadavg()}")


if __name__ == "__main__":
    main()
