"""Mutation check of the validator: each deliberate fault below is applied to pit_export/validate.py in turn (in a
fresh process, in memory: the file on disk is never touched) and the gate tests are run against it. Every fault must
make them fail; one that passes means a gate nobody guards.

    python -m tests.mutate            # all faults, the gate tests on the folded PyTorch artifact
    python -m tests.mutate --json F   # also writes the outcome per fault
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = ROOT / "pit_export" / "validate.py"

# (name, text in validate.py, replacement)
MUTATIONS = [
    ("W E - I error zeroed", "err = WE - ref.interface_target", "err = (WE - ref.interface_target) * 0.0"),
    ("<= gate operator flipped", '"<=": lambda v, t: v <= t', '"<=": lambda v, t: v >= t'),
    (">= gate operator flipped", '">=": lambda v, t: v >= t', '">=": lambda v, t: v <= t'),
    ("every gate passes", "v is not None and bool(OPS[op](v, thr))", "True"),
    (
        "artifact compared with itself (wrong reference)",
        "r = ref.window_logits(i, slice(c, c + LOGIT_ROWS)).astype(np.float64)",
        "r = art_w[c : c + LOGIT_ROWS].astype(np.float64)",
    ),
    (
        "round trip against its own output (wrong target)",
        "np.abs(got[:, c].astype(np.float64) - want)",
        "np.abs(got[:, c].astype(np.float64) - got[:, c])",
    ),
    ("round-trip argmax against itself", "(got.argmax(-1) == best_arg)", "(best_arg == best_arg)"),
    (
        "windows silently empty",
        "return np.asarray(heldout[pick, :L], dtype=np.int64)",
        "return np.asarray(heldout[pick, :0], dtype=np.int64)",
    ),
    (
        "greedy tokens compared with themselves",
        "a, b = ref.greedy, greedy_generate(art, ref.greedy_prompt, len(ref.greedy))",
        "a = b = ref.greedy",
    ),
    (
        "KL of the reference with itself",
        '"kl": (np.exp(lr) * (lr - la)).sum(-1)',
        '"kl": (np.exp(lr) * (lr - lr)).sum(-1)',
    ),
    ("top-1 of the reference with itself", "(ref.argmax(-1) == art.argmax(-1))", "(ref.argmax(-1) == ref.argmax(-1))"),
    (
        "max |delta| of the reference with itself",
        '"abs": np.abs(ref - art).max(-1)',
        '"abs": np.abs(ref - ref).max(-1)',
    ),
    ("perplexity of the reference twice", '"nll_art": -la[idx, targets]', '"nll_art": -lr[idx, targets]'),
    ("cosine of the reference with itself", "cos = (ref * art).sum(-1)", "cos = (ref * ref).sum(-1) + 0 * art.sum(-1)"),
]

RUNNER = """
import sys
import pit_export.validate as v
src = open(v.__file__).read()
old, new = sys.argv[1], sys.argv[2]
assert src.count(old) == 1, f"mutation site not found once: {old!r}"
exec(compile(src.replace(old, new), v.__file__, "exec"), v.__dict__)
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--no-header", "tests/test_gates.py", "-k", "torch"]))
"""


def run(name: str, old: str, new: str) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", RUNNER, old, new], cwd=ROOT, capture_output=True, text=True)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    site_missing = "mutation site not found" in p.stdout + p.stderr
    return {
        "mutation": name,
        "caught": p.returncode != 0 and not site_missing,
        "site_found": not site_missing,
        "seconds": round(time.monotonic() - t0, 1),
        "last_line": tail[0][:200],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the outcome per mutation here")
    args = ap.parse_args(argv)
    for name, old, _ in MUTATIONS:  # every site exists before anything runs
        if VALIDATE.read_text().count(old) != 1:
            print(f"mutation site not found once in validate.py: {name}")
            return 2
    control = run("control: no mutation", "def validate(", "def validate(")
    if not control["site_found"] or control["caught"]:
        print(f"the gate tests fail without any mutation: {control['last_line']}")
        return 2
    results = []
    for name, old, new in MUTATIONS:
        r = run(name, old, new)
        results.append(r)
        print(f"{'caught' if r['caught'] else 'MISSED'}  {r['seconds']:6.1f}s  {name}", flush=True)
    caught = sum(r["caught"] for r in results)
    print(f"{caught}/{len(results)} mutations caught")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
