"""data.py: prompts against each model's own jinja chat template and the real Qwen2.5 tokenizer; the real data files;
every field variant and error message; resolve_data offline (no test touches the network or ~/.cache)."""
import argparse
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model  # noqa: E402
from data import DAPO_WRAP, KNOWN, chat_family, format_prompt, read_problems, resolve_data  # noqa: E402

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

# chat_template of huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-8B tokenizer_config.json (the Feb 2025
# revision that opens the assistant turn with <think>\n), from published copies of that file; not on disk here.
R1_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    r"{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    r"tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + "
    r"'```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)
R1_SPECIAL = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}

PROBLEMS = [
    "What is $1+1$?",
    "Let $S=\\{x : x^2<4\\}$. Find $\\sum_{k=1}^{n} {k \\choose 2}$ for {{ n }} and {% raw %} n=3.",  # braces, jinja
    "Line one.\n\nLine two, then a trailing newline.\n",
    "  leading and trailing spaces  ",
    "Unicode: π ≈ 3.14159, x² ≥ 0, 数学题, naïve café, emoji 🚀, fullwidth ｜ and ▁.",
]


def config(folder):
    return json.loads((folder / "tokenizer_config.json").read_text())


def render(template, content, **special):
    """What transformers' apply_chat_template renders: one user message, add_generation_prompt=True."""
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=[{"role": "user", "content": content}],
                                            add_generation_prompt=True, **special)


def real_template(family, request):
    """The family's own jinja template and special tokens (the folders from conftest's fixtures)."""
    if family == "r1":
        return R1_TEMPLATE, R1_SPECIAL
    cfg = config(request.getfixturevalue({"qwen2.5": "qwen_tokenizer_dir", "chatml": "smollm2"}[family]))
    return cfg["chat_template"], {"bos_token": cfg.get("bos_token"), "eos_token": cfg.get("eos_token")}


@pytest.fixture(autouse=True)
def no_network_no_home(monkeypatch, tmp_path):
    """Every test: hub offline, cache under tmp_path, no $PTE_DATA of the caller."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PTE_DATA", raising=False)


@pytest.fixture
def grader(monkeypatch):
    """The colleague's grade.extract_answer once it exists; until then a stand-in for \\boxed{} and '#### N'."""
    try:
        import grade  # noqa: F401
    except ImportError:
        def extract_answer(text):
            if "\\boxed{" in text:
                return text.rsplit("\\boxed{", 1)[1].split("}", 1)[0]
            return text.rsplit("####", 1)[1].strip() if "####" in text else None
        monkeypatch.setitem(sys.modules, "grade", types.SimpleNamespace(extract_answer=extract_answer))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- chat templates ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2.5", "chatml", "r1"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_prompt_equals_the_models_own_template(family, problem, request):
    template, special = real_template(family, request)
    assert format_prompt(problem, family) == render(template, problem + SUFFIX, **special)


@pytest.mark.parametrize("family", ["qwen2.5", "chatml", "r1"])
def test_prompt_equals_template_on_real_problems(family, request, data_dir):
    template, special = real_template(family, request)
    for p in read_problems(data_dir / "math500.jsonl")[:20]:
        assert format_prompt(p["problem"], family) == render(template, p["problem"] + SUFFIX, **special)


def test_prompts_by_hand():
    # written out independently of any template: the exact strings the models must see
    q = "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert format_prompt("What is $1+1$?", "r1") == (
        f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜><think>\n")
    assert format_prompt("What is $1+1$?", "qwen2.5") == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    assert format_prompt("What is $1+1$?", None) == "What is $1+1$?"  # toy model: raw text, no suffix


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="llama3"):
        format_prompt("x", "llama3")


def test_qwen_tokenizer_ids(qwen_tokenizer_dir):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    ids = tok.encode(format_prompt("What is $1+1$?", "qwen2.5"), add_special_tokens=False).ids
    tail = tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    assert tail == [151644, 77091, 198]  # <|im_start|> is one special token, not split into text pieces
    assert ids[0] == 151644 and ids[-3:] == tail
    assert ids.count(151644) == 3 and ids.count(151645) == 2  # system, user, assistant opened; two closed


# --- chat_family --------------------------------------------------------------------------------------------------

def test_chat_family_real_folders(qwen_tokenizer_dir, smollm2):
    assert chat_family(qwen_tokenizer_dir) == "qwen2.5"
    assert chat_family(smollm2) == "chatml"


def test_chat_family_from_config_and_jinja_file(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "tokenizer_config.json").write_text(json.dumps({"chat_template": R1_TEMPLATE}))
    assert chat_family(tmp_path / "r1") == "r1"
    (tmp_path / "jinja").mkdir()  # newer transformers save the template next to the config
    (tmp_path / "jinja" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "jinja" / "chat_template.jinja").write_text(R1_TEMPLATE)
    assert chat_family(tmp_path / "jinja") == "r1"


def test_chat_family_none_without_template(tmp_path):
    assert chat_family(tmp_path) is None  # our toy model: no tokenizer_config.json at all
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert chat_family(tmp_path) is None


def test_chat_family_refuses_unknown_templates(tmp_path):
    old_r1 = R1_TEMPLATE.replace("<｜Assistant｜><think>\\n'", "<｜Assistant｜>'")  # pre-Feb-2025: no <think>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": old_r1}))
    with pytest.raises(ValueError, match="no known family"):
        chat_family(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        chat_family(tmp_path / "nowhere")


# --- read_problems: the real files --------------------------------------------------------------------------------

COUNTS = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675, "gsm8k": 1319,
          "math_train": 7470, "aime_train": 975}


@pytest.mark.parametrize("name", COUNTS)
def test_real_files(name, data_dir):
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    problems = read_problems(path)
    assert len(problems) == COUNTS[name]
    for p in problems:
        assert set(p) == {"id", "problem", "answer"} and p["problem"].strip() and p["id"]
        answers = p["answer"] if isinstance(p["answer"], list) else [p["answer"]]
        assert answers and all(isinstance(a, str) and a.strip() for a in answers)
    if name == "minerva":  # 40 rows carry alternatives; `answers` wins and its first is `answer`
        lists = [p for p in problems if isinstance(p["answer"], list)]
        assert len(lists) == 40 and lists[0]["answer"][0] == "0.01" and "0.02" in lists[0]["answer"]
        assert problems[0] == {"id": "minerva-9", "problem": problems[0]["problem"], "answer": "9.6"}
    if name == "gsm8k":
        assert problems[0]["answer"] == "18" and all(p["answer"].replace(",", "").lstrip("-").replace(".", "")
                                                     .isdigit() for p in problems)


# --- read_problems: field variants and errors -----------------------------------------------------------------------

def test_field_variants(tmp_path, grader):
    verl = {"prompt": [{"role": "user", "content": DAPO_WRAP[0] + "Find $n$." + DAPO_WRAP[1]}],
            "reward_model": {"style": "rule", "ground_truth": "34"}}
    path = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"question": "Q1", "final_answer": "3"}),
        json.dumps({"problem": "Q2", "solution": "so the answer is $\\boxed{17}$."}),
        "",  # blank lines are skipped but still counted, so ids keep naming real line numbers
        json.dumps({"question": "Q4", "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 72"}),
        json.dumps({"id": "m-1", "problem": "Q5", "answer": "0.01", "answers": ["0.01", "0.02"]}),
        json.dumps({"ID": "1983-1", "Question": "Q6", "Answer": 70}),
        json.dumps({"id": 7, "question": "Q7", "final_answer": ["$1$", "$-2$"]}),
        json.dumps(verl),
        json.dumps({"unique_id": "test/algebra/1.json", "problem": "  Q9\n", "answer": " 4 ",
                    "solution": "\\boxed{5}"}),
    ])
    assert read_problems(path) == [
        {"id": "mixed/1", "problem": "Q1", "answer": "3"},
        {"id": "mixed/2", "problem": "Q2", "answer": "17"},
        {"id": "mixed/4", "problem": "Q4", "answer": "72"},
        {"id": "m-1", "problem": "Q5", "answer": ["0.01", "0.02"]},
        {"id": "1983-1", "problem": "Q6", "answer": "70"},
        {"id": "7", "problem": "Q7", "answer": "$1$, $-2$"},
        {"id": "mixed/8", "problem": "Find $n$.", "answer": "34"},
        {"id": "test/algebra/1.json", "problem": "Q9", "answer": "4"},  # an answer field beats the solution
    ]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"problem": "Q", "answer": "1"', "Expecting"),  # truncated JSON
    ('["Q", "1"]', "JSON object"),
    ('{"answer": "1"}', "no problem"),
    ('{"problem": "   ", "answer": "1"}', "no problem"),
    ('{"problem": "Q"}', "no answer"),
    ('{"problem": "Q", "answer": ""}', "no answer"),
    ('{"id": "a", "problem": "Q", "answer": "1"}', "twice"),
])
def test_malformed_line_names_file_and_line(tmp_path, grader, bad_line, reason):
    path = write_lines(tmp_path / "bad.jsonl", ['{"id": "a", "problem": "P", "answer": "2"}', "", bad_line])
    with pytest.raises(ValueError) as err:
        read_problems(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and reason in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_problems(tmp_path / "nothing.jsonl")
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(ValueError, match="no problems"):
            read_problems(tmp_path / "empty.jsonl")


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "P", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=rf"{path}, line 2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        read_problems(path)


# --- load_problems and encode_prompts: the data path of train.py and eval.py -----------------------------------------

def test_generated_sets_are_the_toys_problems():
    assert data.load_problems("toy-eval", seed=5)[:7] == data.make_problems(7, data.EVAL_SEED)  # any seed: one test set
    assert data.load_problems("toy-train", seed=5) == data.make_problems(20_000, 5)


def test_prompts_that_leave_too_few_thought_slots_are_set_aside():
    """Each prompt against the budget on its own (docs/method.md §2: W_i = budget - len_i): at budget 23 the 19-token
    toy prompts leave exactly MIN_THOUGHT_SLOTS = 4 and stay; the 20- and 21-token ones leave 3 and 2 and go."""
    import toy
    from cache import MIN_THOUGHT_SLOTS
    tokenizer = toy.make_tokenizer()
    base = data.make_problems(3, 0)
    problems = [base[0], dict(base[1], problem=base[1]["problem"].replace("<sep>", "1 <sep>")), base[2],
                dict(base[0], id="x", problem=base[0]["problem"].replace("<sep>", "1 2 <sep>"))]
    kept, ids, set_aside = data.encode_prompts(problems, tokenizer, None, budget=23)
    assert MIN_THOUGHT_SLOTS == 4 and [p["id"] for p in kept] == [base[0]["id"], base[2]["id"]] and set_aside == 2
    assert ids == [tokenizer.encode(p["problem"], add_special_tokens=False).ids for p in kept] and len(ids[0]) == 19
    kept, ids, set_aside = data.encode_prompts(problems, tokenizer, None, budget=None)  # the full cache: no limit
    assert len(kept) == 4 and set_aside == 0 and [len(i) for i in ids] == [19, 20, 19, 21]


def test_a_word_outside_the_toys_vocabulary_is_named():
    import toy
    problems = [dict(id="a", problem="<bos> 1 2 <sep>", answer="3"),
                dict(id="b", problem="<bos> 1 seven 2 eight <sep>", answer="0")]
    with pytest.raises(ValueError, match="problem 'b': word.s. 'seven', 'eight' outside the tokenizer's vocabulary"):
        data.encode_prompts(problems, toy.make_tokenizer(), None)


@pytest.mark.parametrize("name, set_aside", [("math_train", 7), ("olympiadbench", 2)])
def test_real_data_at_cache_1024(name, set_aside, data_dir, qwen_tokenizer_dir):
    """Every problem of math_train and OlympiadBench through the data path with the real Qwen2.5 tokenizer and chat
    template at --cache 1024: exactly those over 1020 tokens are set aside (7 of 7,470, the longest 1,698 tokens; 2 of
    675), each length counted here one prompt at a time."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    family = chat_family(qwen_tokenizer_dir)
    problems = data.load_problems(name, data_dir)
    kept, ids, n_set_aside = data.encode_prompts(problems, tokenizer, family, budget=1024)
    lengths = {p["id"]: len(tokenizer.encode(format_prompt(p["problem"], family), add_special_tokens=False).ids)
               for p in problems}
    too_long = {i for i, n in lengths.items() if n > 1020}
    assert n_set_aside == len(too_long) == set_aside and len(kept) == len(problems) - set_aside
    assert {p["id"] for p in kept} == set(lengths) - too_long
    assert [len(i) for i in ids] == [lengths[p["id"]] for p in kept]
    if name == "math_train":
        assert max(lengths.values()) == 1698


# --- resolve_data ---------------------------------------------------------------------------------------------------

def fake_hub(monkeypatch, files=None):
    """A huggingface_hub whose download serves local files (or fails the test): no network, calls recorded."""
    calls = []

    def hf_hub_download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        if files is None:
            raise AssertionError("the hub was called")
        return str(files[(repo_id, filename)])

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


def test_resolve_paths_and_local_names(tmp_path, monkeypatch):
    own = write_lines(tmp_path / "own.jsonl", ['{"problem": "Q", "answer": "1"}'])
    assert resolve_data(own) == own and resolve_data(str(own)) == own
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        resolve_data(tmp_path / "gone.jsonl")
    (tmp_path / "d").mkdir()
    local = write_lines(tmp_path / "d" / "aime25.jsonl", ['{"problem": "Q", "answer": "1"}'])
    assert resolve_data("aime25", tmp_path / "d") == local
    monkeypatch.setenv("PTE_DATA", str(tmp_path / "d"))
    assert resolve_data("aime25") == local


def test_resolve_unknown_name_lists_known(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_data("aime2099", tmp_path)
    assert str(tmp_path / "aime2099.jsonl") in str(err.value) and all(name in str(err.value) for name in KNOWN)


def test_resolve_offline_says_where_and_whence(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch)  # would fail the test if called: HF_HUB_OFFLINE must stop us first
    with pytest.raises(FileNotFoundError) as err:
        resolve_data("aime25", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "aime25.jsonl") in message and "math-ai/aime25" in message and "test.jsonl" in message
    assert "HF_HUB_OFFLINE" in message and not calls


def test_resolve_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when not installed
    with pytest.raises(FileNotFoundError) as err:
        resolve_data("minerva", tmp_path)
    assert str(tmp_path / "minerva.jsonl") in str(err.value) and "math-ai/minervamath" in str(err.value)
    assert "Fetching failed: ModuleNotFoundError" in str(err.value)


def test_resolve_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = fake_hub(monkeypatch)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FileNotFoundError) as err:
        resolve_data("dapo-math-17k", tmp_path)
    message = str(err.value)
    assert "BytedTsinghua-SIA/DAPO-Math-17k" in message and "data/dapo-math-17k.parquet" in message
    assert "needs pyarrow" in message and str(tmp_path / "dapo-math-17k.jsonl") in message and not calls


def test_fetch_converts_once_into_the_cache(tmp_path, monkeypatch, grader):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub = write_lines(tmp_path / "test.jsonl", [json.dumps({"id": 0, "problem": "Find $x$.", "answer": 70}),
                                                json.dumps({"id": 1, "problem": "Find $y$.", "answer": "588"})])
    calls = fake_hub(monkeypatch, {("math-ai/aime25", "test.jsonl"): hub})
    cached = Path(os.environ["XDG_CACHE_HOME"]) / "pte" / "data" / "aime25.jsonl"
    assert resolve_data("aime25", tmp_path / "empty") == cached
    assert read_problems(cached) == [{"id": "0", "problem": "Find $x$.", "answer": "70"},
                                     {"id": "1", "problem": "Find $y$.", "answer": "588"}]
    assert resolve_data("aime25", tmp_path / "empty") == cached and calls == [("math-ai/aime25", "test.jsonl",
                                                                                "dataset")]  # second call: cache


def test_fetch_csv_drops_aime2024_repeats_and_unusable_rows(tmp_path, monkeypatch, grader):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub = tmp_path / "AIME_Dataset_1983_2024.csv"
    hub.write_text("ID,Year,Problem Number,Question,Answer,Part\n"
                   "1983-1,1983,1,First question,60,\n"
                   "1983-1b,1983,1,First question,60,\n"  # the same problem again
                   "1983-2,1983,2,,3,\n"  # no problem text
                   "2024-I-1,2024,1,Aime24 question,204,I\n")  # the aime24 eval set
    fake_hub(monkeypatch, {("di-zhang-fdu/AIME_1983_2024", "AIME_Dataset_1983_2024.csv"): hub})
    assert read_problems(resolve_data("aime_train", tmp_path)) == [
        {"id": "1983-1", "problem": "First question", "answer": "60"}]


# --- a fresh clone: the tests find what they need through the environment, or say how to get it ----------------------

def test_tests_read_no_path_of_this_machine():
    marks = [m.replace("|", "") for m in ("/wo|rk/", "/ro|ot/", "../sha|red", '"sha|red"', "smollm2-135m-ins|truct")]
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not [m for m in marks if m in text], f"{path.name} reads a path of this machine: use conftest's fixtures"


@pytest.mark.parametrize("what, example", [("SMOLLM2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                           ("QWEN_TOKENIZER", "Qwen/Qwen2.5-0.5B-Instruct")])
def test_a_missing_folder_skips_saying_how_to_get_it(what, example, monkeypatch, tmp_path):
    import conftest
    variable, repo, files, how = getattr(conftest, what)
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hugging Face cache
    with pytest.raises(pytest.skip.Exception) as skip:
        conftest.folder_from(variable, repo, files, how)
    assert f"huggingface-cli download {example}" in str(skip.value)
    assert f"or set {variable} to a folder holding {', '.join(files)}" in str(skip.value)
    snapshot, math = (tmp_path / "hub" / f"models--{name.replace('/', '--')}" / "snapshots" / "abc"
                      for name in (example, "Qwen/Qwen2.5-Math-1.5B-Instruct"))  # math: newer, another template
    for folder in (snapshot, math):
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}")
    assert conftest.folder_from(variable, repo, files, how) == snapshot  # found in the cache
    monkeypatch.setenv(variable, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=f"{variable}={tmp_path} lacks {files[0]}"):
        conftest.folder_from(variable, repo, files, how)


def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    """A save that dies midway leaves the old file as it was; a finished one replaces it whole."""
    path = tmp_path / "results.json"
    path.write_text("old")

    def dies(p):
        p.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(path, dies)
    assert path.read_text() == "old"
    data.atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "new"


# ---------------------------------------------------------------------------------------------------- command lines

def test_number_checks_text_and_values_from_files_alike():
    positive, share = data.number(float, 0, above=True), data.number(float, 0, 1, above=True)
    count = data.number(int, 1)
    assert (positive("1e-3"), positive(2), share(1), count("7"), count(7)) == (1e-3, 2.0, 1.0, 7, 7)
    for parse, value, message in ((positive, "inf", "must be > 0, got inf"), (positive, "nan", "must be > 0, got nan"),
                                  (positive, float("inf"), "got inf"), (positive, True, "must be a number, got True"),
                                  (share, 1.5, "must be > 0 and <= 1, got 1.5"), (count, 2.5, "an integer, got 2.5"),
                                  (count, False, "must be an integer, got False"), (count, 0, "must be >= 1, got 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(value)
    with pytest.raises(ValueError):  # argparse turns it into "invalid int value"
        count("1e9")


def test_file_value_applies_the_flags_checks():
    p = argparse.ArgumentParser()
    actions = {a.dest: a for a in (p.add_argument("--n", type=data.number(int, 1)),
                                   p.add_argument("--on", action="store_true"),
                                   p.add_argument("--kind", choices=["a", "b"]), p.add_argument("--name"))}
    assert [data.file_value(actions[k], v) for k, v in (("n", 3), ("n", "3"), ("on", False), ("kind", "b"),
                                                         ("name", "x"))] == [3, 3, False, "b", "x"]
    for key, value, message in (("n", "x", "invalid int value 'x'"), ("on", "yes", "must be true or false"),
                                ("kind", "c", "must be one of a, b, got 'c'"), ("name", 5, "must be a string, got 5")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            data.file_value(actions[key], value)


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "x.json"
    for text, message in (("{", "x.json: malformed JSON"), ("[1]", "x.json: expected a JSON object, got list")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            model.read_json(path)
    with pytest.raises(FileNotFoundError, match="y.json not found"):
        model.read_json(tmp_path / "y.json")
    path.write_text('{"a": 1}')
    assert model.read_json(path) == {"a": 1}


def test_only_writer_holds_a_folder(tmp_path):
    """The lock is the OS's (flock, per open file): a second holder, here the same process through another open of
    the lock file, is refused at once with the first's PID; it is free again once the first lets go."""
    folder = tmp_path / "new" / "out"
    with data.only_writer(folder):
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n" and data.contents(folder) == []
        with pytest.raises(ValueError, match=re.escape(f"--out {folder} is in use by another process (PID "
                                                       f"{os.getpid()}): wait for it to end, or name another folder")):
            with data.only_writer(folder):
                pass
    with data.only_writer(folder, "--resume"):
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: not a folder"):
        with data.only_writer(tmp_path / "file"):
            pass
