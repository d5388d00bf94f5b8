"""Answer grading: pull the final answer out of a completion and decide if it equals the reference.

    extract_answer(text) -> str | None    last \\boxed{..} / \\fbox{..}; else the later of "answer is .." and "#### N"
    is_equiv(pred, gold) -> bool          normalised text equal, or same structure with equal values (mathexpr.py)
    score(completion, gold) -> float      1.0 / 0.0; gold may be a list of accepted answers (Minerva "answers")

Only the completion is graded: callers pass the generated text, never the prompt (a box in the prompt's
few-shot examples must not count). Equivalence is Hendrycks/PRM800K normalisation, then structure (matrices,
unions, tuples, intervals, lists, equations, inequalities), then values at the leaves: exact where both sides have
an exact value, so nothing is ever rounded, else evaluation at fixed pseudo-random points (mathexpr.py).

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
import re
import unicodedata
from fractions import Fraction

import mathexpr

GRADER_VERSION = "2"
MAX_LEN = 1000         # longest answer worth comparing (real golds are < 200 chars); bounds all work below
MAX_GOLDS = 64         # most accepted answers one problem may list (real lists have <= 3)
MAX_ITEMS = 40         # most separators (, & \\ \cup < > =) in an answer we take apart: lists match in quadratic time

# ---------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)")
_FINAL = re.compile(r"nswer\s*(?:is\b|:)[\s:*]*")  # "The (final) answer is", "**Answer:**": a literal start is fast
_GSM = re.compile(r"####\s*")
_DELIMITED = re.compile(r"\$+(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")


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
    return mathexpr.value(f"({lhs})-({rhs})")


def _expand_pm(s):
    return [_PM.sub(op, s) for op in "+-"] if len(_PM.findall(s)) == 1 else [s]


def _scalar(s):
    s = _MIXED.sub(r"\1(\2+\\frac{\3}{\4})", s)
    if m := _CHOICE.match(s):
        return ("choice", m.group(1) or m.group(2))
    if _WORD.match(s) and s != "pi":  # a word, or a product of two letters when the other side is an expression
        return ("word", s.lower(), mathexpr.value(s))
    value = mathexpr.value(s)
    return ("expr", value) if value else ("text", s.replace(" ", ""))


def _same(a, b):
    """Structures a and b (from _canon) are the same answer."""
    if a[0] == "label" or b[0] == "label":
        (a, b) = (a, b) if a[0] == "label" else (b, a)
        if b[0] == "label":
            return (a[1] == b[1] and _same(a[2], b[2])) or _proportional(a[3], b[3])
        return _proportional(a[3], b[1]) if b[0] == "eq" else _same(a[2], b)
    if {a[0], b[0]} == {"word", "expr"}:  # ab == a \cdot b, but "on" != "no"
        (word, expr) = (a, b) if a[0] == "word" else (b, a)
        return word[2] is not None and mathexpr.equal(word[2], expr[1])
    if a[0] != b[0]:
        return False
    kind = a[0]
    if kind == "expr":
        return mathexpr.equal(a[1], b[1])
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
    return a is not None and b is not None and mathexpr.proportional(a, b)

# ---------------------------------------------------------------- API


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
