"""Code that a test prepends to a subprocess script so that torch cannot be imported there (device side)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: device side must not import it")
sys.meta_path.insert(0, _NoTorch())
"""
