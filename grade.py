"""Answer grading: pull the final answer out of a completion and decide if it equals the reference.

    extract_answer(text) -> str | None    last \\boxed{..} / \\fbox{..}; else the later of "answer is .." and "#### N"
    is_equiv(pred, gold) -> bool          normalised text equal, or same structure with equal values (the engine)
    score(completion, gold) -> float      1.0 / 0.0; gold may be a list of accepted answers (Minerva "answers")

Only the completion is graded: callers pass the generated text, never the prompt (a box in the prompt's
few-shot examples must not count). Equivalence is Hendrycks/PRM800K normalisation, then structure (matrices,
unions, tuples, intervals, lists, equations, inequalities), then values at the leaves: exact where both sides have
an exact value, so nothing is ever rounded, else evaluation at fixed pseudo-random points (the engine, below
the API: parse, exact values, values at points).

Leniency decisions (each tested both ways in tests/test_grade.py and tests/grade_cases.jsonl):
  - layout is ignored: spaces, \\left/\\right, \\! \\, \\quad, \\dfrac/\\tfrac, \\frac12, \\sqrt2, x^{2} vs x^2,
    $ and \\$, \\text{}/\\mathrm{} wrappers, thousands separators (1,000 == 1{,}000 == 1\\,000 == 1000), trailing
    ".", leading "+", unicode (π √ ≤ ≥ ≠ · × ÷ ∞ ± ² ³ ∪), plain math (pi/2, sqrt(2), exp(16), x**2).
  - units and degrees are dropped, never converted: 90^\\circ == 90, "5 cm" == 5; 90^\\circ != \\frac{\\pi}{2}.
  - percent is dropped: 10\\% == 10, but 10\\% != 0.1 (no scaling).
  - numbers are exact: 0.5 == \\frac{2}{4} == 5e-1, 2.50 == 2.5; but 0.33 != \\frac13 and 3.14 != \\pi.
  - radicals/pi/e/i and factorials are exact: \\sqrt{8} == 2\\sqrt2, e^{16}-1 == -1+exp(16), 1/2004! != 1/2006!.
  - other expressions are equal functions: \\frac{x}{2}-\\frac14 == \\frac{2x-1}{4}, \\frac{x^2-1}{x-1} == x+1,
    \\sin^2 x + \\cos^2 x == 1, to a relative 1e-8 at every point where both are defined; but 2 != 2x, |x| != x.
  - "x =", "f(x) =", "x \\in" prefixes are dropped (x=5 == 5), but x=5 != y=5; in a list only when every item has
    the same one. Equations are equal when proportional: y = 2x+3 == 2x - y + 3 = 0.
  - inequalities in one variable are intervals: x \\le 3 == (-\\infty, 3], 1 < x \\le 2 == (1, 2].
  - tuples and intervals are ordered and keep their brackets: (1,2) != (2,1), (1,2) != [1,2].
  - comma lists, \\{sets\\} and \\cup unions are unordered: "1,-2" == "-2, 1"; 1\\pm\\sqrt2 is a two-item list,
    so \\pm 2021 != 2021.
  - a whole-answer mixed number is a sum: 1\\frac45 == \\frac95 (elsewhere juxtaposition multiplies).
  - choice letters A-E ignore parentheses: (C) == C == \\text{(C)}; "(C) 12" counts as C.
  - word answers ignore case: \\text{Evelyn} == evelyn; words are never parsed as products of letters.
  - extraction: the last box wins even if an earlier one was right; an unclosed last box gives None.
Safety: pure Python, no eval/sympy; answers over MAX_LEN chars are wrong, gold lists over MAX_GOLDS are refused;
exponents, number sizes, term counts, list lengths and nesting are capped, and anything over a cap is compared as
text. Every call stays far under 50 ms.
"""
import cmath
import math
import random
import re
import unicodedata
from fractions import Fraction
from functools import lru_cache
from math import gcd, isqrt
from typing import NamedTuple

GRADER_VERSION = "2"
MAX_LEN = 1000         # longest answer worth comparing (real golds are < 200 chars); bounds all work below
MAX_GOLDS = 64         # most accepted answers one problem may list (real lists have <= 3)
MAX_ITEMS = 40         # most separators (, & \\ \cup < > =) in an answer we take apart: lists match in quadratic time

# ---------------------------------------------------------------- API


def extract_answer(text):
    """Final answer of a completion, or None when it gives none."""
    if not isinstance(text, str):
        return None
    boxes = [m.end() for m in _BOX.finditer(text)]
    if boxes:
        return _box_content(text[boxes[-1]:boxes[-1] + MAX_LEN + 2])  # longer contents are never right
    last = max((m for p in (_FINAL, _GSM) for m in p.finditer(text) if p is _GSM or _word_answer(text, m.start())),
               key=lambda m: m.start(), default=None)  # the later of "the answer is" and "####"
    if last is None:
        return None
    ans = text[last.end():last.end() + MAX_LEN + 2].split("\n")[0].strip()
    m = _DELIMITED.match(ans)  # $..$, \(..\), \[..\] unless "$7$ or $8$"; else up to the sentence's end
    hedged = m and re.match(r"\s*,?\s*(?:or|and)\s*(?:\$|\\\()", ans[m.end():])
    ans = next(g for g in m.groups() if g) if m and not hedged else re.split(r"\.(?:\s|$)", ans)[0]
    return ans.strip().strip("*").strip() or None


def is_equiv(pred, gold):
    """True when answer pred equals reference gold (see the leniency list above). Never raises on strings."""
    if not isinstance(pred, str) or not isinstance(gold, str) or len(pred) > MAX_LEN or len(gold) > MAX_LEN:
        return False
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    return p.replace(" ", "") == g.replace(" ", "") or _same(_canon(p), _canon(g))


def score(completion, gold):
    """1.0 when the completion's final answer equals gold (a string, or a list of accepted strings), else 0.0."""
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    if not golds or len(golds) > MAX_GOLDS or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"gold must be a string or a list of 1 to {MAX_GOLDS} strings, got {gold!r:.80}")
    pred = extract_answer(completion)
    return float(pred is not None and any(is_equiv(pred, g) for g in golds))

# ---------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)")
_FINAL = re.compile(r"nswer\s*(?:is\b|:)[\s:*]*")  # "The (final) answer is", "**Answer:**": a literal start is fast
_GSM = re.compile(r"####\s*")
_DELIMITED = re.compile(r"\$+(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")


def _word_answer(text, i):
    """The "nswer" found at i is the rest of the word "answer" or "Answer"."""
    before = text[max(i - 2, 0):i]
    return before[-1:] in ("a", "A") and not before[:-1].isalpha()


def _box_content(rest):
    body = rest.lstrip()
    if not body.startswith("{"):  # \boxed 5
        m = re.match(r"\s*([^\s${}]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j, c in enumerate(body):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return body[1:j].strip() or None
    return None  # unclosed: the completion was cut off before it answered

# ---------------------------------------------------------------- normalisation (one rule a line, order matters)

_UNITS = (r"(?:square |sq |cubic )?(?:units?|cm|km|mm|meters?|inch(?:es)?|feet|ft|miles?|degrees?|cents?|dollars?"
          r"|hours?|minutes?|seconds?|days?|mph)")  # multi-letter only: "5 m" is 5 times m
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": r"\times ", "\u03c0": r"\pi ", "\u221a": r"\sqrt",
            "\u00b0": r"^\circ ", "\u00b1": r"\pm ", "\u2264": r"\le ", "\u2265": r"\ge ", "\u2260": r"\ne ",
            "\u00b7": r"\cdot ", "\u22c5": r"\cdot ", "\u00f7": r"\div ", "\u221e": r"\infty ", "\u222a": r"\cup ",
            "\u2208": r"\in ", "\u00b2": "^2", "\u00b3": "^3", "\u221b": r"\sqrt[3]", "\u221c": r"\sqrt[4]",
            **{c: r"\frac{%d}{%d}" % Fraction(unicodedata.numeric(c)).limit_denominator(10).as_integer_ratio()
               for c in "½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞"}}
_SUBS = [(re.compile(p), r) for p, r in [
    ("[" + "".join(_UNICODE) + "]", lambda m: _UNICODE[m.group()]),              # unicode math
    (r",\\!\s*|(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))", ""),                       # 10,\!080, 10{,}080, 10\,080
    (r"(?<!\\)\\(?:[!,;: ]|q?quad(?![a-zA-Z]))|~", " "),                        # spacing (not the \\ row break)
    (r"\\(?:left|right|displaystyle|big|Big)(?![a-zA-Z])", ""),                 # sizing only
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),                                    # display/text-style fractions
    (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\(?:leq?|leqslant|leqq)(?![a-zA-Z])", r"\\le "), (r"\\(?:geq?|geqslant|geqq)(?![a-zA-Z])", r"\\ge "),
    (r"\\neq?(?![a-zA-Z])", r"\\ne "), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\[lr]?vert(?![a-zA-Z])", "|"), (r"\*\*", "^"),                           # |x|; plain x**2
    (r"\\mathbb\s*\{?R\}?", r"(-\\infty,\\infty)"), (r"\\varnothing", r"\\emptyset"),  # the reals, the empty set
    (r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\(?:circ|degree)(?![a-zA-Z])", ""),    # degrees dropped, never converted
    (r"(?<=[\d}])(?:\s*\\(?:text|mbox)\{\s*[a-zA-Z][a-zA-Z ]+\}(?:\^\{?-?\d+\}?)?)+\s*$", ""),  # 5\text{ cm}^2
    (r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1"),  # \text{(C)} -> (C)
    (r"(?<=\d)(?:\s*" + _UNITS + r"\b(?:\^\{?\d\}?)?)+\s*$", ""),               # trailing bare unit words: 5 cm
    (r"\\?%", ""),                                                              # percent is dropped, not scaled
    (r"\\?\$", ""),                                                             # dollars and math delimiters
    (r"\\frac\s*([^\s{\\])\s*([^\s{\\])", r"\\frac{\1}{\2}"),                   # \frac12 -> \frac{1}{2}
    (r"\\frac\s*([^\s{\\])\s*\{", r"\\frac{\1}{"),                              # \frac1{12}
    (r"\\frac\s*(\{[^{}]*\})\s*([^\s{\\])", r"\\frac\1{\2}"),                   # \frac{12}3
    (r"\\sqrt\s*([^\s{\\\[(])", r"\\sqrt{\1}"),                                 # \sqrt2 -> \sqrt{2}
    (r"([_^])\s*(-?[^\s{\\(-])", r"\1{\2}"),                                    # x^2 -> x^{2}, 52_8 -> 52_{8}
    (r"\s+", " "),                                                              # one space at most
]]


def _normalize(s):
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    return s.strip().rstrip(".").strip()

# ---------------------------------------------------------------- structure: matrices, unions, tuples, lists, relations

_THOUSANDS = re.compile(r"^-?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?$")  # 1,000 or 1 000
_LHS = re.compile(r"^([a-zA-Z](?:_\{[^{}]*\})?(?:\([a-zA-Z]\))?"       # x, a_{1}, f(x)
                  r"|\([a-zA-Z](?:,\s*[a-zA-Z])+\))"                      # (x, y)
                  r"\s*(?:=|\\in(?![a-zA-Z]))\s*")
_MATRIX = re.compile(r"^\(?\\begin\{([pbvB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}\)?$", re.DOTALL)
_MIXED = re.compile(r"^(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_CHOICE = re.compile(r"^\(([A-E])\)(?=\s|$)(?!.*\([A-E]\))|^([A-E])$")  # "(C) 12", but not "(A) or (C)"
_WORD = re.compile(r"^[A-Za-z]{2,}(?: [A-Za-z]+)*$")
_PM = re.compile(r"\\pm(?![a-zA-Z])")
_REL = re.compile(r"\\(?:le|ge|ne)(?![a-zA-Z])|[<>=]")
_FLIP = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "=": "=", "\\ne": "\\ne"}
_SEPARATOR = re.compile(r",|&|\\cup|\\\\|[<>=]|\\[lgn]e(?![a-zA-Z])")
_VAR = re.compile(r"^[a-zA-Z](?:_\{[^{}]*\})?$")


def _split_top(s, sep):
    """Split s at sep where no bracket is open."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i = i + len(sep)
            continue
        depth += (s[i] in "([{") - (s[i] in ")]}")
        i += 1
    return parts + [s[start:]]


def _split_relations(s):
    """Sides and relation signs of s at top level: "0 < x \\le 1" -> ["0", "x", "1"], ["<", "\\le"]."""
    sides, ops, start, pos, depth = [], [], 0, 0, 0
    for m in _REL.finditer(s):
        depth += sum((c in "([{") - (c in ")]}") for c in s[pos:m.start()])
        pos = m.start()
        if depth == 0:
            sides.append(s[start:pos].strip())
            ops.append(m.group())
            start = m.end()
    return sides + [s[start:].strip()], ops


def _wrapped(s):
    """True when the bracket opening s closes at its last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _canon(s, depth=0, lhs=True):
    """Structure of a normalised answer, with parsed values at the leaves; compare two with _same."""
    s = s.strip().rstrip(".").strip()
    if depth > 4 or len(_SEPARATOR.findall(s)) > MAX_ITEMS:  # no real answer is this deep or has this many parts
        return ("text", s.replace(" ", ""))
    if _THOUSANDS.match(s):
        s = re.sub("[, ]", "", s)
    if lhs and s.count("=") <= 1 and (m := _LHS.match(s)):  # x = 5, f(x) = 2x, x \in [1, 2]
        rest = s[m.end():]
        return ("label", m.group(1), _canon(rest, depth + 1), _equation(m.group(1), rest))
    if m := _MATRIX.match(s):
        rows = re.split(r"\\\\", m.group(2).strip().rstrip("\\"))
        return ("mat", tuple(tuple(_canon(c, depth + 1) for c in row.split("&")) for row in rows))
    if len(parts := _split_top(s, "\\cup")) > 1:
        if all(p.strip().startswith("\\{") and p.strip().endswith("\\}") for p in parts):  # \{1,2\} \cup \{3\}
            return _set_union([_canon(p, depth + 1) for p in parts])
        return ("union", tuple(_canon(p, depth + 1) for p in parts))
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    if s[:1] in ("(", "[") and s[-1:] in (")", "]") and _wrapped(s) and len(items := _split_top(s[1:-1], ",")) > 1:
        return ("seq", s[0], s[-1], tuple(_canon(i, depth + 1, False) for i in items))
    items = [x.strip() for i in _split_top(s, ",") for x in _expand_pm(i)]
    if len(items) > 1:
        heads = {m.group(1) if (m := _LHS.match(i)) else None for i in items}
        if len(heads) == 1 and None not in heads:  # x=1, x=2: one shared name, so it carries no information
            items = [_LHS.sub("", i, count=1) for i in items]
        return ("list", tuple(_canon(i, depth + 1, False) for i in items))
    sides, ops = _split_relations(s)
    if ops:
        return _relation(sides, ops, depth)
    return _scalar(s)


def _set_union(sets):
    """One list of the sets' items, each once."""
    items = []
    for x in (i for s in sets for i in (s[1] if s[0] == "list" else (s,))):
        if not any(_same(x, y) for y in items):
            items.append(x)
    return ("list", tuple(items)) if len(items) > 1 else items[0]


def _relation(sides, ops, depth):
    """An equation, an inequality in one variable as an interval (x \\le 3 == (-\\infty, 3]), or a chain."""
    if ops == ["="]:
        return ("eq", _equation(*sides), tuple(_canon(x, depth + 1, False) for x in sides))
    if all(o in (">", "\\ge") for o in ops):  # a > x > b -> b < x < a
        sides, ops = sides[::-1], [_FLIP[o] for o in ops[::-1]]
    opening, closing = {"<": "(", "\\le": "["}, {"<": ")", "\\le": "]"}
    if all(o in closing for o in ops) and len(sides) == 2:  # x < 3 as -oo < x < 3, 3 < x as 3 < x < oo
        if _VAR.match(sides[0]):
            sides, ops = ["-\\infty", *sides], ["<", *ops]
        elif _VAR.match(sides[1]):
            sides, ops = [*sides, "\\infty"], [*ops, "<"]
    if all(o in closing for o in ops) and len(sides) == 3 and _VAR.match(sides[1]):
        return ("seq", opening[ops[0]], closing[ops[1]], (_canon(sides[0], depth + 1), _canon(sides[2], depth + 1)))
    return ("rel", tuple(ops), tuple(_canon(x, depth + 1, False) for x in sides))


def _equation(lhs, rhs):
    """Value of lhs - rhs: two equations are the same when these are proportional."""
    return value(f"({lhs})-({rhs})")


def _expand_pm(s):
    return [_PM.sub(op, s) for op in "+-"] if len(_PM.findall(s)) == 1 else [s]


def _scalar(s):
    s = _MIXED.sub(r"\1(\2+\\frac{\3}{\4})", s)
    if m := _CHOICE.match(s):
        return ("choice", m.group(1) or m.group(2))
    if _WORD.match(s) and s != "pi":  # a word, or a product of two letters when the other side is an expression
        return ("word", s.lower(), value(s))
    v = value(s)
    return ("expr", v) if v else ("text", s.replace(" ", ""))


def _same(a, b):
    """Structures a and b (from _canon) are the same answer."""
    if a[0] == "label" or b[0] == "label":
        (a, b) = (a, b) if a[0] == "label" else (b, a)
        if b[0] == "label":
            return (a[1] == b[1] and _same(a[2], b[2])) or _proportional(a[3], b[3])
        return _proportional(a[3], b[1]) if b[0] == "eq" else _same(a[2], b)
    if {a[0], b[0]} == {"word", "expr"}:  # ab == a \cdot b, but "on" != "no"
        (word, expr) = (a, b) if a[0] == "word" else (b, a)
        return word[2] is not None and equal(word[2], expr[1])
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "expr":
        return equal(a[1], b[1])
    if kind in ("text", "choice", "word"):
        return a[1] == b[1]
    if kind == "mat":
        return len(a[1]) == len(b[1]) and all(_all_same(x, y) for x, y in zip(a[1], b[1]))
    if kind in ("union", "list"):
        return _unordered_same(a[1], b[1])
    if kind == "seq":
        return a[1:3] == b[1:3] and _all_same(a[3], b[3])
    if kind == "eq":
        return _all_same(a[2], b[2]) or _all_same(a[2], b[2][::-1]) or _proportional(a[1], b[1])
    return (a[1] == b[1] and _all_same(a[2], b[2])) or (  # rel: a < b == b > a
        a[1] == tuple(_FLIP[o] for o in b[1][::-1]) and _all_same(a[2], b[2][::-1]))


def _all_same(xs, ys):
    return len(xs) == len(ys) and all(_same(x, y) for x, y in zip(xs, ys))


def _unordered_same(xs, ys):
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:  # greedy matching: sameness is an equivalence, so the first match is as good as any
        j = next((j for j, y in enumerate(left) if _same(x, y)), None)
        if j is None:
            return False
        left.pop(j)
    return True


def _proportional(a, b):
    return a is not None and b is not None and proportional(a, b)


# ================================================================ engine: math expressions
# Math expressions: a hand-written parser for LaTeX and plain math, and equality by exact arithmetic then evaluation.
#
#     parse(s) -> tree           "\\frac{x}{2}-\\frac14+ce^{-2x}", "-1+exp(16)", "pi/2", "\\binom{2n}{n}", "1000!", ...
#     value(s) -> Value | None   the tree's exact value (when it has one) and its values at fixed pseudo-random points
#     equal(a, b) -> bool        exact values when both have one; otherwise all shared points agree (>= 2 of them)
#     proportional(a, b) -> bool a = c b at every shared point: the equations a = 0 and b = 0 are the same
#
# The tree is nested tuples: ("n", Fraction), ("v", name), ("+", terms), ("*", factors), ("inv", x), ("^", base, exp),
# ("!", x), ("root", k, x), ("f", name, x), ("log", base | None, x), ("binom", n, k).
# Exact values are sums of coefficient * sqrt(square-free radicand) * monomial in symbols; \\pi, e and \\infty are
# symbols (pi and e are transcendental, so a polynomial identity in them is a numeric one) and i^2 = -1 is applied on
# every product. The form is unique, so two exact values are equal exactly when their forms are: 0.33 != 1/3,
# 3.14 != \\pi, 1/2004! != 1/2006!. Anything else (sin, log, e^x, cube roots, division by a sum) is compared by value
# at POINTS points: each variable gets the same pseudo-random value on both sides, two points real and two complex,
# all with positive real part, where sqrt(xy) = sqrt(x) sqrt(y) and ln(x^2) = 2 ln x hold, but |x| != x.
# Floors and ceilings of variables get no values (random points would agree with a wrong constant).
# Departures from a CAS, on purpose: no simplification, so nothing can hang; no rounding of exact numbers; log is
# natural; every size is capped (exponents, bits, terms, factorials, tokens, nesting) and over a cap means "no value".

MAX_TOKENS = 300       # longest expression we parse
MAX_DEPTH = 30         # deepest bracket/function nesting we parse
MAX_EXP = 4096         # largest |exponent| computed exactly: 10^{10^{10}} is refused, not computed
MAX_BITS = 32768       # largest numerator/denominator of any exact coefficient (2006! has 19,300 bits)
MAX_TERMS = 32         # largest expanded polynomial
MAX_RADICAND = 10**8   # square-free part by trial division to the cube root stays < 0.1 ms
MAX_FACTORIAL = 3000   # largest n! computed exactly
POINTS = 4             # evaluation points for expressions without an exact value
REL_TOL = 1e-8         # relative tolerance of a numeric comparison


class Refuse(ValueError):
    """Not an expression we parse, or over a size cap."""

# ---------------------------------------------------------------- parsing

FUNCS = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda z: 1 / cmath.tan(z),
         "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "arcsin": cmath.asin,
         "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
         "exp": cmath.exp, "ln": cmath.log, "abs": abs, "floor": lambda z: _real_only(math.floor, z),
         "ceil": lambda z: _real_only(math.ceil, z)}
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan"}   # \sin^{-1} x
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "kappa",
         "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta",
         "Theta", "Lambda", "Sigma", "Phi", "Psi", "Omega", "ell"}
_NAMES = "arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|exp|ln|log|sqrt|pi"
_PLAIN = re.compile(rf"(?<![a-zA-Z\\])(?:{_NAMES})(?![a-zA-Z])")          # plain-text names: exp(16), pi/2
_TOKEN = re.compile(rf"\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\\[a-zA-Z]+|(?:{_NAMES})(?![a-zA-Z])"
                    r"|[a-zA-Z](?:_\{[a-zA-Z0-9]*\}|_[a-zA-Z0-9])?|\S")
_DELIM = {"(": ")", "{": "}", "[": "]"}
_CLOSE = {"|": "|", "\\lfloor": "\\rfloor", "\\lceil": "\\rceil"}
_WORDS = set(FUNCS) | {"sqrt", "log", "pi"}


def parse(s):
    """Expression tree of s; raises Refuse when s is not an expression we know."""
    if re.search(r"[a-zA-Z]{3}", _PLAIN.sub(" ", re.sub(r"\\[a-zA-Z]+", " ", s))):
        raise Refuse("a word, not a product of letters")
    toks = _TOKEN.findall(s)
    if len(toks) > MAX_TOKENS:
        raise Refuse("too long")
    return _Parser(toks).parse()


class _Parser:
    """Recursive descent: expr = term {+- term}; term = power {[*/] power | juxtaposed power}; power = post [^ atom]."""

    def __init__(self, toks):
        self.toks = [t[1:] if t[0] == "\\" and t[1:] in _WORDS else t for t in toks] + [None]  # \sin is sin
        self.i = 0  # None marks the end

    def parse(self):
        tree = self.expr(0)
        if self.peek() is not None:
            raise Refuse("trailing tokens")
        return tree

    def peek(self):
        return self.toks[self.i]

    def take(self, want=None):
        t = self.peek()
        if t is None or (want and t != want):
            raise Refuse(f"expected {want}")
        self.i += 1
        return t

    def expr(self, depth):
        if depth > MAX_DEPTH:
            raise Refuse("too deep")
        terms, sign = [], self.take() if self.peek() in ("+", "-") else "+"
        while True:
            t = self.term(depth)
            terms.append(t if sign == "+" else ("n", -t[1]) if t[0] == "n" else ("*", (("n", Fraction(-1)), t)))
            if self.peek() not in ("+", "-"):
                return terms[0] if len(terms) == 1 else ("+", tuple(terms))
            sign = self.take()

    def term(self, depth):
        factors = [self.power(depth)]
        while (t := self.peek()) is not None:
            if t in ("*", "\\cdot", "\\times", "/", "\\div"):
                self.take()
            elif not (self.juxtaposable(t) or (t[0].isdigit() and factors[-1][0] != "n")):
                break  # juxtaposition multiplies (n2^n, 2x), but "1 000" is not 1000 nor 0
            factor = self.power(depth)
            factors.append(("inv", factor) if t in ("/", "\\div") else factor)
        if len(factors) > 1 and ("n", 0) in factors:  # I(0)e^{-t} is function notation, not 0
            raise Refuse("a product with a literal zero")
        return factors[0] if len(factors) == 1 else ("*", tuple(factors))

    @staticmethod
    def juxtaposable(t):
        return t in ("(", "{") or t[0].isalpha() or (t[0] == "\\" and t not in _CLOSE.values())

    def power(self, depth):
        base = self.postfix(depth)
        if self.peek() != "^":
            return base
        self.take()
        return ("^", base, self.atom(depth + 1))

    def postfix(self, depth):
        x = self.atom(depth)
        while self.peek() == "!":
            self.take()
            if self.peek() == "!":
                raise Refuse("double factorial")
            x = ("!", x)
        return x

    def atom(self, depth):
        if depth > MAX_DEPTH:
            raise Refuse("too deep")
        t = self.take()
        if t[0].isdigit() or t[0] == ".":
            return ("n", _decimal(t))
        if t in _DELIM:
            x = self.expr(depth + 1)
            self.take(_DELIM[t])
            return x
        if t in _CLOSE:  # |x|, \lfloor x \rfloor, \lceil x \rceil
            x = self.expr(depth + 1)
            self.take(_CLOSE[t])
            return ("f", {"|": "abs", "\\lfloor": "floor", "\\lceil": "ceil"}[t], x)
        if t == "\\frac":
            return ("*", (self.group(depth), ("inv", self.group(depth))))
        if t == "\\binom":
            return ("binom", self.group(depth), self.group(depth))
        if t == "sqrt":
            k = 2
            if self.peek() == "[":  # \sqrt[3]{x}
                self.take()
                k = int(self.take()) if (self.peek() or "").isdigit() and 2 <= int(self.peek()) <= 99 else 0
                if not k or self.take() != "]":
                    raise Refuse("root index")
            return ("root", k, self.atom(depth + 1))
        if t in FUNCS or t == "log":
            return self.call(t, depth)
        if t == "pi":
            return ("v", "\\pi")
        if t[0].isalpha() or t == "\\infty" or t[1:] in GREEK:
            return ("v", t)
        raise Refuse(f"unsupported token {t[:20]}")

    def group(self, depth):
        self.take("{")
        x = self.expr(depth + 1)
        self.take("}")
        return x

    def call(self, name, depth):
        """\\sin x, \\sin 2x, \\sin(x), \\sin^2 x, \\sin^{-1} x, \\log_2 8, \\ln \\frac{3}{2}, exp(16)."""
        power = base = None
        if self.peek() == "^":
            self.take()
            power = self.atom(depth + 1)
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.atom(depth + 1)
        if power == ("n", -1) and name in _INVERSE:
            name, power = _INVERSE[name], None
        if self.peek() in ("(", "{", "[", "|"):
            arg = self.postfix(depth + 1)
        else:  # an implicit product of plain factors: \sin 2x is sin(2x), \sin x \cos x is sin(x) cos(x)
            factors = [self.power(depth + 1)]
            while (t := self.peek()) is not None and (t[0].isalnum() or t in ("\\frac", "pi", "sqrt")
                                                      or t[1:] in GREEK) and t not in FUNCS and t != "log":
                factors.append(self.power(depth + 1))
            arg = factors[0] if len(factors) == 1 else ("*", tuple(factors))
        x = ("log", base, arg) if name == "log" else ("f", name, arg)
        return x if power is None else ("^", x, power)


def _decimal(tok):
    mantissa, _, exp = tok.lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    if len(tok) > 400 or abs(int(exp or 0)) > MAX_EXP:
        raise Refuse("number too long")
    return Fraction(int(whole + frac or "0"), 10 ** len(frac)) * Fraction(10) ** int(exp or 0)

# ---------------------------------------------------------------- exact values
# A value is a dict {(radicand, ((symbol, exp), ...)): Fraction}.

_UNIT = (1, ())


def _check(p):
    """p itself, unless it is over a size cap (then refuse: a blow-up must cost microseconds, not seconds)."""
    if len(p) > MAX_TERMS or any(r > MAX_RADICAND or max(c.numerator.bit_length(), c.denominator.bit_length())
                                 > MAX_BITS or any(abs(e) > MAX_EXP for _, e in vs) for (r, vs), c in p.items()):
        raise Refuse("over a size cap")
    return p


def _const(p):
    """The rational number p is, or None."""
    return p.get(_UNIT, Fraction(0)) if not set(p) - {_UNIT} else None


def _add(p, q):
    return _check({k: c for k in p.keys() | q.keys() if (c := p.get(k, 0) + q.get(k, 0))})


def _mono_mul(a, b):
    (r1, v1), (r2, v2) = a, b
    g = gcd(r1, r2)  # sqrt(g a) sqrt(g b) = g sqrt(a b), a b square-free again
    exps = dict(v1)
    for k, e in v2:
        exps[k] = exps.get(k, 0) + e
    i = exps.pop("i", 0) % 4
    exps["i"] = i % 2
    key = ((r1 // g) * (r2 // g), tuple(sorted((k, e) for k, e in exps.items() if e)))
    return key, g * (-1 if i >= 2 else 1)


def _mul(p, q):
    out = {}
    for a, ca in p.items():
        for b, cb in q.items():
            key, factor = _mono_mul(a, b)
            out[key] = out.get(key, 0) + ca * cb * factor
    return _check({k: c for k, c in out.items() if c})


def _inverse(p):
    if len(p) != 1:
        raise Refuse("division by a sum")  # no polynomial division or rationalising denominators
    ((r, vs), c), = p.items()
    return _mul({_UNIT: Fraction(1)}, {(r, tuple((k, -e) for k, e in vs)): 1 / (c * r)})  # 1/(c sqrt r) = sqrt r/(c r)


def _pow(base, e):
    n = _const(e)
    if n is None or n.denominator not in (1, 2) or abs(n) > MAX_EXP:
        raise Refuse("exponent not a small integer or half-integer")
    if n.denominator == 2:
        base, n = _sqrt(base), n * 2
    n = int(n)
    if n < 0:
        base, n = _inverse(base), -n
    out = {_UNIT: Fraction(1)}
    while n:  # square-and-multiply, every step size-checked
        if n & 1:
            out = _mul(out, base)
        n >>= 1
        if n:
            base = _mul(base, base)
    return out


def _sqrt(p):
    c = _const(p)
    if c is None or c < 0:
        raise Refuse("sqrt of a non-constant or negative")
    n, out, r, f = c.numerator * c.denominator, 1, 1, 2  # sqrt(a/b) = sqrt(a b) / b = out sqrt(r) / b
    if n > MAX_RADICAND:
        raise Refuse("radicand too large")
    while f * f * f <= n:  # strip primes up to the cube root ...
        k = 0
        while n % f == 0:
            n, k = n // f, k + 1
        out, r, f = out * f ** (k // 2), r * f ** (k % 2), f + 1
    s = isqrt(n)  # ... what is left is 1, p, p^2 or p q
    out, r = (out * s, r) if s * s == n else (out, r * n)
    return {(r, ()): Fraction(out, c.denominator)} if c else {}


def _natural(p, cap=MAX_FACTORIAL):
    n = _const(p)
    if n is None or n.denominator != 1 or not 0 <= n <= cap:
        raise Refuse("not a small natural number")
    return int(n)


def exact(t):
    """Exact value of tree t (see above); raises Refuse when it has none we can compute within the caps."""
    kind = t[0]
    if kind == "n":
        return _check({_UNIT: t[1]} if t[1] else {})
    if kind == "v":
        return _mul({_UNIT: Fraction(1)}, {(1, ((t[1], 1),)): Fraction(1)})  # _mul turns i^1 into i
    if kind in ("+", "*"):
        out = {} if kind == "+" else {_UNIT: Fraction(1)}
        for x in t[1]:
            out = _add(out, exact(x)) if kind == "+" else _mul(out, exact(x))
        return out
    if kind == "inv":
        return _inverse(exact(t[1]))
    if kind == "^":
        return _pow(exact(t[1]), exact(t[2]))
    if kind == "root" and t[1] == 2:
        return _sqrt(exact(t[2]))
    if kind == "!":
        return _check({_UNIT: Fraction(math.factorial(_natural(exact(t[1]))))})
    if kind == "binom":
        return _check({_UNIT: Fraction(math.comb(_natural(exact(t[1])), _natural(exact(t[2]))))})
    if kind == "f" and t[1] == "exp":
        return _pow(exact(("v", "e")), exact(t[2]))
    raise Refuse(f"no exact value for {kind}")

# ---------------------------------------------------------------- values at points


def _real_only(fn, z):
    if z.imag:
        raise Refuse("real argument expected")
    return fn(z.real)


def _gamma_plus_one(z):
    if z.imag:
        raise Refuse("factorial of a complex number")
    if z.real == int(z.real) and z.real <= 170:
        return float(math.factorial(int(z.real)))  # ValueError for a negative integer
    return math.gamma(z.real + 1)  # OverflowError beyond 171!


_CONSTANTS = {"\\pi": math.pi, "e": math.e, "i": 1j}


def numeric(t, point):
    """Complex value of tree t with variables from point; raises ArithmeticError/ValueError when undefined."""
    kind = t[0]
    if kind == "n":
        return complex(float(t[1]))
    if kind == "v":
        return _CONSTANTS[t[1]] if t[1] in _CONSTANTS else point[t[1]]  # KeyError for \infty
    if kind == "+":
        return sum((numeric(x, point) for x in t[1]), 0j)
    if kind == "*":
        return math.prod((numeric(x, point) for x in t[1]), start=1 + 0j)
    if kind == "inv":
        return 1 / numeric(t[1], point)
    if kind == "^":
        return numeric(t[1], point) ** numeric(t[2], point)  # OverflowError, never slow
    if kind == "root":
        z = numeric(t[2], point)
        if t[1] % 2 and not z.imag and z.real < 0:  # \sqrt[3]{-8} = -2, the real root
            return -((-z.real) ** (1 / t[1]))
        return z ** (1 / t[1])
    if kind == "!":
        return complex(_gamma_plus_one(numeric(t[1], point)))
    if kind == "binom":
        n, k = numeric(t[1], point), numeric(t[2], point)
        return _gamma_plus_one(n) / (_gamma_plus_one(k) * _gamma_plus_one(n - k))
    if kind == "log":
        z = cmath.log(numeric(t[2], point))
        return z if t[1] is None else z / cmath.log(numeric(t[1], point))
    return complex(FUNCS[t[1]](numeric(t[2], point)))


def _nodes(t):
    """Every node of tree t."""
    yield t
    kind = t[0]
    children = {"n": (), "v": (), "+": t[1], "*": t[1], "inv": t[1:], "!": t[1:], "^": t[1:], "binom": t[1:],
                "root": t[2:], "f": t[2:], "log": [x for x in t[1:] if x is not None]}[kind]
    for child in children:
        yield from _nodes(child)


@lru_cache(maxsize=4096)
def _point_value(name, k):
    """The value variable name takes at point k: the same on both sides of every comparison."""
    rng = random.Random(f"{name}/{k}")
    real = 0.5 + 2.5 * rng.random()
    return complex(real, (rng.random() - 0.5) * 3 if k >= POINTS // 2 else 0.0)


class Value(NamedTuple):
    exact: tuple | None      # sorted items of the exact value, or None
    approx: tuple            # POINTS complex values, None where undefined


def value(s):
    """Value of expression s, or None when s does not parse."""
    try:
        tree = parse(s)
    except (ValueError, RecursionError):  # Refuse, or a malformed number
        return None
    try:
        ex = tuple(sorted(exact(tree).items()))
    except (ValueError, ArithmeticError, RecursionError):
        ex = None
    nodes = list(_nodes(tree))
    names = {x[1] for x in nodes if x[0] == "v" and x[1] not in _CONSTANTS and x[1] != "\\infty"}  # \infty: no value
    if names and any(x[0] == "f" and x[1] in ("floor", "ceil") for x in nodes):
        return Value(ex, (None,) * POINTS)  # piecewise constant: random points would agree with a wrong constant
    approx = tuple(_approx(tree, {n: _point_value(n, k) for n in names}) for k in range(POINTS if names else 1))
    return Value(ex, approx * (1 if names else POINTS))


def _approx(tree, point):
    try:
        z = numeric(tree, point)
    except (ValueError, ArithmeticError, TypeError, KeyError, RecursionError):
        return None
    return z if cmath.isfinite(z) else None


def equal(a, b):
    """a equals b: exactly when both have exact values, else at every point where both are defined (>= 2)."""
    if a.exact is not None and b.exact is not None:
        return a.exact == b.exact
    pairs = [(x, y) for x, y in zip(a.approx, b.approx) if x is not None and y is not None]
    return len(pairs) >= 2 and all(abs(x - y) <= REL_TOL * max(abs(x), abs(y)) for x, y in pairs)


def proportional(a, b):
    """a = c b for a constant c != 0 at every shared point (>= 2), and a is not a constant: equations a = 0, b = 0."""
    pairs = [(x, y) for x, y in zip(a.approx, b.approx) if x is not None and y is not None]
    if len(pairs) < 2 or any(y == 0 for _, y in pairs) or len({x for x, _ in pairs}) == 1:
        return False
    c = pairs[0][0] / pairs[0][1]
    return c != 0 and all(abs(x - c * y) <= REL_TOL * max(abs(x), abs(c * y)) for x, y in pairs)
