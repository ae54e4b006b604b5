"""Read a `torch.save` archive without running its pickle.

A checkpoint pickle is a program: every global it names is imported and called while loading, so a
plain `torch.load(weights_only=False)` of an untrusted file can run anything. Here the pickle is
interpreted by an unpickler that resolves globals from a fixed table instead of importing them:

* the classes of an official KAPAO/YOLOv5 model (`models.common.*`, `models.yolo.*`,
  `models.experimental.*`) and of torch (`torch.nn.modules.<file>.<Class>`) become inert
  `StandIn` objects that only keep their pickled state (no `__init__`, no `__setstate__` of the
  real class ever runs);
* tensors are rebuilt by our own functions from the raw storage records of the zip archive;
* numpy arrays, dtypes and scalars become inert stand-ins that can be decoded to plain numbers;
* `collections.OrderedDict`, `set`, `frozenset`, `torch.Size`, torch dtypes and the latin-1
  `_codecs.encode` that protocol 2 uses for bytes are the only real callables.

Any other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) is refused with a
`KapaoError` naming the file and the global, before it could be called.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kapao.errors import KapaoError

# Storage class (as pickled in persistent ids: `torch.HalfStorage`, ...) -> element dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double",
    "int64", "int32", "int16", "int8", "uint8", "long", "int", "short", "bool",
}  # fmt: skip
_CLASS_MODULES = re.compile(r"(models\.(common|yolo|experimental)|torch\.nn\.modules\.[a-z_]+)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMPY_CODE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}|[?bBhHiIlLqQefdgFD]")


class StandIn:
    """Inert replacement for a pickled class instance: keeps the constructor args and state only."""

    qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    @property
    def attrs(self) -> dict[str, Any]:
        """The pickled instance attributes (`__dict__`, merged with slots if any)."""
        s = self.state
        if isinstance(s, tuple) and len(s) == 2 and (s[0] is None or isinstance(s[0], dict)):
            return {**(s[0] or {}), **(s[1] or {})}
        return s if isinstance(s, dict) else {}

    def __repr__(self) -> str:
        return f"<stand-in {self.qualname}>"


class NdarrayStandIn(StandIn):
    """`numpy.ndarray` as pickled by `_reconstruct` + `__setstate__`; `to_numpy()` decodes it."""

    qualname = "numpy.ndarray"

    def to_numpy(self) -> np.ndarray | None:
        s = self.state
        if not (isinstance(s, tuple) and len(s) == 5):
            return None
        _, shape, dtype, fortran, raw = s
        dt = dtype.to_numpy() if isinstance(dtype, DtypeStandIn) else None
        if dt is None or not isinstance(raw, (bytes, bytearray)) or fortran:
            return None
        try:
            return np.frombuffer(bytes(raw), dtype=dt).reshape(tuple(int(v) for v in shape)).copy()
        except (ValueError, TypeError):
            return None


class DtypeStandIn(StandIn):
    """`numpy.dtype(code, align, copy)` with its pickled byte order; decodes only plain numbers."""

    qualname = "numpy.dtype"

    def to_numpy(self) -> np.dtype | None:
        code = self.args[0] if self.args else None
        if not (isinstance(code, str) and _NUMPY_CODE.fullmatch(code)):
            return None
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        dt = np.dtype(code)
        return dt.newbyteorder(order) if order in ("<", ">", "=") else dt


def _numpy_reconstruct(cls: Any, shape: Any = (0,), dtype_code: Any = b"b") -> NdarrayStandIn:
    return NdarrayStandIn()


def _numpy_scalar(dtype: Any, raw: Any = None) -> Any:
    """A numpy scalar (e.g. a float64 fitness) -> a Python number, or the inert stand-in."""
    dt = dtype.to_numpy() if isinstance(dtype, DtypeStandIn) else None
    if dt is not None and isinstance(raw, (bytes, bytearray)) and len(raw) == dt.itemsize:
        return np.frombuffer(bytes(raw), dtype=dt)[0].item()
    return StandIn()


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(<latin-1 str>, 'latin1').
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode(encoding)


class _StorageType:
    """Marker for a storage class named in a persistent id."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any, **__: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise pickle.UnpicklingError("tensor without a storage record")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise pickle.UnpicklingError("malformed tensor record")
    try:
        return storage.as_strided(tuple(size), tuple(stride), offset)
    except RuntimeError as e:
        raise pickle.UnpicklingError(f"tensor record out of its storage's bounds ({e})") from None


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype) or not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("malformed tensor record")
    return _rebuild_tensor(storage.view(torch.uint8).view(dtype), offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,
    "builtins.frozenset": frozenset,
    "__builtin__.frozenset": frozenset,
    "_codecs.encode": _codecs_encode,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.Size": torch.Size,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": DtypeStandIn,
    "numpy.ndarray": NdarrayStandIn,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves globals from the allow-list above; storages come from `records` (zip archive).

    The pure-Python unpickler (not the C one) so that BUILD can be restricted too: pickled state
    may only be applied to stand-ins, never to a tensor or a container (`Tensor.__setstate__`
    would accept hooks and storages).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, path: Path, records: Callable[[str], bytes] | None, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._records = records
        self._big_endian = big_endian
        self._storages: dict[str, torch.Tensor] = {}
        self._stand_ins: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in _FUNCTIONS:
            return _FUNCTIONS[qualname]
        if module == "torch" and name.endswith("Storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if _CLASS_MODULES.fullmatch(module) and _IDENTIFIER.fullmatch(name):
            if qualname not in self._stand_ins:
                self._stand_ins[qualname] = type(name, (StandIn,), {"qualname": qualname})
            return self._stand_ins[qualname]
        raise KapaoError(
            f"{self._path}: refused to load: its pickle references '{qualname}', which no KAPAO checkpoint "
            "contains (it could run code); use an official KAPAO .pt or a file written by kapao convert"
        )

    def _load_build(self) -> None:
        if not isinstance(self.stack[-2], StandIn):
            raise pickle.UnpicklingError(f"pickled state for a {type(self.stack[-2]).__name__} is not allowed")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid[:5]
        if (
            not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int))
            or numel < 0
        ):
            raise pickle.UnpicklingError("malformed storage record")
        if key in self._storages:
            return self._storages[key]
        if self._records is None:
            raise pickle.UnpicklingError("a tensor outside a torch archive")
        raw = self._records(key)
        dtype = storage_type.dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if storage_type.name == "UntypedStorage":
            numel = len(raw)
        if len(raw) < numel * itemsize:
            raise pickle.UnpicklingError(f"storage record {key!r} holds {len(raw)} bytes, expected {numel * itemsize}")
        if numel == 0:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype)
            if self._big_endian and itemsize > 1:
                if dtype == torch.bfloat16:
                    raise pickle.UnpicklingError("big-endian bfloat16 storages are not supported")
                t = torch.from_numpy(t.numpy().byteswap().copy())
        self._storages[key] = t
        return t


_UNPICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError,
    AttributeError, IndexError, RuntimeError, OverflowError, MemoryError,
)  # fmt: skip


def _unpickle(data: bytes, path: Path, records: Callable[[str], bytes] | None, big_endian: bool = False) -> Any:
    try:
        return _RestrictedUnpickler(data, path, records, big_endian).load()
    except KapaoError:
        raise
    except _UNPICKLE_ERRORS as e:
        raise KapaoError(
            f"{path}: not a readable checkpoint (its pickle is corrupt or unsupported: {str(e)[:120]}); "
            "download or export the file again"
        ) from None


def load_torch_archive(path: str | Path) -> Any:
    """The object a `torch.save` zip archive holds, with inert stand-ins for model classes.

    Tensors keep their stored dtype and are on the CPU whatever device they were saved from.
    Raises KapaoError for anything that is not a well-formed archive or references code.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise KapaoError(f"{path}: a zip file but not a torch checkpoint (no <name>/data.pkl record)")
            prefix = pkls[0][: -len("data.pkl")]
            names = set(z.namelist())
            big_endian = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"

            def record(key: str) -> bytes:
                if f"{prefix}data/{key}" not in names:
                    raise pickle.UnpicklingError(f"storage record {key!r} is missing")
                return z.read(f"{prefix}data/{key}")

            return _unpickle(z.read(pkls[0]), path, record, big_endian)
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise KapaoError(f"{path}: file not found; check the path") from None
        raise KapaoError(f"{path}: truncated or corrupt checkpoint ({e}); download or export it again") from None


def load_plain_pickle(path: str | Path) -> Any:
    """The first object of a plain pickle file, through the same restricted unpickler (no storages).

    Used to tell a pre-1.6 torch file or an arbitrary pickle apart from a checkpoint without
    running it."""
    path = Path(path)
    return _unpickle(path.read_bytes(), path, None)
