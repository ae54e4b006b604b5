"""Registry names: download into the cache from a local HTTP server, verification, failures."""

from __future__ import annotations

import hashlib
import signal
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from kapao.cli.main import main
from kapao.errors import KapaoError
from kapao.weights import REGISTRY, RegisteredWeights, cache_dir, fetch, load
from kapao.weights.download import weights_url


class Server:
    """A real HTTP server on 127.0.0.1 serving `root`, recording every request path.

    Special files: `short.pt` announces 1000 bytes and sends 10; `stall.pt` sends 10 bytes then
    waits until the server stops; `page.pt` is served as an HTML page."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.lstrip("/")
                if name in ("short.pt", "stall.pt"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.wfile.flush()
                    if name == "stall.pt":
                        server.release.wait(10)
                    return
                if name == "page.pt":
                    body = b"<html><body>Virus scan warning</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    s = Server(root)
    yield s
    s.stop()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "kapao_home"
    monkeypatch.setenv("KAPAO_HOME", str(h))
    monkeypatch.delenv("KAPAO_WEIGHTS_URL", raising=False)
    return h


def blob(n: int = 300_000) -> bytes:
    return np.random.default_rng(1).bytes(n)


def test_registry_facts():
    assert list(REGISTRY) == [
        "kapao_s_coco", "kapao_m_coco", "kapao_l_coco", "kapao_s_crowdpose", "kapao_m_crowdpose", "kapao_l_crowdpose",
    ]  # fmt: skip
    s = REGISTRY["kapao_s_coco"]
    assert (s.model, s.dataset, s.input_size, s.filename) == ("kapao-s", "coco", 1280, "kapao_s_coco.pt")
    assert s.reported_ap == {"coco_val2017": 63.0, "coco_val2017_tta": 64.3, "coco_test_dev_tta": 63.8}
    assert REGISTRY["kapao_l_crowdpose"].reported_ap == {"crowdpose_test_tta": 68.9}
    assert s.gdrive_id in s.url and s.sha256 is None and s.size is None
    assert weights_url(s, "http://mirror/w/") == "http://mirror/w/kapao_s_coco.pt"


def test_cache_dir(home, monkeypatch):
    assert cache_dir() == home / "weights"
    monkeypatch.delenv("KAPAO_HOME")
    assert cache_dir() == Path("~/.cache/kapao/weights").expanduser()


def test_download_verify_and_reuse(server, home):
    data = blob()
    (server.root / "kapao_m_coco.pt").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    path = fetch("kapao_m_coco", base_url=server.url, sha256=digest, progress=False)
    assert path == home / "weights" / "kapao_m_coco.pt" and path.read_bytes() == data
    assert server.requests == ["/kapao_m_coco.pt"]
    assert fetch("kapao_m_coco", base_url=server.url, progress=False) == path  # cached: no request
    assert fetch("kapao_m_coco", base_url=server.url, sha256=digest, progress=False) == path
    assert server.requests == ["/kapao_m_coco.pt"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["kapao_m_coco.pt"]


def test_load_by_name_downloads_then_uses_cache(server, home, golden, monkeypatch):
    (server.root / "kapao_s_coco.pt").symlink_to(golden / "e2e" / "kapao_s_coco_seed0.pt")
    monkeypatch.setenv("KAPAO_WEIGHTS_URL", server.url)
    model, meta = load("kapao_s_coco", progress=False)
    assert meta.registry is REGISTRY["kapao_s_coco"] and meta.format == "official"
    assert meta.source == home / "weights" / "kapao_s_coco.pt"
    assert meta.config.name == "kapao-s" and meta.schema.num_keypoints == 17
    assert server.requests == ["/kapao_s_coco.pt"]
    load("kapao_s_coco.pt", progress=False)  # the official demo spelling resolves to the same entry
    assert server.requests == ["/kapao_s_coco.pt"]


def test_checksum_mismatch_leaves_nothing(server, home):
    (server.root / "kapao_l_coco.pt").write_bytes(blob())
    with pytest.raises(KapaoError, match=r"kapao_l_coco\.pt: sha256 mismatch"):
        fetch("kapao_l_coco", base_url=server.url, sha256="ab" * 32, progress=False)
    assert list((home / "weights").iterdir()) == []
    # a registry entry with a published checksum is verified without being asked
    entry = RegisteredWeights("kapao_l_coco", "kapao-l", "coco", "x", sha256="cd" * 32)
    with pytest.raises(KapaoError, match="sha256 mismatch"):
        fetch(entry, base_url=server.url, progress=False)
    entry = RegisteredWeights("kapao_l_coco", "kapao-l", "coco", "x", size=123)
    with pytest.raises(KapaoError, match="expected 123"):
        fetch(entry, base_url=server.url, progress=False)
    assert list((home / "weights").iterdir()) == []


def test_checksum_mismatch_cli(server, home, tmp_path, capsys, monkeypatch):
    (server.root / "kapao_s_crowdpose.pt").write_bytes(blob())
    monkeypatch.setenv("KAPAO_WEIGHTS_URL", server.url)
    out = tmp_path / "out.safetensors"
    code = main(["convert", "kapao_s_crowdpose", str(out), "--sha256", "0" * 64])
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # the progress bar comes first
    assert code == 1 and "Traceback" not in err and err.count("error") == 1
    assert last.startswith("kapao convert: error: ") and "sha256 mismatch" in last and "kapao_s_crowdpose.pt" in last
    assert list((home / "weights").iterdir()) == [] and not out.exists()


def test_unwritable_cache(server, tmp_path, monkeypatch):
    (tmp_path / "home_is_a_file").write_text("x")
    monkeypatch.setenv("KAPAO_HOME", str(tmp_path / "home_is_a_file"))
    with pytest.raises(KapaoError, match=r"home_is_a_file/weights: cannot write the weights cache .*KAPAO_HOME"):
        fetch("kapao_s_coco", base_url=server.url, progress=False)
    assert server.requests == []


def test_unknown_name(home):
    with pytest.raises(KapaoError) as e:
        load("kapao_xl_coco")
    msg = str(e.value)
    assert msg.startswith("kapao_xl_coco: unknown weights name")
    assert all(name in msg for name in REGISTRY)


def test_http_404(server, home):
    with pytest.raises(KapaoError, match=r"kapao_m_crowdpose\.pt: HTTP 404 .*KAPAO_WEIGHTS_URL"):
        fetch("kapao_m_crowdpose", base_url=server.url, progress=False)
    assert list((home / "weights").iterdir()) == []


def test_unreachable_server(home):
    with pytest.raises(KapaoError, match="cannot download kapao_m_crowdpose"):
        fetch("kapao_m_crowdpose", base_url="http://127.0.0.1:9", progress=False)
    assert list((home / "weights").iterdir()) == []


def test_short_transfer_and_html_page(server, home):
    for name, pattern in (("short", "stopped after 10 of 1000 bytes|cannot download"), ("page", "web page")):
        entry = RegisteredWeights(name, "kapao-s", "coco", "x")
        with pytest.raises(KapaoError, match=pattern):
            fetch(entry, base_url=server.url, progress=False)
    assert list((home / "weights").iterdir()) == []


def test_interrupted_download_leaves_nothing(server, home):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            fetch(RegisteredWeights("stall", "kapao-s", "coco", "x"), base_url=server.url, progress=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert server.requests == ["/stall.pt"]
    assert list((home / "weights").iterdir()) == []
