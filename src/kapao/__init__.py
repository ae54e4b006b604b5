"""kapao: KAPAO (Keypoints and Poses as Objects) multi-person pose estimation as a package."""

from kapao.errors import KapaoError
from kapao.models.kapao import KapaoModel, build_model
from kapao.schema import KeypointSchema

__version__ = "0.1.0"

__all__ = ["KapaoError", "KapaoModel", "KeypointSchema", "build_model", "__version__"]
