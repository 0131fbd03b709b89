import os
import sys
import tempfile
from pathlib import Path

# backend="auto" caches its engine choice: keep the test runs' choices out of the user's ~/.cache/edge
os.environ.setdefault("EDGE_ENGINE_CACHE", tempfile.mkdtemp(prefix="edge-engine-choices-"))

sys.path.insert(0, str(Path(__file__).parent))
