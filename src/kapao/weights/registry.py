"""The six official KAPAO weights, by name, with the facts published in the official README.

Download ids are those of the official `data/scripts/download_models.py` (Google Drive); the AP
numbers are the README's (COCO val2017 without/with TTA and test-dev with TTA; CrowdPose test with
TTA, scales 0.8/1/1.2 and flips -1/3/-1). All six were trained at input size 1280. Their sha256
and sizes were never published, so they are None here and not verified (they are verified for any
entry that has them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from kapao.errors import KapaoError

_GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
_GDRIVE_PAGE = "https://drive.google.com/file/d/{id}/view"


@dataclass(frozen=True)
class RegisteredWeights:
    name: str  # registry name, also the file stem (`kapao_s_coco` -> kapao_s_coco.pt)
    model: str  # shipped model config (`kapao-s`)
    dataset: str  # `coco` or `crowdpose` (selects the keypoint schema)
    gdrive_id: str
    reported_ap: dict[str, float] = field(default_factory=dict)  # split/setting -> AP (%)
    input_size: int = 1280
    sha256: str | None = None
    size: int | None = None  # bytes

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def url(self) -> str:
        return _GDRIVE_URL.format(id=self.gdrive_id)

    @property
    def page_url(self) -> str:
        """Where a person can download the file by hand."""
        return _GDRIVE_PAGE.format(id=self.gdrive_id)


def _coco(size: str, gid: str, val: float, val_tta: float, test_tta: float) -> RegisteredWeights:
    ap = {"coco_val2017": val, "coco_val2017_tta": val_tta, "coco_test_dev_tta": test_tta}
    return RegisteredWeights(f"kapao_{size}_coco", f"kapao-{size}", "coco", gid, ap)


def _crowdpose(size: str, gid: str, test_tta: float) -> RegisteredWeights:
    return RegisteredWeights(
        f"kapao_{size}_crowdpose", f"kapao-{size}", "crowdpose", gid, {"crowdpose_test_tta": test_tta}
    )


REGISTRY: MappingProxyType[str, RegisteredWeights] = MappingProxyType(
    {
        w.name: w
        for w in (
            _coco("s", "1hv0xwdbdf-Ym06Hpjy6wKyIklNmKmB99", 63.0, 64.3, 63.8),
            _coco("m", "1B-QGa99n7ZrxkgKCQ1XHnm6j0Y-lvOQz", 68.5, 69.6, 68.8),
            _coco("l", "1jYDfvRjhMoDf5xpMq1AuzdkFzUeLwt85", 70.6, 71.6, 70.3),
            _crowdpose("s", "1SmWwmqPwb_G6d9UPAFSUnWZ-4eaL9TTv", 63.8),
            _crowdpose("m", "1IqrAk-gBdcfONrlIT6d4ndaDqnlFmT0r", 67.1),
            _crowdpose("l", "146DW9ELzIBY2oDofPru446yLErxHrjJU", 68.9),
        )
    }
)


def looks_like_name(name: str) -> bool:
    """True for strings meant as a registry name rather than a path: a registered name (with or
    without `.pt`), or a bare word without a path separator or file suffix."""
    stem = name[:-3] if name.endswith(".pt") else name
    return stem in REGISTRY or not any(c in name for c in "/\\.")


def get(name: str) -> RegisteredWeights:
    """The registry entry for `name` (`kapao_s_coco` or `kapao_s_coco.pt`)."""
    key = name[:-3] if name.endswith(".pt") else name
    if key not in REGISTRY:
        raise KapaoError(f"{name}: unknown weights name and no such file; known names: {', '.join(REGISTRY)}")
    return REGISTRY[key]
