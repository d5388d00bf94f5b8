"""Answer grading: pull the final answer out of a completion and decide if it equals the reference.

    extract_answer(text) -> str | None    last \\boxed{..} / \\fbox{..}; else "The final answer is .."; else "#### N"
    is_equiv(pred, gold) -> bool          normalised text equal, or parsed values exactly equal
    score(completion, gold) -> float      1.0 / 0.0; gold may be a list of accepted answers (Minerva "answers")

Only the completion is graded: callers pass the generated text, never the prompt (a box in the prompt's
few-shot examples must not count). Equivalence is Hendrycks/PRM800K normalisation followed by an exact
comparison of parsed values: numbers are Fractions, radicals and pi live in a small canonical form
(coefficient * sqrt(square-free) * pi^k * i^j * variables^n), so nothing is ever rounded.

Leniency decisions (each tested both ways in tests/test_grade.py):
  - layout is ignored: spaces, \\left/\\right, \\! \\, \\quad, \\dfrac/\\tfrac, \\frac12, \\sqrt2, x^{2} vs x^2,
    $ and \\$, \\text{}/\\mathrm{} wrappers, thousands separators (1,000 == 1000), trailing ".", leading "+".
  - units and degrees are dropped, never converted: 90^\\circ == 90, "5 cm" == 5; 90^\\circ != \\frac{\\pi}{2}.
  - percent is dropped: 10\\% == 10, but 10\\% != 0.1 (no scaling).
  - numbers are exact: 0.5 == \\frac{2}{4} == 5e-1, 2.50 == 2.5; but 0.33 != \\frac13 and 3.14 != \\pi.
  - radicals/pi/i are exact: \\sqrt{8} == 2\\sqrt2, \\frac{1}{\\sqrt2} == \\frac{\\sqrt2}{2}; \\sqrt3 != 3.
  - expressions are equal polynomials: 2(k+1) == 2k+2, but 2 != 2x; no cancelling by a polynomial divisor.
  - "x =", "f(x) =", "x \\in" prefixes are dropped (x=5 == 5); in a list only when every item has the same one.
  - tuples and intervals are ordered and keep their brackets: (1,2) != (2,1), (1,2) != [1,2].
  - comma lists, \\{sets\\} and \\cup unions are unordered: "1,-2" == "-2, 1"; 1\\pm\\sqrt2 is a two-item list.
  - a whole-answer mixed number is a sum: 1\\frac45 == \\frac95 (elsewhere juxtaposition multiplies).
  - choice letters A-E ignore parentheses: (C) == C == \\text{(C)}; "(C) 12" counts as C.
  - word answers ignore case: \\text{Evelyn} == evelyn; words are never parsed as products of letters.
  - extraction: the last box wins even if an earlier one was right; an unclosed last box gives None.
Safety: pure Python, no eval/sympy; answers over MAX_LEN chars are wrong; exponents, number sizes, term counts
and nesting are capped, and anything over a cap is compared as text. Every call stays far under 50 ms.
"""
import re
from fractions import Fraction
from math import gcd, isqrt

GRADER_VERSION = "1"
MAX_LEN = 1000         # longest answer worth comparing (real golds are < 200 chars); bounds all work below
MAX_TOKENS = 300       # longest expression we parse
MAX_DEPTH = 30         # deepest bracket nesting we parse
MAX_EXP = 4096         # largest |exponent| we compute: 10^{10^{10}} is refused, not computed
MAX_BITS = 16384       # largest numerator/denominator of any coefficient
MAX_TERMS = 32         # largest expanded polynomial
MAX_RADICAND = 10**8   # square-free part by trial division to the cube root stays < 0.1 ms

# ---------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)")
_FINAL = re.compile(r"final answer is:?\s*(.+)", re.IGNORECASE)
_GSM = re.compile(r"####\s*(.+)")


def extract_answer(text):
    """Final answer of a completion, or None when it gives none."""
    if not isinstance(text, str):
        return None
    boxes = [m.end() for m in _BOX.finditer(text)]
    if boxes:
        return _box_content(text[boxes[-1]:boxes[-1] + MAX_LEN + 2])  # longer contents are never right
    for pattern in (_FINAL, _GSM):
        found = pattern.findall(text)
        if found:
            ans = found[-1].strip()
            ans = ans[1:].split("$")[0] if ans.startswith("$") else re.split(r"\.(?:\s|$)", ans)[0]
            return ans.strip() or None
    return None


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
_SUBS = [(re.compile(p), r) for p, r in [
    (r"[\u2212\u2013\u2014]", "-"),                                             # unicode minus and dashes
    (r"\u00d7", r"\\times "), (r"\u03c0", r"\\pi "), (r"\u221a", r"\\sqrt"), (r"\u00b0", r"^\\circ "),  # unicode
    (r",\\!\s*", ""),                                                           # 10,\!080: MATH's thousands separator
    (r"(?<!\\)\\(?:[!,;: ]|q?quad(?![a-zA-Z]))|~", " "),                        # spacing (not the \\ row break)
    (r"\\(?:left|right|displaystyle)(?![a-zA-Z])", ""),                         # sizing only
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),                                    # display/text-style fractions
    (r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\(?:circ|degree)(?![a-zA-Z])", ""),    # degrees dropped, never converted
    (r"(?<=[\d}])(?:\s*\\(?:text|mbox)\{\s*[a-zA-Z][a-zA-Z ]+\}(?:\^\{?-?\d+\}?)?)+\s*$", ""),  # 5\text{ cm}^2
    (r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1"),  # \text{(C)} -> (C)
    (r"(?<=\d)(?:\s*" + _UNITS + r"\b(?:\^\{?\d\}?)?)+\s*$", ""),               # trailing bare unit words: 5 cm
    (r"\\?%", ""),                                                              # percent is dropped, not scaled
    (r"\\?\$", ""),                                                             # dollars and math delimiters
    (r"\\frac\s*([^\s{\\])\s*([^\s{\\])", r"\\frac{\1}{\2}"),                   # \frac12 -> \frac{1}{2}
    (r"\\frac\s*([^\s{\\])\s*\{", r"\\frac{\1}{"),                              # \frac1{12}
    (r"\\frac\s*(\{[^{}]*\})\s*([^\s{\\])", r"\\frac\1{\2}"),                   # \frac{12}3
    (r"\\sqrt\s*([^\s{\\\[])", r"\\sqrt{\1}"),                                  # \sqrt2 -> \sqrt{2}
    (r"([_^])\s*([^\s{\\])", r"\1{\2}"),                                        # x^2 -> x^{2}, 52_8 -> 52_{8}
    (r"\s+", " "),                                                              # one space at most
]]


def _normalize(s):
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    return s.strip().rstrip(".").strip()

# ---------------------------------------------------------------- structure: matrices, unions, tuples, lists

_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LHS = re.compile(r"^([a-zA-Z](?:_\{[^{}]*\})?(?:\([a-zA-Z]\))?)\s*(?:=|\\in(?![a-zA-Z]))\s*")
_MATRIX = re.compile(r"^\\begin\{[pbvB]?matrix\}(.*)\\end\{[pbvB]?matrix\}$", re.DOTALL)
_MIXED = re.compile(r"^(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_CHOICE = re.compile(r"^\(([A-E])\)(?=\s|$)(?!.*\([A-E]\))|^([A-E])$")  # "(C) 12", but not "(A) or (C)"
_WORD = re.compile(r"^[A-Za-z]{2,}(?: [A-Za-z]+)*$")
_PM = re.compile(r"\\pm(?![a-zA-Z])")


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


def _wrapped(s):
    """True when the bracket opening s closes at its last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _canon(s, depth=0, lhs=True):
    """Hashable canonical form of a normalised answer; equal forms mean equivalent answers."""
    s = s.strip().rstrip(".").strip()
    if depth > 4:
        return ("text", s.replace(" ", ""))
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if lhs and s.count("=") <= 1 and (m := _LHS.match(s)):
        s = s[m.end():]
    if m := _MATRIX.match(s):
        rows = re.split(r"\\\\", m.group(1).strip().rstrip("\\"))
        return ("mat", tuple(tuple(_canon(c, depth + 1) for c in row.split("&")) for row in rows))
    if len(parts := _split_top(s, "\\cup")) > 1:
        return ("union", tuple(sorted((_canon(p, depth + 1) for p in parts), key=repr)))
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    if s[:1] in ("(", "[") and s[-1:] in (")", "]") and _wrapped(s) and len(items := _split_top(s[1:-1], ",")) > 1:
        return ("seq", s[0], s[-1], tuple(_canon(i, depth + 1, False) for i in items))
    items = [x.strip() for i in _split_top(s, ",") for x in _expand_pm(i)]
    if len(items) > 1:
        heads = {m.group(1) if (m := _LHS.match(i)) else None for i in items}
        if len(heads) == 1 and None not in heads:  # x=1, x=2: one shared name, so it carries no information
            items = [_LHS.sub("", i, count=1) for i in items]
        return ("list", tuple(sorted((_canon(i, depth + 1, False) for i in items), key=repr)))
    return _scalar(s)


def _expand_pm(s):
    return [_PM.sub(op, s) for op in "+-"] if len(_PM.findall(s)) == 1 else [s]


def _scalar(s):
    s = _MIXED.sub(r"\1(\2+\\frac{\3}{\4})", s)
    if m := _CHOICE.match(s):
        return ("choice", m.group(1) or m.group(2))
    if _WORD.match(s):
        return ("text", s.lower())
    try:
        return ("num", tuple(sorted(_Parser(s).parse().items())))
    except (ValueError, ZeroDivisionError, RecursionError):
        return ("text", s.replace(" ", ""))

# ---------------------------------------------------------------- exact values
# A value is a dict {(radicand, ((var, exp), ...)): Fraction}: a sum of coefficient * sqrt(radicand) * vars,
# radicand square-free, \pi and i are variables (i^2 = -1 is applied on every product).

_ONE = (1, ())


class _Refuse(ValueError):
    """Not a value we can compare exactly (or over a size cap): fall back to text."""


def _check(p):
    """p itself, unless it is over a size cap (then refuse: a blow-up must cost microseconds, not seconds)."""
    if len(p) > MAX_TERMS or any(r > MAX_RADICAND or max(c.numerator.bit_length(), c.denominator.bit_length())
                                 > MAX_BITS or any(abs(e) > MAX_EXP for _, e in vs) for (r, vs), c in p.items()):
        raise _Refuse("over a size cap")
    return p


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
        raise _Refuse("division by a sum")  # no polynomial division or rationalising denominators
    ((r, vs), c), = p.items()
    return {(r, tuple((k, -e) for k, e in vs)): 1 / (c * r)}  # 1/(c sqrt r) = sqrt r / (c r)


def _pow(base, e):
    if set(e) - {_ONE} or e.get(_ONE, Fraction(0)).denominator != 1:
        raise _Refuse("non-integer exponent")
    n = int(e.get(_ONE, 0))
    if abs(n) > MAX_EXP:
        raise _Refuse("exponent too large")
    if n < 0:
        base, n = _inverse(base), -n
    out = {_ONE: Fraction(1)}
    while n:  # square-and-multiply, every step size-checked
        if n & 1:
            out = _mul(out, base)
        n >>= 1
        if n:
            base = _mul(base, base)
    return out


def _sqrt(p):
    if set(p) - {_ONE} or p.get(_ONE, 0) < 0:
        raise _Refuse("sqrt of a non-constant or negative")
    c = p.get(_ONE, Fraction(0))
    n, out, r, f = c.numerator * c.denominator, 1, 1, 2  # sqrt(a/b) = sqrt(a b) / b = out sqrt(r) / b
    if n > MAX_RADICAND:
        raise _Refuse("radicand too large")
    while f * f * f <= n:  # strip primes up to the cube root ...
        k = 0
        while n % f == 0:
            n, k = n // f, k + 1
        out, r, f = out * f ** (k // 2), r * f ** (k % 2), f + 1
    s = isqrt(n)  # ... what is left is 1, p, p^2 or p q
    out, r = (out * s, r) if s * s == n else (out, r * n)
    return {(r, ()): Fraction(out, c.denominator)} if c else {}


def _number(tok):
    mantissa, _, exp = tok.lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    if len(tok) > 400 or abs(int(exp or 0)) > MAX_EXP:
        raise _Refuse("number too long")
    return _check({_ONE: Fraction(int(whole + frac or "0"), 10 ** len(frac)) * Fraction(10) ** int(exp or 0)})


_TOKEN = re.compile(r"\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\\[a-zA-Z]+|\S")


class _Parser:
    """Recursive descent over + - * / ^ \\frac \\sqrt \\pi ( ) { }, numbers and one-letter variables."""

    def __init__(self, s):
        if re.search(r"[a-zA-Z]{3}", re.sub(r"\\[a-zA-Z]+", " ", s)):
            raise _Refuse("a word, not a product of letters")
        self.toks, self.i = _TOKEN.findall(s) + [None], 0  # None marks the end
        if len(self.toks) > MAX_TOKENS:
            raise _Refuse("too long")

    def parse(self):
        value = self.expr(0)
        if self.peek() is not None:
            raise _Refuse("trailing tokens")
        return value

    def peek(self):
        return self.toks[self.i]

    def take(self, want=None):
        t = self.peek()
        if t is None or (want and t != want):
            raise _Refuse(f"expected {want}")
        self.i += 1
        return t

    def expr(self, depth):
        if depth > MAX_DEPTH:
            raise _Refuse("too deep")
        acc, op = {}, self.take() if self.peek() in ("+", "-") else "+"
        while True:
            t = self.term(depth)
            acc = _add(acc, t if op == "+" else _mul({_ONE: Fraction(-1)}, t))
            if self.peek() not in ("+", "-"):
                return acc
            op = self.take()

    def term(self, depth):
        acc = self.power(depth)
        while (t := self.peek()) is not None:
            if t in ("*", "\\cdot", "\\times", "/"):
                self.take()
            elif not (t in ("(", "{") or t[0] == "\\" or t.isalpha()):  # juxtaposition multiplies; never "1 000"
                return acc
            factor = self.power(depth)
            acc = _mul(acc, _inverse(factor) if t == "/" else factor)
        return acc

    def power(self, depth):
        base = self.atom(depth)
        if self.peek() == "^":
            self.take()
            base = _pow(base, self.atom(depth))
        return base

    def atom(self, depth):
        t = self.take()
        if t[0].isdigit() or t[0] == ".":
            return _number(t)
        if t in ("(", "{"):
            value = self.expr(depth + 1)
            self.take(")" if t == "(" else "}")
            return value
        if t == "\\frac":
            return _mul(self.group(depth), _inverse(self.group(depth)))
        if t == "\\sqrt":
            return _sqrt(self.group(depth))
        if t == "\\pi" or (len(t) == 1 and t.isalpha()):
            return _mul({_ONE: Fraction(1)}, {(1, ((t, 1),)): Fraction(1)})  # _mul turns i^1 into i
        raise _Refuse(f"unsupported token {t[:20]}")

    def group(self, depth):
        self.take("{")
        value = self.expr(depth + 1)
        self.take("}")
        return value

# ---------------------------------------------------------------- API


def is_equiv(pred, gold):
    """True when answer pred equals reference gold (see the leniency list above). Never raises on strings."""
    if not isinstance(pred, str) or not isinstance(gold, str) or len(pred) > MAX_LEN or len(gold) > MAX_LEN:
        return False
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    return p.replace(" ", "") == g.replace(" ", "") or _canon(p) == _canon(g)


def score(completion, gold):
    """1.0 when the completion's final answer equals gold (a string, or a list of accepted strings), else 0.0."""
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    if not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"gold must be a string or a non-empty list of strings, got {gold!r:.80}")
    pred = extract_answer(completion)
    return float(pred is not None and any(is_equiv(pred, g) for g in golds))
