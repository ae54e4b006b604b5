"""Crafted malicious checkpoints are refused before their payload can run."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from kapao.cli.main import main
from kapao.errors import KapaoError
from kapao.weights import load
from kapao.weights.safe_pickle import load_torch_archive


def call_pickle(module: str, name: str, *args: object) -> bytes:
    """Protocol-2 pickle of `module.name(*args)` written by hand (GLOBAL + REDUCE), so that
    building it imports and runs nothing."""
    arg_bytes = pickle.dumps(tuple(args), protocol=2)[2:-1]  # drop PROTO header and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + arg_bytes + b"R."


def in_dict(payload: bytes) -> bytes:
    """{'model': <payload>} around a call pickle, as a checkpoint would nest it."""
    body = payload[2:-1]
    return b"\x80\x02}X\x05\x00\x00\x00model" + body + b"s."


def torch_zip(path: Path, pkl: bytes, prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/version", b"3\n")
    return path


def payloads(marker: Path) -> list[tuple[str, bytes]]:
    m = str(marker)
    return [
        ("os.system", call_pickle("os", "system", f"touch {m}")),
        ("posix.system", call_pickle("posix", "system", f"touch {m}")),
        ("builtins.eval", call_pickle("builtins", "eval", f"open({m!r}, 'w').write('x')")),
        ("builtins.exec", in_dict(call_pickle("builtins", "exec", f"open({m!r}, 'w').write('x')"))),
        ("subprocess.Popen", in_dict(call_pickle("subprocess", "Popen", ["touch", m]))),
        ("builtins.getattr", call_pickle("builtins", "getattr", "os", "system")),
    ]


def test_payloads_are_live(tmp_path):
    """The crafted pickles really do run their payload under a plain unpickler (so the refusal
    tests below test something)."""
    marker = tmp_path / "ran"
    pickle.loads(call_pickle("os", "system", f"touch {marker}"))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["plain", "zip"])
def test_malicious_pickles_refused(tmp_path, kind):
    marker = tmp_path / "payload_ran"
    for qualname, pkl in payloads(marker):
        f = tmp_path / f"evil_{qualname}.pt"
        if kind == "plain":
            f.write_bytes(pkl)
        else:
            torch_zip(f, pkl)
        with pytest.raises(KapaoError) as e:
            load(f)
        msg = str(e.value)
        assert str(f) in msg and f"'{qualname}'" in msg and "refused" in msg, msg
        assert "\n" not in msg
        assert not marker.exists(), f"payload of {qualname} ran"


def test_torch_save_of_malicious_object_refused(tmp_path):
    """A file written by torch.save itself, holding an object whose __reduce__ calls os.system."""
    marker = tmp_path / "payload_ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "epoch": 1, "w": torch.ones(3)}, f)
    with pytest.raises(KapaoError, match=r"evil\.pt: refused to load: .*'posix\.system'"):
        load_torch_archive(f)
    assert not marker.exists()
    code = main(["convert", str(f), str(tmp_path / "out.safetensors")])
    assert code == 1 and not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_malicious_refused_through_cli(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    f = torch_zip(tmp_path / "evil.pt", in_dict(call_pickle("os", "system", f"touch {marker}")))
    code = main(["convert", str(f), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "refused" in err and "'os.system'" in err and str(f) in err
    assert not marker.exists()


def test_torch_file_without_official_model(tmp_path):
    """A harmless torch file that is not a KAPAO checkpoint (a bare state dict)."""
    f = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.ones(2)}}, f)
    assert torch.equal(load_torch_archive(f)["model"]["w"], torch.ones(2))
    with pytest.raises(KapaoError, match=r"state\.pt: no official model object under 'model' or 'ema'"):
        load(f)


def test_state_only_on_stand_ins(tmp_path):
    """BUILD (pickled state) is applied to stand-ins only, never to real objects such as an
    OrderedDict or a tensor (Tensor.__setstate__ accepts hooks and storages)."""
    pkl = b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb."
    assert pickle.loads(pkl).a == 1  # a plain unpickler sets the attribute
    f = torch_zip(tmp_path / "build.pt", pkl)
    with pytest.raises(KapaoError, match=r"build\.pt: not a readable checkpoint .*state for a OrderedDict"):
        load_torch_archive(f)


def test_unknown_model_classes_are_inert(tmp_path):
    """Any class under the official module paths becomes a stand-in: calling it runs nothing."""
    marker = tmp_path / "payload_ran"
    f = torch_zip(tmp_path / "odd.pt", in_dict(call_pickle("models.common", "system", f"touch {marker}")))
    obj = load_torch_archive(f)["model"]
    assert obj.qualname == "models.common.system" and obj.args == (f"touch {marker}",)
    with pytest.raises(KapaoError, match=r"odd\.pt: no official model object"):
        load(f)
    assert not marker.exists()
