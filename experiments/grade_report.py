"""Accuracy of grade.py per kind of answer on tests/grade_cases.jsonl, beside math-verify's on the same cases.

    python experiments/grade_report.py [--misses]

A case is {"kind", "answer" (boxed into a completion) or "completion", "gold", "label"}; labels were written by
reasoning about the maths. Both graders see the same completion and gold; math-verify (test-only dependency,
`pip install math-verify`) gets verify(parse("$gold$"), parse(completion)). Also prints how long our calls took.
"""
import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the core modules
import grade  # noqa: E402

CASES = Path(__file__).resolve().parents[1] / "tests" / "grade_cases.jsonl"


def load_cases(path=CASES):
    """Rows of the case file, each with its completion filled in."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        r.setdefault("completion", f"Some reasoning first.\nSo the answer is $\\boxed{{{r.get('answer')}}}$.")
    return rows


def math_verify_grader():
    """math-verify's score(completion, gold), or None when it is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def score(completion, gold):
        try:
            return float(verify(parse(f"${gold}$"), parse(completion)))
        except Exception:  # a grader that raises has given no credit
            return 0.0
    return score


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--misses", action="store_true", help="list the cases each grader gets wrong")
    args = ap.parse_args()
    rows, mv = load_cases(), math_verify_grader()
    right = defaultdict(lambda: [0, 0, 0])  # kind -> [cases, ours right, math-verify right]
    took = []
    for r in rows:
        start = time.perf_counter()
        ours = grade.score(r["completion"], r["gold"]) == float(r["label"])
        took.append(time.perf_counter() - start)
        theirs = mv is not None and mv(r["completion"], r["gold"]) == float(r["label"])
        counts = right[r["kind"]]
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + ours, counts[2] + theirs
        if args.misses and not (ours and theirs):
            print(f"miss {'ours' if not ours else '    '} {'mv' if not theirs else '  '} {r['kind']:>13}: "
                  f"{r.get('answer', r['completion'])!r} vs {r['gold']!r} (label {r['label']})")
    print(f"| {'kind':<13} | cases | grade.py | math-verify |\n|---|---:|---:|---:|")
    for kind, (n, ours, theirs) in [*right.items(), ("all", [sum(c[i] for c in right.values()) for i in range(3)])]:
        print(f"| {kind:<13} | {n:>5} | {ours / n:>8.0%} | {theirs / n if mv else float('nan'):>11.0%} |")
    print(f"\ngrader {grade.GRADER_VERSION}: {len(rows)} cases, {sum(not r['label'] for r in rows)} wrong answers "
          f"among them; our calls: median {sorted(took)[len(took) // 2] * 1e3:.2f} ms, slowest {max(took) * 1e3:.1f} ms"
          + ("" if mv else "; math-verify not installed"))


if __name__ == "__main__":
    main()
