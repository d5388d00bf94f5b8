import json
import random
import time

import pytest

import grade
from grade import GRADER_VERSION, MAX_GOLDS, _normalize, extract_answer, is_equiv, score
from grade_report import load_cases

BENCHMARKS = ["math500", "minerva", "olympiadbench", "amc23", "aime24", "gsm8k"]


def box(answer):
    return f"Some reasoning first.\nSo the answer is $\\boxed{{{answer}}}$."


CASES = [  # (completion, gold, expected score == 1)
    # extraction: nested braces, \boxed 5, \fbox, last box wins, cut-off box, fallbacks, no guessing
    (box("\\frac{1}{2}"), "\\frac12", True),
    ("\\boxed{\\boxed{7}}", "7", True),
    ("so $\\boxed 5$", "5", True),
    ("so \\boxed 5.", "5", True),
    ("\\fbox{12}", "12", True),
    ("first \\boxed{3}, on reflection \\boxed{4}", "4", True),
    ("first \\boxed{4}, on reflection \\boxed{3}", "4", False),              # wrong last box after a right one
    ("\\boxed{4} wait, let me redo: \\boxed{\\frac{1}{", "4", False),        # cut off inside the last box
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac34", True),
    ("Final Answer: The final answer is 12. I hope it is correct.", "12", True),
    ("The final answer is 3.5.", "3.5", True),
    ("The final answer is 3.5.", "3", False),
    ("48/2 = 24 clips in May.\n#### 72", "72", True),
    ("48/2 = 24 clips in May.\n#### 72", "24", False),
    ("#### 1,234", "1234", True),
    ("\\boxed{5} and then #### 6", "5", True),                              # a box beats ####
    ("#### 6\nThe final answer is 5", "5", True),                           # "final answer" beats ####
    ("The answer is probably 5.", "5", False),                              # no marker: no guessing
    ("", "5", False),
    ("\\boxed{}", "5", False),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", True),                             # escaped braces inside a box
    ("\\boxed{x^{2^{3}}}", "x^{8}", True),
    ("\\[\\boxed{(3, \\frac{\\pi}{2})}\\]", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    # normalisation: layout
    (box("\\left(1,2\\right)"), "(1,2)", True),
    (box("\\dfrac{17}{50}"), "\\frac{17}{50}", True),
    (box("\\tfrac12"), "0.5", True),
    (box("\\frac12"), "\\frac{1}{2}", True),
    (box("\\frac 59"), "\\frac{5}{9}", True),
    (box("\\frac9{19}"), "\\frac{9}{19}", True),
    (box("\\frac{270}7"), "\\frac{270}{7}", True),
    (box("\\frac12"), "12", False),
    (box("\\sqrt2"), "\\sqrt{2}", True),
    (box("x^2+1"), "x^{2}+1", True),
    (box("x^23"), "x^{23}", False),                                       # LaTeX x^23 is x^2 * 3
    (box("\\text{Evelyn}"), "Evelyn", True),
    (box("\\mathrm{east}"), "\\text{east}", True),
    (box("\\displaystyle \\frac{1}{2}"), "0.5", True),
    (box("\\$18.90"), "18.9", True),
    (box("$5$"), "5", True),
    (box("\u22125"), "-5", True),                                          # unicode minus
    (box("\u22125"), "5", False),
    (box("+2"), "2", True),
    (box("+2"), "-2", False),
    (box("18.0"), "18", True),
    (box("18.00"), "18", True),
    (box("18.5"), "18", False),
    (box("3.21."), "3.21", True),
    # normalisation: thousands separators
    (box("10,\\!080"), "10080", True),
    (box("11,\\! 111,\\! 111,\\! 100"), "11111111100", True),
    (box("58,500"), "58500", True),
    (box("1,234,567"), "1234567", True),
    (box("1,000"), "1", False),
    (box("1,23"), "123", False),                                           # not a thousands group: a list
    # units and degrees dropped, never converted (leniency)
    (box("5.4 \\text{ cents}"), "5.4", True),
    (box("864 \\mbox{ inches}^2"), "864", True),
    (box("\\frac{270}7\\text{ degrees}"), "\\frac{270}{7}", True),
    (box("5 cm"), "5", True),
    (box("12 dollars"), "12", True),
    (box("5 m"), "5", False),                                              # one letter is a variable, not a unit
    (box("3+4\\mathrm{i}"), "7", False),                                   # \mathrm{i} is not a unit
    (box("2\\mathrm{cm}"), "2", True),
    (box("90^\\circ"), "90", True),
    (box("90^{\\circ}"), "90\u00b0", True),
    (box("90"), "30^\\circ", False),
    (box("\\frac{\\pi}{2}"), "90^\\circ", False),                          # no radian/degree conversion
    # percent dropped, not scaled (leniency)
    (box("10\\%"), "10", True),
    (box("10"), "10\\%", True),
    (box("10\\%"), "0.1", False),
    (box("0.1"), "10\\%", False),
    (box("62.5\\%"), "62.5%", True),
    # "x =" prefixes
    (box("x=5"), "5", True),
    (box("5"), "x = 5", True),
    (box("y = 3 + 2x"), "y = 2x + 3", True),
    (box("2 x"), "f(x)=2x", True),
    (box("x \\in [-2,7]"), "[-2,7]", True),
    (box("x=5"), "x=6", False),
    (box("x+y=5"), "5", False),
    (box("5x - 7y + 11z + 4 = 0"), "5x-7y+11z+4=0", True),
    # numbers: exact, never rounded (leniency: 0.33 != 1/3)
    (box("0.5"), "\\frac{1}{2}", True),
    (box("\\frac{2}{4}"), "\\frac12", True),
    (box("0.33"), "\\frac13", False),
    (box("\\frac13"), "0.33", False),
    (box("0.333"), "1/3", False),
    (box("3.14"), "\\pi", False),
    (box(".35625"), "0.35625", True),
    (box("0.10"), "0.1", True),
    (box("5e-1"), "0.5", True),
    (box("4.5\\times10^{33}"), "4.5e33", True),
    (box("870000000"), "8.7 \\times 10^{8}", True),
    (box("8.7 \\times 10^{8}"), "8.7 \\times 10^{9}", False),
    (box("10^{-3}"), "0.001", True),
    (box("1e-3"), "0.01", False),
    (box("-3/2"), "-\\frac{3}{2}", True),
    (box("\\frac{-1}{1997}"), "-\\frac{1}{1997}", True),
    (box("3/2"), "2/3", False),
    (box("2^{10}"), "1024", True),
    (box(str(2**1009)), "2^{1009}", True),
    (box(str(2**1009 + 1)), "2^{1009}", False),
    (box("1 000"), "0", False),                                            # no juxtaposed numbers
    (box("2021 \\cdot 505 \\cdot 337"), str(2021 * 505 * 337), True),
    (box("4 \\times 5"), "20", True),
    # mixed numbers: a sum only as a whole answer
    (box("\\frac{9}{5}"), "1\\frac{4}{5}", True),
    (box("137.5"), "137 \\frac{1}{2}", True),
    (box("-1.5"), "-1\\frac12", True),
    (box("\\frac45"), "1\\frac45", False),
    (box("\\frac{2\\pi}{3}"), "2\\frac{\\pi}{3}", True),
    # radicals, pi and i in canonical form
    (box("2\\sqrt2"), "\\sqrt{8}", True),
    (box("\\sqrt{12}"), "2\\sqrt{3}", True),
    (box("\\frac{1}{\\sqrt3}"), "\\frac{\\sqrt{3}}{3}", True),
    (box("\\sqrt{117}"), "3\\sqrt{13}", True),
    (box("\\sqrt{2}\\sqrt{3}"), "\\sqrt6", True),
    (box("\\sqrt{\\frac{1}{2}}"), "\\frac{\\sqrt2}{2}", True),
    (box("\\sqrt3"), "3", False),
    (box("3"), "\\sqrt{3}", False),
    (box("\\sqrt{3}"), "\\sqrt{2}", False),
    (box("\\sqrt{9}"), "3", True),
    (box("9973"), "\\sqrt{99460729}", True),                                # 9973^2: the cube-root shortcut
    (box("4999\\sqrt{2}"), "\\sqrt{49980002}", True),                       # 2 * 4999^2
    (box("4999\\sqrt{3}"), "\\sqrt{49980002}", False),
    (box("\\sqrt[3]{7}"), "\\sqrt{7}", False),
    (box("\\sqrt[3]{4}"), "\\sqrt[3]{4}", True),
    (box("288\\pi"), "288 \\pi", True),
    (box("\\pi"), "3.14159", False),
    (box("2\\pi"), "\\pi", False),
    (box("2\\pi+18"), "18+2\\pi", True),
    (box("20000\\pi^{-1}"), "\\frac{20000}{\\pi}", True),
    (box("\\frac{\\pi}{8}"), "\\frac{\\pi^2}{8}", False),
    (box("-\\frac12+\\frac{\\sqrt5}{2}"), "\\frac{-1+\\sqrt{5}}{2}", True),
    (box("\\frac{5}{11}-\\frac{8\\sqrt3}{33}"), "\\frac{15-8 \\sqrt{3}}{33}", True),
    (box("2i+1"), "1+2i", True),
    (box("1-2i"), "1+2i", False),
    (box("-1"), "i^2", True),
    (box("-i"), "\\frac{1}{i}", True),
    (box("1+\\sqrt{3}i"), "1 + i\\sqrt{3}", True),
    # expressions: equal polynomials, never "2 == 2x"
    (box("2"), "2x", False),
    (box("2x"), "2", False),
    (box("2(k+1)"), "2k+2", True),
    (box("3x+x^3-6"), "x^3+3x-6", True),
    (box("ab+2a+5b+10"), "(a+5)(b+2)", True),
    (box("-q+p"), "p - q", True),
    (box("q-p"), "p - q", False),
    (box("2(3r^2-2r-12)"), "6r^2-4r-24", True),
    (box("n"), "2n", False),
    (box("x^3"), "x^2", False),
    (box("\\frac{n^2+n}{2}"), "\\frac{n(n+1)}{2}", True),
    (box("x^{-1}"), "\\frac{1}{x}", True),
    (box("\\cot x"), "\\cot x", True),
    (box("\\tan x"), "\\cot x", False),
    # tuples and intervals: ordered, bracket kind matters
    (box("(2,1)"), "(1,2)", False),
    (box("(1, 2)"), "(1,2)", True),
    (box("[1,2]"), "(1,2)", False),
    (box("(3,4)"), "(3,4]", False),
    (box("(3,4]"), "(3,4]", True),
    (box("(-\\infty,0]"), "(-\\infty, 0]", True),
    (box("(1.5,-13)"), "\\left( \\frac{3}{2}, -13 \\right)", True),
    (box("(6,31,1)"), "(6,31,-1)", False),
    (box("1,2"), "(1,2)", False),                                           # a pair is not a list
    (box("(9,36)\\cup(0,9)"), "(0,9) \\cup (9,36)", True),
    (box("(0,36)"), "(0,9) \\cup (9,36)", False),
    # lists of answers: unordered, \pm expands
    (box("-2,1"), "1,-2", True),
    (box("7, 5, 3"), "3, 5, 7", True),
    (box("1,2,3"), "1,2", False),
    (box("1,2"), "1,1,2", False),
    (box("1"), "1,-2", False),
    (box("5, 6"), "5", False),                                              # hedging between answers
    (box("1+\\sqrt{19}, 1-\\sqrt{19}"), "1 \\pm \\sqrt{19}", True),
    (box("1+\\sqrt{19}"), "1 \\pm \\sqrt{19}", False),
    (box("-2,1+\\sqrt5,1-\\sqrt5"), "\\{1\\pm\\sqrt{5},-2\\}", True),
    (box("x=2, x=1"), "1,2", True),
    (box("f(n)=n, g(n)=1"), "f(n)=1, g(n)=n", False),                       # different names are kept
    (box("(3,4),(1,2)"), "(1,2),(3,4)", True),
    (box("\\{1,2\\} \\cup \\{2,3\\}"), "\\{1,2,3\\}", True),                          # a union of sets, each item once
    (box("\\{1,2\\} \\cup \\{4\\}"), "\\{1,2,3\\}", False),
    (box("(2,1),(3,4)"), "(1,2),(3,4)", False),
    (box("f(x)=2-x, f(x)=x"), "f(x)=x,f(x)=2-x", True),
    # matrices
    (box("\\begin{bmatrix} -1/3 \\\\ 2/3 \\end{bmatrix}"),
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\end{pmatrix}", True),
    (box("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}"), "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", True),
    (box("\\begin{pmatrix}-1&0\\\\0&1\\end{pmatrix}"), "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", False),
    (box("\\begin{pmatrix}1&2\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),  # row vs column
    (box("(-7,16,5)"), "\\begin{pmatrix} -7 \\\\ 16 \\\\ 5 \\end{pmatrix}", False),
    # multiple choice letters
    (box("C"), "\\text{(C)}", True),
    (box("(C)"), "C", True),
    (box("\\textbf{(C)}\\ 12"), "\\text{(C)}", True),
    (box("\\textbf{(B)}"), "\\text{(C)}", False),
    (box("c"), "(C)", False),
    (box("(A) or (C)"), "(C)", False),                                     # hedging between choices
    # words: case-insensitive, never a product of letters
    (box("evelyn"), "\\text{Evelyn}", True),
    (box("\\text{east}"), "east", True),
    (box("seat"), "\\text{east}", False),
    (box("on"), "no", False),
    (box("\\text{odd}"), "\\text{even}", False),
    # bases and subscripts compare as text
    (box("52"), "52_8", False),
    (box("4210_5"), "4210_{5}", True),
]


def test_case_table_is_large_and_balanced():
    assert len(CASES) >= 150
    assert sum(not expected for _, _, expected in CASES) >= 50


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_score(completion, gold, expected):
    assert score(completion, gold) == float(expected)


def test_extract_answer():
    assert extract_answer(box("\\frac{a}{\\sqrt{b}}")) == "\\frac{a}{\\sqrt{b}}"
    assert extract_answer("\\boxed 42 is it") == "42"
    assert extract_answer("\\boxed{1} \\boxed{2") is None
    assert extract_answer("no answer here") is None
    assert extract_answer(None) is None
    assert extract_answer("The final answer is $x^2$. I hope it is correct.") == "x^2"
    assert extract_answer("#### 18") == "18"
    assert extract_answer("**Answer:** $\\frac12$") == "\\frac12" and extract_answer("Answer: \\(x\\).") == "x"
    assert extract_answer("the answer is 5. A misanswer is 6.") == "5"                   # "answer" as a word only
    assert extract_answer("the answer is above 10.\n#### 18") == "18" and extract_answer("#### 1\nAnswer: 2") == "2"


def test_gold_list_and_bad_gold():
    assert score(box("0.02"), ["0.01", "0.02"]) == 1.0
    assert score(box("0.03"), ["0.01", "0.02"]) == 0.0
    assert score(box("15000"), ("15000 \\text{ kcal m}^{-2} \\text{yr}^{-1}", "15000")) == 1.0
    for bad in (None, [], 5, ["1", None]):
        with pytest.raises(ValueError, match="gold must be"):
            score(box("1"), bad)


def test_gold_list_is_capped():
    assert score(box("7"), [str(i) for i in range(MAX_GOLDS)]) == 1.0
    start = time.perf_counter()
    for too_many in ([str(i) for i in range(MAX_GOLDS + 1)], ["x"] * 100_000):
        with pytest.raises(ValueError, match=f"1 to {MAX_GOLDS} strings"):
            score(box("7"), too_many)
    assert time.perf_counter() - start < 0.05  # refused before any is tried (100,000 once took 7.7 s)


KNOWN_MISSES = {  # labelled by the maths; grade.py gets these wrong (docs/grading.md)
    ("-3 < x < 3", "|x| < 3"),                                         # |x| < a is not read as an interval
    ("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", "-\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),  # no scalar * matrix
    ("The answer is 12, not 13.", "12"),                               # the sentence's rest is kept
}
LABELLED = load_cases()


def test_labelled_cases_are_many_and_balanced():
    kinds = {r["kind"] for r in LABELLED}
    assert len(LABELLED) - sum(r["kind"] == "public" for r in LABELLED) >= 200 and len(kinds) >= 15
    assert all(sum(r["kind"] == k for r in LABELLED) >= 10 for k in kinds - {"public"})
    assert sum(not r["label"] for r in LABELLED) >= 0.25 * len(LABELLED)
    assert {(r.get("answer"), r["gold"]) for r in LABELLED} >= {(k, g) for k, g, _ in PUBLIC}


@pytest.mark.parametrize("row", [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                 if (r.get("answer", r["completion"]), r["gold"]) in KNOWN_MISSES else r
                                 for r in LABELLED], ids=lambda r: f"{r['kind']}:{r['gold'][:30]}")
def test_labelled_case(row):
    assert score(row["completion"], row["gold"]) == float(row["label"])


PUBLIC = [  # math-verify issue 69 (false negatives) and issue 14 (false positives)
    ("pi/2", "\\dfrac{\\pi}{2}", True), ("-2*pi", "-2\\pi", True), ("-1+exp(16)", "e^{16}-1", True),
    ("\u00b12021", "2021", False), ("1/2004!", "1/2006!", False),
]


@pytest.mark.parametrize("answer,gold,expected", PUBLIC)
def test_public_cases_math_verify_gets_wrong(answer, gold, expected):
    assert is_equiv(answer, gold) == expected and is_equiv(gold, answer) == expected


def test_typical_call_is_under_5_ms():
    took = sorted(min(_timed(score, r["completion"], r["gold"]) for _ in range(3)) for r in LABELLED)
    assert took[len(took) // 2] < 0.005 and took[int(0.9 * len(took))] < 0.01, took[-5:]


def test_parse_trees_by_hand():
    half, two = ("n", grade.Fraction(1, 2)), ("n", grade.Fraction(2))
    assert grade.parse("\\sin 2x") == ("f", "sin", ("*", (two, ("v", "x"))))            # sin(2x), not sin(2) x
    assert grade.parse("\\sin x \\cos x") == ("*", (("f", "sin", ("v", "x")), ("f", "cos", ("v", "x"))))
    assert grade.parse("\\sin^{-1} x") == ("f", "arcsin", ("v", "x"))
    assert grade.parse("1/2/x") == ("*", (("n", 1), ("inv", two), ("inv", ("v", "x"))))  # left to right
    assert grade.parse("(n+1)!") == ("!", ("+", (("v", "n"), ("n", 1)))) and grade.parse("n2^n") == (
        "*", (("v", "n"), ("^", two, ("v", "n"))))
    assert grade.parse("-0.5") == ("n", -half[1]) and grade.parse("\\log_2 8") == ("log", two, ("n", 8))
    for refused in ("1 000", "cost", "I(0) e^{t}", "5!!", "\\sqrt[x]{2}", "(1+2", "\\foo"):
        with pytest.raises(grade.Refuse):
            grade.parse(refused)


def test_exact_values_by_hand():
    def exact(s):
        return grade.exact(grade.parse(s))
    F = grade.Fraction
    assert exact("\\sqrt{8}") == {(2, ()): 2} and exact("\\frac{1}{\\sqrt{2}}") == {(2, ()): F(1, 2)}
    assert exact("(1+i)^2") == {(1, (("i", 1),)): 2} and exact("e^{16}") == exact("exp(16)") == {(1, (("e", 16),)): 1}
    assert exact("\\frac{10!}{8!}") == {(1, ()): 90} and exact("4^{3/2}") == {(1, ()): 8}
    for no_exact in ("\\sin x", "2^{k}", "\\frac{1}{1+x}", "\\sqrt[3]{2}", "3001!", "10^{10^{10}}"):
        with pytest.raises(grade.Refuse):
            exact(no_exact)


def test_numeric_values_and_tolerance():
    at = {"x": 2 + 0j, "y": 3 + 0j}
    assert grade.numeric(grade.parse("x^2+\\frac{y}{x}"), at) == 5.5
    assert grade.numeric(grade.parse("\\sqrt[3]{-8}"), {}) == -2                   # the real cube root
    assert grade.numeric(grade.parse("\\binom{y}{x}"), at) == 3
    value = grade.value
    assert grade.equal(value("\\sqrt[3]{2}"), value("1.259921049894873"))          # 16 digits: within 1e-8
    assert not grade.equal(value("\\sqrt[3]{2}"), value("1.2599"))                 # 5 digits: not
    assert not grade.equal(value("\\frac{1}{3}"), value("0.333333333333"))         # exact values: no tolerance
    assert grade.equal(value("\\sqrt{x}\\sqrt{y}"), value("\\sqrt{xy}"))              # Re x, Re y > 0
    assert not grade.equal(value("|x|"), value("x")) and not grade.equal(value("e^{-50}"), value("e^{-51}"))
    assert not grade.equal(value("\\frac{1}{x}"), value("\\frac{1}{0}"))                # never defined: unequal
    assert not grade.equal(value("\\lfloor x \\rfloor"), value("1"))                     # x in [0.5, 3): no points
    assert grade.proportional(value("2x+4y-6"), value("x+2y-3"))
    assert not grade.proportional(value("2x+4y-6"), value("x+2y+3")) and not grade.proportional(
        value("1"), value("2"))


def test_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    assert score(box(f"__import__('os').system('touch {target}')"), "0") == 0.0 and not target.exists()


def test_is_equiv_rejects_non_strings_and_empty():
    assert not is_equiv(None, "1") and not is_equiv("1", None) and not is_equiv("", "") and not is_equiv("$", "$")
    assert GRADER_VERSION == "2"


def _rows(data_dir, name):
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_gold_boxed_scores_one(name, data_dir):
    start = time.perf_counter()
    for row in _rows(data_dir, name):
        for answer in row.get("answers", [row["answer"]]):
            assert score("... \\boxed{" + answer + "}", answer) == 1.0, answer
        assert score("... \\boxed{" + row["answer"] + "}", row.get("answers", row["answer"])) == 1.0
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_gold_false_positive_rate(name, data_dir):
    rows = _rows(data_dir, name)
    answers = [r["answer"] for r in rows]
    wrong, tried = 0, 0
    for i, row in enumerate(rows):  # box the next row whose answer differs as text
        j = next((k % len(rows) for k in range(i + 1, i + len(rows))
                  if answers[k % len(rows)].replace(" ", "") != answers[i].replace(" ", "")), None)
        if j is not None:
            tried += 1
            wrong += score("\\boxed{" + answers[j] + "}", row.get("answers", answers[i])) == 1.0
    assert tried > 0.9 * len(rows)
    assert wrong / tried < 0.01, (wrong, tried)


ADVERSARIAL = [
    "\\boxed{10^{10^{10}}}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",                         # 100 KB of nested braces
    "\\boxed{" + "{" * 100_000,
    "\\boxed{" * 20_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "\\boxed{" + "9" * 999 + "}",
    "#### " + "1" * 100_000,
    "The final answer is " * 5_000,
    "\\boxed{1e999999999}",
    "\\boxed{(x+y+z+1)^{4096}}",
    "\\boxed{" + "(a+b)" * 150 + "}",
    "\\boxed{" + "(a+b+c+d+f+g+h+k)" * 40 + "}",
    "\\boxed{\\sqrt{" + "9" * 40 + "}}",
    "\\boxed{" + "\\sqrt{99999989}" * 60 + "}",                           # a prime just under the radicand cap
    "\\boxed{" + "(" * 499 + "1" + ")" * 499 + "}",
    "\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 100 + "}",
    "\\boxed{" + "\\sqrt{" * 150 + "2" + "}" * 150 + "}",
    "\\boxed{" + ",".join(["(1,2)"] * 160) + "}",
    "\\boxed{" + "\\text{ab}" * 100 + "}",
    "\\boxed{1" + "\\text{ cm}" * 90 + "x}",
    "\\boxed{" + "x^" * 450 + "2}",
    "\\boxed{" + "1+" * 450 + "1}",
    "\\boxed{0^{-1}}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{" + "1.5e3000" * 100 + "}",
    "\\" * 100_000,
    "a" * 100_000,
    "\\boxed{1000!}", "\\boxed{" + "1000!" * 60 + "}", "\\boxed{\\binom{3000}{1500}}", "\\boxed{3000!-2999!}",
    "\\boxed{e^{e^{e^{e^{e^{e^{100}}}}}}}", "\\boxed{" + "\\sin(" * 40 + "x" + ")" * 40 + "}",
    "\\boxed{(1+x)^{4096}-(1+x)^{4095}}", "\\boxed{2^{0.5^{-4096}}}", "\\boxed{\\sqrt[99]{" + "9" * 300 + "}}",
    "\\boxed{" + "|" * 400 + "}", "\\boxed{" + "x<" * 490 + "x}", "\\boxed{" + "\\{1\\}\\cup" * 100 + "\\{1\\}}",
    "The answer is " + "9" * 2_000_000, "x" * 3_000_000 + " the answer is 5",             # megabytes of text
]


def test_adversarial_inputs_are_fast():
    golds = ["1", "x^{2}+1", "(1,2)", "9" * 999, "\\frac{1}{2}"]
    for text in ADVERSARIAL:
        for gold in golds:
            best = min(_timed(score, text, gold) for _ in range(3))  # best of 3: the machine is shared
            assert best < 0.05, (text[:60], gold[:20], best)
        answer = extract_answer(text)
        if answer is not None:
            assert min(_timed(is_equiv, answer, answer) for _ in range(3)) < 0.05, text[:60]
    assert score("\\boxed{" + "9" * 999 + "}", "9" * 999) == 1.0
    assert score("\\boxed{10^{10^{10}}}", "1") == 0.0


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


CHARSET = list("\\{}^_()[],.$0123456789\\{}^_()[],.$-+=/ xie") + [
    "\\boxed{", "\\fbox", "\\frac", "\\sqrt", "\\pi", "\\pm", "\\cup", "\\text{", "\\left(", "\\right)", "\\!",
    "\\%", "^\\circ", "\\begin{pmatrix}", "\\end{pmatrix}", "\\\\", "&", "####", "The final answer is ", "10^{",
    "!", "<", "\\le", "|", "\\sin", "\\ln", "e^{", "\\sqrt[3]", "\\binom", "\u03c0", "\u221a", "\u00b1", "pi", "exp("]


def test_random_strings_never_raise_or_hang():
    rng = random.Random(0)
    strings = ["".join(rng.choice(CHARSET) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    slowest = 0.0
    for a, b in zip(strings, strings[1:] + strings[:1]):
        start = time.perf_counter()
        s = score(a, b)
        e = is_equiv(a, b)
        assert s in (0.0, 1.0) and e == is_equiv(b, a)                     # symmetric
        assert is_equiv(a, a) or not _normalize(a)                        # reflexive on non-empty answers
        extract_answer(a)
        slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.2  # four calls, each well under 50 ms
