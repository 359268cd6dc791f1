"""coremltools, and what the CoreML exporter and the CoreML sessions share: the leaf module both import.

Private uses:
- import_coremltools: coremltools imports executorch, torchao, transformers, scikit-learn and scipy at import time
  only to learn whether they exist (coremltools._deps, to convert EXIR programs, torchao-quantized modules and
  scikit-learn models, none of which pit-export hands it): ~200 MB of modules in every process that converts or
  reads a package. They are hidden (None in sys.modules) while it imports, and importable again afterwards.
- blob_storage: coremltools' weight.bin reader and writer (libmilstoragepython._BlobStorageReader / _Writer), which
  export/coreml.py's merge_functions streams blobs through; outside the versions it falls back to
  ct.utils.save_multifunction.

Shared, no private API: causal_mask, the additive mask of the CoreML programs' interface.
"""

from __future__ import annotations

import sys

import numpy as np

from .versions import Patch, Upstream, skip

WRITTEN_FOR = {"coremltools": ("9.0", "9.1")}
_PROBED_ONLY = ("executorch", "torchao", "transformers", "sklearn", "scipy")
SKIP_PROBES = Patch(
    "coremltools: imported without its optional probes",
    WRITTEN_FOR,
    # the flags coremltools._deps sets from those imports (it probes each in a try/except ImportError)
    tuple(Upstream("coremltools._deps", flag) for flag in ("_HAS_EXECUTORCH", "_HAS_TORCHAO", "_HAS_HF", "_HAS_SCIPY")),
)
_STORAGE = "coremltools.libmilstoragepython"
# MIL blob dtypes -> the suffix of the blob storage's read_*/write_* methods
BLOB_KINDS = {
    "FLOAT32": "float",
    "FLOAT16": "fp16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT4": "int4",
    "UINT4": "uint4",
    "UINT1": "uint1",
    "UINT2": "uint2",
    "UINT3": "uint3",
    "UINT6": "uint6",
    "INT16": "int16",
    "UINT16": "uint16",
    "INT32": "int32",
    "UINT32": "uint32",
}
BLOB_STORAGE = Patch(
    "coremltools: weight.bin read and written blob by blob",
    WRITTEN_FOR,
    (
        Upstream(_STORAGE, "_BlobStorageReader.__init__", ("self", "arg0")),  # a pybind11 class: its docstring
        Upstream(_STORAGE, "_BlobStorageWriter.__init__", ("self", "file_name", "truncate_file")),
        *(Upstream(_STORAGE, f"_BlobStorageReader.read_{k}_data", ("self", "arg0")) for k in BLOB_KINDS.values()),
        *(Upstream(_STORAGE, f"_BlobStorageWriter.write_{k}_data", ("self", "arg0")) for k in BLOB_KINDS.values()),
    ),
)
PATCHES = (SKIP_PROBES, BLOB_STORAGE)


def import_coremltools():
    """`import coremltools`, without the optional packages it would only probe for (within SKIP_PROBES' versions)."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    if not SKIP_PROBES.applies():
        import coremltools

        return coremltools
    hidden = [m for m in _PROBED_ONLY if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))  # None: "import m" raises ImportError
    try:
        import coremltools  # noqa: F401
    except ImportError as e:  # it needs one of them now: import it as it is
        for m in list(sys.modules):
            if m == "coremltools" or m.startswith("coremltools."):
                del sys.modules[m]
        _unhide(hidden)
        skip(SKIP_PROBES, f"coremltools needs a hidden module ({e})")
        import coremltools  # noqa: F401
    finally:
        _unhide(hidden)
    return sys.modules["coremltools"]


def _unhide(hidden: list[str]) -> None:
    for m in hidden:
        if m in sys.modules and sys.modules[m] is None:
            del sys.modules[m]


def blob_storage():
    """(reader class, writer class) of coremltools' weight.bin storage, or None outside BLOB_STORAGE's versions."""
    if not BLOB_STORAGE.applies():
        return None
    import_coremltools()
    try:
        from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter
    except ImportError as e:
        skip(BLOB_STORAGE, f"{_STORAGE} changed ({e})")
        return None
    return _BlobStorageReader, _BlobStorageWriter


def causal_mask(start: int, n: int, neg: float, window: int | None = None) -> np.ndarray:
    """[1, 1, n, start + n] additive mask: query i (position start + i) sees keys 0..start + i (the last `window` of
    them for a sliding layer)."""
    q, k = start + np.arange(n)[:, None], np.arange(start + n)[None, :]
    allowed = (k <= q) if window is None else (k <= q) & (k > q - window)
    return np.where(allowed, 0.0, neg).astype(np.float32)[None, None]
