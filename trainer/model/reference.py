"""Access to the official ``segment-anything`` modeling code, the parity reference.

The package's ``__init__`` imports its predictor, which imports torchvision (not usable
beside the CPU torch build on our machines). The modeling code needs only torch, so we
register the package without running its ``__init__`` and import the submodules
directly. Used by tests and benchmarks; ``segment-anything==1.0`` is a test dependency.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_official_sam() -> types.ModuleType:
    """Return the ``segment_anything`` package with ``modeling`` and ``build_sam`` loaded."""
    if "segment_anything.build_sam" in sys.modules:
        return sys.modules["segment_anything"]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything==1.0 is needed as the reference: pip install -e '.[test]'")
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = pkg
    importlib.import_module("segment_anything.modeling")
    importlib.import_module("segment_anything.build_sam")
    return sys.modules["segment_anything"]
