"""onnxscript's rewrite rules forget the last graph they matched (private: onnxscript.rewriter._matcher).

The rules torch.onnx.export's optimizer applies are module-level singletons, and each one's matcher keeps the last
graph it matched, and through its initializers every traced weight: 0.5 GB stayed resident at 135M parameters after
the export had returned. Every match() sets these fields again before reading them, so clearing them is safe.
"""

from __future__ import annotations

import gc

from .versions import Patch, Upstream, skip

WRITTEN_FOR = {"onnxscript": ("0.7.2", "0.8")}
MATCHER = "onnxscript.rewriter._matcher"
# what SimplePatternMatcher.match() stores on the matcher (tests/test_compat.py checks its source still does)
MATCH_STATE = ("_graph", "_current_node", "_match", "_tracer")
FORGET_MATCHED_GRAPHS = Patch(
    "onnxscript: rewrite-rule matchers forget their last graph",
    WRITTEN_FOR,
    (
        Upstream(MATCHER, "PatternMatcher"),
        Upstream(
            MATCHER,
            "SimplePatternMatcher.match",
            ("self", "model", "graph_or_function", "node", "verbose", "remove_nodes", "tracer"),
        ),
    ),
)
PATCHES = (FORGET_MATCHED_GRAPHS,)


def forget_matched_graphs() -> int:
    """Clear the match state of every live rewrite-rule matcher; returns how many held some (0 when skipped)."""
    if not FORGET_MATCHED_GRAPHS.applies():
        return 0
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError as e:
        skip(FORGET_MATCHED_GRAPHS, f"{MATCHER}.PatternMatcher is gone ({e})")
        return 0
    cleared = 0
    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            state = vars(obj)
            held = [a for a in MATCH_STATE if state.get(a) is not None]
            for attr in held:
                setattr(obj, attr, None)
            cleared += bool(held)
    return cleared
