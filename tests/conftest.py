import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# backend="auto" caches its engine choice: keep the test runs' choices out of the user's ~/.cache/edge, in a folder
# removed when the run ends (one was left in /tmp per run before)
if "EDGE_ENGINE_CACHE" not in os.environ:
    _choices = tempfile.mkdtemp(prefix="edge-engine-choices-")
    os.environ["EDGE_ENGINE_CACHE"] = _choices
    atexit.register(shutil.rmtree, _choices, True)
# `edge update --taps` keeps its tapped copies (edge.route.tapcache): the same, out of ~/.cache/edge/taps
if "EDGE_TAP_CACHE" not in os.environ:
    _taps = tempfile.mkdtemp(prefix="edge-tap-cache-")
    os.environ["EDGE_TAP_CACHE"] = _taps
    atexit.register(shutil.rmtree, _taps, True)

sys.path.insert(0, str(Path(__file__).parent))

# session fixtures: the small models and adapters the outside audits build in-session (no demo cache needed)
from _insession import embedding_tflite, large_fp32_onnx, mlp_kit, small_models  # noqa: E402, F401
