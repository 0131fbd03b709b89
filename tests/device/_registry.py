"""A real OCI registry (CNCF distribution, Debian's ``docker-registry``) on 127.0.0.1 for the fleet tests,
and the tiny model and adapters published through it.

Each :class:`LocalRegistry` runs its own process on a free loopback port with its storage in a
temp folder, so tests can kill it mid-download, restart it on the same port and data, tamper
with a stored blob, or copy its storage to start a stale mirror. The system service is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from _tiny import write_model  # tests/ is on sys.path (conftest; lab/bench_fleet.py adds it too)

__all__ = ["LocalRegistry", "registry_binary", "SKIP_REASON", "make_model", "make_adapter"]

SKIP_REASON = (
    "the CNCF distribution registry binary is not installed; run `sudo scripts/install-registry.sh` "
    "(apt-get install docker-registry) to run the fleet tests"
)

_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def registry_binary() -> str | None:
    """Path of the registry binary (``docker-registry`` on Debian, ``registry`` upstream), or None."""
    for name in ("docker-registry", "registry"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """One registry process serving ``root`` on ``127.0.0.1:port``."""

    def __init__(self, root: Path, port: int | None = None, binary: str | None = None):
        self.binary = binary or registry_binary()
        if self.binary is None:
            raise FileNotFoundError(SKIP_REASON)
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> LocalRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root.parent / f"{self.root.name}-config.yml"
        cfg.write_text(_CONFIG.format(root=self.root / "data", port=self.port))
        log = open(self.root.parent / f"{self.root.name}-registry.log", "ab")  # noqa: SIM115 (kept by the process)
        self.proc = subprocess.Popen(
            [self.binary, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self.proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"registry on {self.host} did not answer within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the process (SIGKILL with ``kill=True``: a crash, connections cut mid-transfer)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (for tampering tests)."""
        algo, hexd = digest.split(":", 1)
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"

    def copy_storage(self, dst: Path) -> Path:
        """A copy of the whole storage (start a :class:`LocalRegistry` on it for a stale mirror)."""
        shutil.copytree(self.root / "data", Path(dst) / "data")
        return Path(dst)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- fixture data: a model and adapters built with numpy and onnx only (shared with lab/bench_fleet.py) --
def make_model(path: Path, d_in: int = 256, d_hid: int = 256, d_out: int = 10, seed: int = 0):
    """A two-layer ONNX MLP with edge metadata (numpy and onnx only); returns its ``ModelInfo``."""
    from onnx import TensorProto, helper

    from edge.format.modelinfo import TensorInfo

    rng = np.random.default_rng(seed)
    stored = {
        "fc1.weight": (rng.standard_normal((d_in, d_hid)) * 0.1).astype(np.float32),  # stored transposed
        "fc2.weight": (rng.standard_normal((d_out, d_hid)) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Gemm", ["h1", "fc2.weight"], ["logits"], transB=1),
    ]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in), transposed=True),
        "fc2.weight": TensorInfo("fc2.weight", (d_out, d_hid)),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d_out])]
    return write_model(path, "fleet-mlp", nodes, inputs, outputs, stored, tensors)


def make_adapter(info, path: Path, name: str, nbytes: int, seed: int) -> Path:
    """A SHiRA-format adapter of about ``nbytes`` (12 bytes per entry) on ``fc1.weight``."""
    from edge.format.adapter import Adapter, SparseDelta

    shape = info.tensors["fc1.weight"].shape
    n = max(1, min(int(np.prod(shape)), nbytes // 12))
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(int(np.prod(shape)), n, replace=False))
    idx = np.stack(np.unravel_index(flat, shape)).astype(np.int32)
    delta = SparseDelta(idx, (rng.standard_normal(n) * 0.01).astype(np.float32))
    Adapter(name, info.fingerprint, {"fc1.weight": delta}, {"fc1.weight": tuple(shape)}, info={"seed": seed}).save(path)
    return path
