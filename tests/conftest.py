"""Shared fixtures. `shared/` (goldens and real data) lies beside the checkout; tests that need it
fail when it is missing under CI and are skipped only on a developer machine without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# OpenVINO ships its own oneDNN/TBB; loaded into the one long pytest process beside torch's and ONNX
# Runtime's, a later, unrelated test segfaulted at random points of the full suite (never in the
# OpenVINO tests, never in shorter runs). Its tests therefore run in their own process:
# `make test` runs them after the rest with KAPAO_OPENVINO_TESTS=1.
collect_ignore = [] if os.environ.get("KAPAO_OPENVINO_TESTS") == "1" else ["test_openvino.py"]


def shared_dir() -> Path:
    return Path(os.environ.get("KAPAO_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_dir()
    if not (root / "golden").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{root}: shared goldens are missing; CI must have ../shared beside the checkout")
        pytest.skip(f"{root} not present (set KAPAO_SHARED)")
    return root


@pytest.fixture(scope="session")
def golden(shared: Path) -> Path:
    return shared / "golden"


@pytest.fixture(autouse=True, scope="session")
def _kapao_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The export and weights caches of the whole run in a fresh folder (never the user's)."""
    os.environ["KAPAO_HOME"] = str(tmp_path_factory.mktemp("kapao_home"))


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    # The goldens were made with 2 torch threads; the same count keeps summation orders alike
    # (KAPAO_TEST_THREADS overrides it, e.g. to leave a core free for other work).
    torch.set_num_threads(int(os.environ.get("KAPAO_TEST_THREADS", "2")))
