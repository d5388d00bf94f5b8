"""What train.py and eval.py both need: the problems, the prompt, and the helpers of their command lines.

read_problems reads one JSONL file in any usual field variant; resolve_data turns a data set name into a file, fetching
a known one once from the Hugging Face hub; load_problems also makes the GENERATED sets (the toy's); encode_prompts
sets aside the prompts that leave too few thought slots under the cache budget; chat_family and format_prompt write
each model's chat template by hand (no jinja2 at run time; tests/test_data.py proves them equal to the models' own
jinja templates).
Prompt (the Qwen2.5-Math CoT convention): the template around one user message
`{problem}\\nPlease reason step by step, and put your final answer within \\boxed{}.` and no system message of our own
(the template adds its default one, as apply_chat_template does), then the generation prompt.
Departures: the hub copies of the sets (KNOWN) may differ in a few rows from other mirrors of them; aime_train from
the hub (AIME 1983-2024) loses its 2024 rows, which are the aime24 eval set.
The command lines' helpers (the last section): argparse types whose checks also serve values read from files,
torchrun's ranks and the device, one writer a folder (an OS lock), and stopping on SIGINT or SIGTERM.
"""
import argparse
import csv
import fcntl
import importlib.util
import json
import math
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from model import read_json

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = {  # family -> its chat template rendered for one user message `{}` with add_generation_prompt=True
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    "chatml": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",  # SmolLM2 adds its system turn when none
    # the template itself emits the BOS token
    "r1": "<｜begin▁of▁sentence｜><｜User｜>{}<｜Assistant｜><think>\n",
}
# family -> text only its jinja template holds (R1 templates from before Feb 2025 lack <think>: refused, not misread)
FAMILY_MARKS = {"r1": "<｜Assistant｜><think>", "qwen2.5": "You are Qwen, created by Alibaba Cloud.",
                "chatml": "named SmolLM"}
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
KNOWN = {  # name -> (Hugging Face dataset repo, its files that together make the set)
    "math500": ("HuggingFaceH4/MATH-500", ("test.jsonl",)),
    "aime24": ("HuggingFaceH4/aime_2024", ("data/train-00000-of-00001.parquet",)),
    "aime25": ("math-ai/aime25", ("test.jsonl",)),
    "amc23": ("math-ai/amc23", ("test-00000-of-00001.parquet",)),
    "minerva": ("math-ai/minervamath", ("test.jsonl",)),
    "olympiadbench": ("Hothan/OlympiadBench", ("OlympiadBench/OE_TO_maths_en_COMP/OE_TO_maths_en_COMP.parquet",)),
    "gsm8k": ("openai/gsm8k", ("main/test-00000-of-00001.parquet",)),
    "math_train": ("EleutherAI/hendrycks_math", tuple(f"{s}/train-00000-of-00001.parquet" for s in MATH_SUBJECTS)),
    "aime_train": ("di-zhang-fdu/AIME_1983_2024", ("AIME_Dataset_1983_2024.csv",)),
    "dapo-math-17k": ("BytedTsinghua-SIA/DAPO-Math-17k", ("data/dapo-math-17k.parquet",)),
}
DAPO_WRAP = (  # DAPO wraps each problem in its own 'Answer:' instruction; we use the \boxed{} one instead
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n",
    '\n\nRemember to put your answer on its own line after "Answer:".')


def _answer(row: dict) -> str | list[str] | None:
    """The reference answer: the `answers` alternatives win, then answer/final_answer, then the solution's."""
    alternatives = row.get("answers")
    if isinstance(alternatives, list) and alternatives and all(isinstance(a, str) and a.strip() for a in alternatives):
        return [a.strip() for a in alternatives]
    value = row.get("answer", row.get("final_answer"))
    if isinstance(value, list):  # OlympiadBench: the parts of one "find all" answer
        value = ", ".join(map(str, value))
    value = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    if value and "####" not in value:
        return value
    solution = value or row.get("solution")  # GSM8K's own answer field is a worked solution ending in '#### 72'
    if not isinstance(solution, str):
        return None
    from grade import extract_answer  # lazy: only rows without a plain answer need the grader
    return extract_answer(solution)


def to_problem(row, default_id: str) -> dict:
    """One source row (any field variant, keys in any case) -> {"id", "problem", "answer"}; ValueError if unusable."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    row = {k.lower(): v for k, v in row.items()}
    messages = row.get("prompt")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and "reward_model" in row:  # verl
        text = str(messages[-1].get("content") or "")
        row = {"problem": text.removeprefix(DAPO_WRAP[0]).removesuffix(DAPO_WRAP[1]), "id": row.get("id"),
               "answer": (row["reward_model"] or {}).get("ground_truth")}
    problem = next((row[k] for k in ("problem", "question") if isinstance(row.get(k), str) and row[k].strip()), None)
    if problem is None:
        raise ValueError("no problem text (field 'problem' or 'question')")
    answer = _answer(row)
    if not answer:
        raise ValueError("no answer (field 'answer', 'final_answer' or 'answers', or a 'solution' holding \\boxed{} "
                         "or '#### N')")
    ident = next((str(row[k]) for k in ("id", "unique_id") if row.get(k) not in (None, "")), default_id)
    return {"id": ident, "problem": problem.strip(), "answer": answer}


def read_problems(path) -> list[dict]:
    """JSONL -> [{"id": str, "problem": str, "answer": str | list[str]}]; a list holds equally right alternatives.
    A row without an id gets "<file stem>/<line>". Errors name the file and the 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no problem file at {path}")
    problems, ids = [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                problem = to_problem(json.loads(line), f"{path.stem}/{n}")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                                 ) from None
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}, line {n}: {e}") from None
            if problem["id"] in ids:  # eval keys its per-sample outputs by id
                raise ValueError(f"{path}, line {n}: id {problem['id']!r} appears twice")
            ids.add(problem["id"])
            problems.append(problem)
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def atomic_write(path: Path, save):
    """save(a temporary path), then rename it to path: a half-written file never looks done (the temporary name is
    the process's own: two commands may write one ledger)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save(tmp)
    os.replace(tmp, path)


def load_problems(name_or_path, data_dir=None, seed=0) -> list[dict]:
    """The problems of a data set: a GENERATED one made from `seed`, else read_problems(resolve_data(...))."""
    if name_or_path in GENERATED:
        return GENERATED[name_or_path](seed)
    return read_problems(resolve_data(name_or_path, data_dir))


def _encode(tokenizer, text, ident):
    """One prompt's ids; an error names the problem and the words outside a word-level vocabulary (the toy's)."""
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    except Exception as e:  # tokenizers raises a bare Exception
        vocab, split = tokenizer.get_vocab(), tokenizer.pre_tokenizer
        unknown = [w for w, _ in split.pre_tokenize_str(text) if w not in vocab] if split else []
        what = (f"word(s) {', '.join(map(repr, unknown))} outside the tokenizer's vocabulary" if unknown
                else "cannot encode it")
        raise ValueError(f"problem {ident!r}: {what} ({e})") from None


def encode_prompts(problems, tokenizer, family, budget=None):
    """(the problems whose prompt fits, their prompt ids, how many were set aside). A row's thought window is what the
    cache budget leaves after its own prompt (docs/method.md §2); a prompt that leaves fewer than MIN_THOUGHT_SLOTS
    is set aside here, when the data is loaded, so that no step or batch can fail on it. budget None (the full
    cache): every prompt fits."""
    from cache import MIN_THOUGHT_SLOTS
    texts = [format_prompt(p["problem"], family) for p in problems]
    try:
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    except Exception:  # find the culprit and name it
        ids = [_encode(tokenizer, text, p["id"]) for text, p in zip(texts, problems)]
    keep = [i for i, row in enumerate(ids) if budget is None or budget - len(row) >= MIN_THOUGHT_SLOTS]
    return [problems[i] for i in keep], [ids[i] for i in keep], len(problems) - len(keep)


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f)) if path.endswith(".csv") else [json.loads(line) for line in f if line.strip()]


def _fetch(name: str, target: Path) -> None:
    """Download KNOWN[name] from the hub and write it to `target` as our JSONL, dropping unusable and repeated rows
    (DAPO-Math-17k's parquet repeats each problem many times)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):  # huggingface_hub reads it only when first imported
        raise OSError("HF_HUB_OFFLINE is set")
    repo, files = KNOWN[name]
    if any(f.endswith(".parquet") for f in files) and importlib.util.find_spec("pyarrow") is None:
        raise ImportError("its files are parquet, which needs pyarrow (pip install pyarrow)")
    from huggingface_hub import hf_hub_download
    rows = [row for file in files for row in _read_rows(str(hf_hub_download(repo, file, repo_type="dataset")))]
    problems, seen = [], set()
    for i, row in enumerate(rows):
        if int(row.get("Year") or 0) >= 2024:  # AIME 1983-2024: 2024 is the aime24 eval set, keep it out of training
            continue
        try:
            problem = to_problem(row, f"{name}/{i}")
        except ValueError:  # e.g. MATH train rows whose solution has no \boxed{}
            continue
        if problem["problem"] not in seen:
            seen.add(problem["problem"])
            problems.append(problem)
    if not problems:
        raise ValueError(f"no usable rows in {repo}")
    target.parent.mkdir(parents=True, exist_ok=True)  # written whole or not at all: never a half cached data set
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
    atomic_write(target, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def resolve_data(name_or_path, data_dir=None) -> Path:
    """A path to an existing .jsonl as is; a name -> {data_dir}/{name}.jsonl (data_dir: $PTE_DATA, else data/), else
    the hub copy of a KNOWN name cached in ~/.cache/pte/data (fetched once). FileNotFoundError says where to put it."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.suffix == ".jsonl":
        raise FileNotFoundError(f"no data file at {given}")
    name = str(name_or_path)
    local = Path(data_dir or os.environ.get("PTE_DATA") or "data") / f"{name}.jsonl"
    if local.is_file():
        return local
    if name not in KNOWN:
        raise FileNotFoundError(f"no data file at {local}, and {name!r} is not a known data set "
                                f"({', '.join(KNOWN)}): pass a .jsonl path or put the file there")
    cached = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pte" / "data" / f"{name}.jsonl"
    if not cached.is_file():
        repo, files = KNOWN[name]
        try:
            _fetch(name, cached)
        except Exception as e:  # no huggingface_hub or pyarrow, offline, hub error: all end in the same advice
            raise FileNotFoundError(
                f"data set {name!r} is not at {local}: put a JSONL file there (one {{\"id\", \"problem\", \"answer\"}} "
                f"object a line), or let it be fetched from the Hugging Face hub dataset {repo} ({', '.join(files)}) "
                f"into {cached}, which needs huggingface_hub and network access. Fetching failed: "
                f"{type(e).__name__}: {e}") from e
    return cached


def chat_family(model_dir) -> str | None:
    """'qwen2.5' | 'chatml' (SmolLM2) | 'r1' (DeepSeek-R1-Distill) | None (no chat template: raw prompts, our toy),
    from the folder's tokenizer_config.json (or chat_template.jinja, where newer transformers save it)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no model folder at {model_dir}")
    config = model_dir / "tokenizer_config.json"
    template = read_json(config).get("chat_template") if config.is_file() else None
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not template:
        return None
    for family, mark in FAMILY_MARKS.items():
        if mark in template:
            return family
    raise ValueError(f"{model_dir}: chat template of no known family ({', '.join(TEMPLATES)}); hand-write it in "
                     "data.TEMPLATES, with a parity test")


def format_prompt(problem: str, family: str | None) -> str:
    """The prompt text (encode it with add_special_tokens=False): the chat template around one user message
    `{problem}` + SUFFIX, then the generation prompt. family None: `problem` unchanged, no suffix."""
    if family is None:
        return problem
    if family not in TEMPLATES:
        raise ValueError(f"unknown chat family {family!r}; known: {', '.join(TEMPLATES)} or None")
    return TEMPLATES[family].format(problem + SUFFIX)


# ---------------------------------------------------------------------------------------------------- the toy task
# A synthetic reasoning task whose answer exists only in the model's own earlier thoughts (the shipped toy/ model is
# trained on it: experiments/toy.py). Prompt, pinned in the cache: `<bos> x0 o1 ... o16 <sep>` (19 tokens). Thought:
# the chain x_i = (x_{i-1} + o_i) mod 10 for i = 1..16 with x4 written as its memo token `m<x4>`, then
# `= X \boxed{ Y } <eos>`: X = x4 recalled, Y = (X + x16) mod 10 the graded answer. Every trace is 22 tokens. Once the
# memo has left a window of 8 thought slots, Y is a guess unless the model carried the memo in S. The memo is a token
# of its own because the encoder pools evicted keys without their positions: what must be remembered has to be
# recognisable by its content.

N_OPS, MEMO_AT = 16, 4  # chain length; the step whose digit is written as a memo token and recalled at the end
SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>"]  # dropped by decode(skip_special_tokens=True)
VOCAB = SPECIALS + ["=", "\\boxed{", "}"] + [str(d) for d in range(10)] + [f"m{d}" for d in range(10)]
ID = {tok: i for i, tok in enumerate(VOCAB)}
DIGIT, MEMO = ID["0"], ID["m0"]  # digit d is token DIGIT + d, its memo MEMO + d
PROMPT_LEN, TRACE_LEN = N_OPS + 3, N_OPS + 6  # 19, 22
EVAL_SEED, VALID_SEED = 1_000_003, 1_000_004  # held-out test and validation problems; training draws from --seed


def draw_digits(n, generator, n_ops=N_OPS):
    """(n, n_ops + 1) uniform digits: x0, then the operands o1..o_n."""
    return torch.randint(0, 10, (n, n_ops + 1), generator=generator)


def encode(digits):
    """digits (n, 17) -> prompt ids (n, 19) and the full-cache trace ids (n, 22)."""
    n, x = len(digits), digits.cumsum(1) % 10  # x0..x16 (n, 17)
    tok = lambda name: torch.full((n, 1), ID[name])  # noqa: E731
    steps = DIGIT + x[:, 1:]  # (n, 16) x1..x16
    steps[:, MEMO_AT - 1] = MEMO + x[:, MEMO_AT]  # x4 as its memo token
    recall = x[:, MEMO_AT:MEMO_AT + 1]  # (n, 1)
    answer = (recall + x[:, -1:]) % 10  # (n, 1)
    prompt = torch.cat([tok("<bos>"), DIGIT + digits, tok("<sep>")], 1)
    trace = torch.cat([steps, tok("="), DIGIT + recall, tok("\\boxed{"), DIGIT + answer, tok("}"), tok("<eos>")], 1)
    return prompt, trace


def make_problems(n, seed):
    """n problems {"id", "problem", "answer"} (answer: Y as a string), deterministic in the seed."""
    prompt, trace = encode(draw_digits(n, torch.Generator().manual_seed(seed)))
    return [dict(id=f"toy-{seed}-{i}", problem=" ".join(VOCAB[t] for t in p), answer=VOCAB[t[-3]])
            for i, (p, t) in enumerate(zip(prompt.tolist(), trace.tolist()))]


# the toy's data sets, made in memory: toy-train 20,000 problems from the run's seed (a pool that does not depend on
# --steps), toy-eval 4,096 from EVAL_SEED whatever the run's seed (its first n are make_problems(n, EVAL_SEED))
GENERATED = {"toy-train": lambda seed: make_problems(20_000, seed),
             "toy-eval": lambda seed: make_problems(4096, EVAL_SEED)}


# ---------------------------------------------------------------------------------------------------- command lines

def number(kind, low, high=None, above=False):
    """An argparse type that also checks a value read from a file: a finite `kind` (from text, or a JSON number of
    that kind: no bool, no 2.5 for an int) at least `low` (more than `low` if `above`) and at most `high`."""
    def parse(value):
        if isinstance(value, str):
            value = kind(value)  # ValueError: argparse says "invalid int value"
        elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        value = kind(value)
        if not math.isfinite(value) or not (value > low if above else value >= low) or (high is not None
                                                                                        and value > high):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}"
                                             f"{'' if high is None else f' and <= {high}'}, got {value}")
        return value
    parse.__name__, parse.kind = kind.__name__, kind
    return parse


def device_name(text):
    """An argparse type: auto, cpu, cuda or cuda:N, checked against this machine."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine")
    return text


def ranks():
    """(world size, this process's rank): torchrun's, else (1, 0)."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def run_device(name):
    """The torch.device of a --device value (auto: cuda where there is one); under torchrun, cuda is the rank's own
    GPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and ranks()[0] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def file_value(action, value):
    """A value read from a file (train_defaults.json, settings.json, adapter.json) through the checks of its flag's
    argparse `action`: its type and range, its choices, true or false for an on/off flag."""
    if action.nargs == 0:  # store_true, --x/--no-x
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value
    if not (isinstance(value, str) or hasattr(action.type, "kind")):
        raise argparse.ArgumentTypeError(f"must be a string, got {value!r}")
    try:
        value = action.type(value) if action.type else value
    except ValueError:  # number() from text
        raise argparse.ArgumentTypeError(f"invalid {action.type.__name__} value {value!r}") from None
    if action.choices and value not in action.choices:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


LOCK = ".lock"  # the file in an output folder that its one writer holds locked


def contents(folder: Path):
    """The names in an output folder, its lock file aside."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK) if folder.is_dir() else []


@contextmanager
def only_writer(folder: Path, flag="--out"):
    """Within: this process holds an exclusive OS lock (flock) on folder/.lock, made with the folder if need be. The OS
    releases it when the process ends, SIGKILL included. Another holder refuses this one at once, naming its PID."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{flag} {folder} is in use by another process (PID {holder}): wait for it to end, "
                             "or name another folder") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
        yield folder
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def quiet_exit():
    """Around a command line's main: outside stop_on_signals (which installs its own handlers within) SIGINT and
    SIGTERM do nothing, and on the way out they are ignored by the OS: the interpreter's teardown resets a Python
    handler to the default, under which a second Ctrl-C would kill the exit (-2). An ignored signal stays ignored."""
    watched = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN]
    for sig in watched:
        signal.signal(sig, lambda *_: None)
    try:
        yield
    finally:
        for sig in watched:
            signal.signal(sig, signal.SIG_IGN)


class Stop(Exception):
    """SIGINT or SIGTERM (args[0]: its number) stopped the work in progress."""


@contextmanager
def stop_on_signals(at_once=True):
    """Within: SIGINT (Ctrl-C) and SIGTERM set request["signal"], and raise Stop at once while request["at_once"]
    (the caller clears it around work that must not be torn, and checks request["signal"] after it). An ignored
    signal stays ignored (a background job starts with SIGINT ignored); the handlers are restored on the way out."""
    request = dict(signal=None, at_once=at_once)

    def handle(signum, frame):
        request["signal"] = signum
        if request["at_once"]:
            raise Stop(signum)
    main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
                if main_thread and signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def beyond_positions(model_dir, **counts):
    """An error text for the first of `counts` (flag name -> value) beyond the model's max_position_embeddings (a
    cache or a rollout longer than the positions it was trained on); None when all fit or the config names none."""
    config = Path(model_dir) / "config.json"
    limit = read_json(config).get("max_position_embeddings")
    for flag, value in counts.items():
        if isinstance(limit, int) and value is not None and value > limit:
            return f"--{flag.replace('_', '-')} {value}: more than the model's {limit} positions ({config})"
    return None
