"""The base install (`pip install kapao`, no PyTorch) in a fresh venv: torch is not importable,
`import kapao` pulls in no torch, `kapao predict` runs an exported ONNX file and the shipped
default model on real photos with the same poses as the torch path of the main venv, and the
torch-only commands and weights exit with one line naming the `kapao[torch]` extra.

The venv is cached between runs outside the repository, in `$KAPAO_TEST_CACHE` (default
`~/.cache/kapao-tests`) as `venv-base-<hash of pyproject.toml + the Python>`: a change of
dependencies makes a new one (older ones are pruned); a change of any file under src/ (code,
package data, added or removed files) only reinstalls kapao into it, without its dependencies. kapao is installed non-editable from a copy of the checkout, so the package data
(the shipped ONNX) is what a user's install gets.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from kapao.weights import default_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TORCH_EXTRA = 'pip install "kapao[torch]"'
TORCH_DISTS = ("torch", "torchvision", "safetensors", "onnx")
KEEP_VENVS = 2  # cached base venvs kept besides the current one
IMGSZ = 256  # the shipped model's training size (also its default)
BOX_ATOL = 1e-3  # px, issue 14
# keypoints: the export tolerance of tests/test_export.py (coordinates rtol 1e-5 with the fused-BN
# allowance; scores and keypoint confidences are probabilities, atol 1e-5)
KP_RTOL, KP_ATOL, PROB_ATOL = 1e-5, 0.0127, 1e-5


# -- the cached base venv -----------------------------------------------------------------------


def _src_files() -> list[Path]:
    skip = ("__pycache__", ".egg-info")
    return sorted(p for p in (REPO / "src").rglob("*") if p.is_file() and not any(s in str(p) for s in skip))


def venv_key() -> str:
    """What the venv's dependencies depend on: pyproject.toml and the interpreter."""
    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    h.update(f"{sys.version}|{getattr(sys, '_base_executable', sys.executable)}".encode())
    return h.hexdigest()[:16]


def code_digest() -> str:
    """What the installed kapao depends on: the contents of everything pip installs from."""
    h = hashlib.sha256()
    for p in [REPO / "pyproject.toml", REPO / "README.md", *_src_files()]:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _install_kapao(python: Path, deps: bool) -> None:
    """pip install a copy of the checkout (pyproject, README, src) into the venv of `python`: the
    build writes into the copy, never into the checkout."""
    with tempfile.TemporaryDirectory(prefix="kapao-src-") as tmp:
        copy = Path(tmp) / "kapao"
        shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, copy / name)
        # the venv's own setuptools (>= 64) builds it: no build environment to fetch
        flags = ["--no-build-isolation"] + ([] if deps else ["--no-deps", "--force-reinstall"])
        must_run([python, "-m", "pip", "install", "-q", *flags, str(copy)], timeout=1200)


def _prune(root: Path, keep: Path) -> None:
    old = sorted((p for p in root.glob("venv-base-*") if p != keep and p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in old[: max(0, len(old) - KEEP_VENVS)]:
        shutil.rmtree(p, ignore_errors=True)


def base_venv_path() -> Path:
    """The venv with the base install of this checkout, built or brought up to date under a lock."""
    root = Path(os.environ.get("KAPAO_TEST_CACHE", "~/.cache/kapao-tests")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"venv-base-{venv_key()}"
    python = venv / "bin" / "python"
    ready, stamp = venv / ".kapao-ready", venv / ".kapao-code"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        if not ready.is_file():  # new, or a build that was killed half way
            shutil.rmtree(venv, ignore_errors=True)
            must_run([sys.executable, "-m", "venv", venv])
            # a setuptools that builds wheels by itself (>= 70.1) for --no-build-isolation
            must_run([python, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=70.1"])
            _install_kapao(python, deps=True)
            ready.write_text(venv_key())
        elif not stamp.is_file() or stamp.read_text() != code_digest():
            _install_kapao(python, deps=False)  # same dependencies, new code
        stamp.write_text(code_digest())
        os.utime(venv)
        _prune(root, venv)
    return venv


def run(cmd: list, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def must_run(cmd: list, timeout: float = 600) -> None:
    r = run(cmd, timeout=timeout)
    if r.returncode:
        pytest.fail(f"building the base venv: {' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr[-2000:]}")


def base_env(venv: Path) -> dict[str, str]:
    """The environment of a shell with the base venv activated (nothing of the main venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def venv() -> Path:
    return base_venv_path()


@pytest.fixture(scope="module")
def base(venv: Path, tmp_path_factory: pytest.TempPathFactory):
    """base(*argv) runs a command of the base venv (`kapao ...` or `python ...`) in a temp folder."""
    cwd = tmp_path_factory.mktemp("base")
    env = base_env(venv)

    def call(*argv: object) -> subprocess.CompletedProcess:
        return run([venv / "bin" / str(argv[0]), *argv[1:]], cwd=cwd, env=env)

    return call


def site_packages_mb(python: Path) -> float:
    out = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    return sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


# -- the base install ---------------------------------------------------------------------------


def test_base_install_has_no_torch(venv, base):
    r = base("python", "-c", "import torch")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stderr
    listed = json.loads(base("python", "-m", "pip", "list", "--format", "json").stdout)
    names = {d["name"].lower() for d in listed}
    assert not names & set(TORCH_DISTS), sorted(names)
    assert {"kapao", "numpy", "onnxruntime", "opencv-python-headless"} <= names


CORE = ("kapao.postprocess", "kapao.results", "kapao.viz", "kapao.track", "kapao.io.sources", "kapao.io.writers",
        "kapao.data.letterbox", "kapao.runtime.base", "kapao.runtime.metadata", "kapao.runtime.onnx_backend",
        "kapao.runtime.factory", "kapao.runtime.cache", "kapao.engine.predictor", "kapao.engine.predict_job",
        "kapao.cli.main", "kapao.weights.shipped", "kapao.weights.registry", "kapao.weights.download")


def test_import_kapao_and_the_inference_core_import_no_torch(venv, base, capsys):
    code = (
        "import importlib, sys, time; t = time.perf_counter(); import kapao; dt = time.perf_counter() - t\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "from kapao.cli.main import build_parser; build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'safetensors', 'onnx'))\n"
        "from kapao.weights import shipped_onnx\n"
        "print(kapao.__file__); print(shipped_onnx()); print(bad); print(f'{dt:.3f}')\n"
    )
    r = base("python", "-c", code)
    assert r.returncode == 0, r.stderr
    init, onnx_path, bad, seconds = r.stdout.split("\n")[:4]
    assert init.startswith(str(venv)), init  # the installed package, not the checkout
    assert onnx_path.startswith(str(venv)) and Path(onnx_path).is_file(), onnx_path  # package data
    assert bad == "[]", bad
    main_mb = site_packages_mb(Path(sys.executable))
    base_mb = site_packages_mb(venv / "bin" / "python")
    with capsys.disabled():
        print(f"\nbase install: site-packages {base_mb:.0f} MB (main venv with torch {main_mb:.0f} MB), "
              f"import kapao {float(seconds) * 1e3:.0f} ms")


def test_cli_help_works(base):
    r = base("kapao", "--help")
    assert r.returncode == 0 and "predict" in r.stdout, r.stderr


@pytest.mark.parametrize("argv", [
    ["train", "--data", "coco-kp"],
    ["export", "--weights", "kapao_n_synth"],
    ["convert", "kapao_n_synth", "out.safetensors"],
    ["info"],
    ["benchmark", "--images", ".", "--cfg", "kapao-n"],
    ["data", "show", "coco-kp"],
    ["val", "--data", "coco-kp"],
    ["predict", "{image}", "--weights", "{safetensors}", "--nosave"],
    ["predict", "{image}", "--weights", "kapao_s_coco", "--nosave"],  # a registry name: no download first
    ["predict", "{image}", "--backend", "torch", "--nosave"],
], ids=["train", "export", "convert", "info", "benchmark", "data-show", "val", "predict-safetensors",
        "predict-registry-name", "predict-torch-backend"])
def test_torch_commands_and_weights_exit_with_one_line(base, argv, tmp_path):
    image = next((REPO / "src" / "kapao" / "assets" / "demo").glob("*.jpg"))
    weights = tmp_path / "model.safetensors"
    shutil.copy2(default_weights(), weights)  # a user's torch weights file
    r = base("kapao", *(a.format(image=image, safetensors=weights) for a in argv))
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode != 0
    assert len(lines) == 1 and TORCH_EXTRA in lines[0], r.stdout + r.stderr
    assert "Traceback" not in r.stderr


# -- kapao predict without torch vs the torch path ---------------------------------------------


def read_poses(run_dir: Path) -> dict[str, np.ndarray]:
    """predictions.csv by image: (N, 1 + 4 + 3K) rows [score, x1, y1, x2, y2, kx, ky, kconf, ...]."""
    by_image: dict[str, list[list[float]]] = defaultdict(list)
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            by_image[row[0]].append([float(v) for v in row[2:]])
    return {k: np.array(v) for k, v in by_image.items()}


def assert_same_poses(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: poses on other images"
    for image, r in ref.items():
        g = got[image]
        assert g.shape == r.shape, f"{what}: {image}: {len(g)} poses, torch path {len(r)}"
        # the same persons, matched by box (equal scores may be listed in either order)
        order = [int(np.abs(g[:, 1:5] - box).max(axis=1).argmin()) for box in r[:, 1:5]]
        assert sorted(order) == list(range(len(r))), f"{what}: {image}: poses do not pair up"
        g = g[order]
        np.testing.assert_allclose(g[:, 1:5], r[:, 1:5], rtol=0, atol=BOX_ATOL, err_msg=f"{what}: {image} boxes")
        kg, kr = g[:, 5:].reshape(len(g), -1, 3), r[:, 5:].reshape(len(r), -1, 3)
        np.testing.assert_allclose(kg[..., :2], kr[..., :2], rtol=KP_RTOL, atol=KP_ATOL, err_msg=f"{what}: {image} keypoints")
        np.testing.assert_allclose(kg[..., 2], kr[..., 2], rtol=0, atol=PROB_ATOL, err_msg=f"{what}: {image} keypoint conf")
        np.testing.assert_allclose(g[:, 0], r[:, 0], rtol=0, atol=PROB_ATOL, err_msg=f"{what}: {image} scores")


def main_venv(*argv: object, cwd: Path) -> subprocess.CompletedProcess:
    r = run([sys.executable, "-m", "kapao", *argv], cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_predict_without_torch_equals_the_torch_path(shared, base, tmp_path, capsys):
    images = shared / "data" / "coco_mini" / "images"
    scenes = REPO / "src" / "kapao" / "assets" / "demo"  # synthetic, like the shipped model's training
    sources = [images, scenes]
    out = ["--save-json", "--save-csv", "--nosave", "--quiet", "--project", tmp_path]
    # the main venv: the shipped safetensors on the torch backend, and a dynamic ONNX export of it
    main_venv("predict", *sources, "--backend", "torch", "--weights", default_weights(), "--imgsz", IMGSZ,
              *out, "--name", "torch", cwd=tmp_path)
    exported = tmp_path / "kapao_n_synth.onnx"
    main_venv("export", "--weights", default_weights(), "--format", "onnx", "--dynamic", "--imgsz", IMGSZ,
              "--out", exported, cwd=tmp_path)
    # the base venv: that ONNX file, and the default model (the shipped ONNX, default size)
    for name, args in (("onnx", ["--weights", exported, "--imgsz", IMGSZ]), ("default", [])):
        r = base("kapao", "predict", *sources, *args, *out, "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "onnxruntime" in r.stdout, r.stdout  # the run summary names the backend
    ref = read_poses(tmp_path / "torch")
    assert sum(len(v) for v in ref.values()) >= 10, "too few poses to compare"
    for name in ("onnx", "default"):
        assert_same_poses(read_poses(tmp_path / name), ref, name)
        got = json.loads((tmp_path / name / "predictions.json").read_text())
        want = json.loads((tmp_path / "torch" / "predictions.json").read_text())
        assert len(got) == len(want) and sorted(d["image_id"] for d in got) == sorted(d["image_id"] for d in want)
    with capsys.disabled():
        print(f"\nno-torch predict: {sum(len(v) for v in ref.values())} poses on {len(ref)} images, equal to the torch path")


def test_demo_runs_without_torch(base, tmp_path):
    r = base("kapao", "demo", "--project", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model: kapao_n_synth.onnx (kapao-n, 17 keypoints)" in r.stdout and "best val OKS AP 0.516" in r.stdout
    assert "OKS AP on these scenes (val preset)" in r.stdout
    assert len(json.loads((tmp_path / "exp" / "predictions.json").read_text())) >= 6
