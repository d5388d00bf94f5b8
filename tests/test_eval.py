"""eval.py: avg@k / pass@k / lengths / evictions by hand with a stub generate; the CLI end to end on a tiny random Qwen2
with the real Qwen2.5 tokenizer and chat template; the error messages."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, tiny_hf
from safetensors.torch import save_file

import data
import encoder
import eval as ev
import rollout

PROBLEMS = [dict(id="a", problem="What is 1+1?", answer=["2", "two"]),
            dict(id="b", problem="A longer problem, so that it is batched first: what is 2+3?", answer="5")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two threads on two shared cores run these tiny forwards ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharTokenizer:
    """One token a character: encode/decode in the `tokenizers` API shape."""
    def encode(self, text, add_special_tokens=True):
        return SimpleNamespace(ids=[ord(c) for c in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def test_grades_and_aggregates_known_completions(monkeypatch):
    tok = CharTokenizer()
    answers = {0: ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}"], 1: ["\\boxed{4}", "x", "\\boxed{6}"]}  # 2/3 and 0/3 right
    prompts = {tok.decode(tok.encode(data.format_prompt(p["problem"], "qwen2.5")).ids): i
               for i, p in enumerate(PROBLEMS)}
    batches = []

    def fake_generate(model, prompt_ids, policy, sampling, *_):
        texts = [answers[prompts[tok.decode(p)]].pop(0) for p in prompt_ids]  # KeyError: not the templated prompt
        batches.append(len(texts))
        T = max(map(len, texts))
        tokens = torch.tensor([[ord(c) for c in t] + [0] * (T - len(t)) for t in texts])  # (B, T)
        mask = torch.tensor([[j < len(t) for j in range(T)] for t in texts])  # (B, T)
        truncated = torch.tensor([len(t) >= sampling.max_new for t in texts])
        return rollout.Rollout(None, None, tokens, None, mask, truncated,
                               evictions=[[0, 3]] * len(texts), stats=dict(seconds=1.0, tokens=int(mask.sum())))

    monkeypatch.setattr(ev.rollout, "generate", fake_generate)
    model = SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.zeros(1)))  # only its device is read
    summary, records = ev.evaluate(model, tok, PROBLEMS, rollout.CachePolicy("window", 100), family="qwen2.5",
                                   max_new=9, samples=3, batch_size=2, progress=False)
    assert batches == [2, 2, 2]
    assert [(r["id"], r["sample"]) for r in records] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert (sorted(r["correct"] for r in records[:3]) == [False, True, True]
            and not any(r["correct"] for r in records[3:]))
    assert {r["answer"] for r in records} == {"2", "3", "4", "6", None}
    assert sorted(r["completion"] for r in records[3:]) == ["\\boxed{4}", "\\boxed{6}", "x"]  # decoded up to the mask
    assert records[0]["gold"] == ["2", "two"] and records[3]["gold"] == "5"
    # lengths 9,9,9,9,1,9; truncated where length reaches max_new=9; evictions at t=0 and 3 count for t < length - 1
    assert summary == dict(n=2, samples=3, accuracy=pytest.approx(1 / 3), pass_at_k=0.5,
                           mean_length=pytest.approx(46 / 6), truncated=pytest.approx(5 / 6),
                           evictions_per_sample=pytest.approx(10 / 6), tokens_per_s=pytest.approx(46 / 3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random Qwen2 folder with the real Qwen2.5 tokenizer (chat family qwen2.5), a 3-problem benchmark folder,
    and the prompts' length in tokens (all three the same)."""
    folder = tmp_path_factory.mktemp("tiny_eval")
    tiny_hf("qwen2", vocab_size=151936, hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=151645).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir / name, folder / name)
    bench = folder / "bench"
    bench.mkdir()
    rows = [dict(id=f"p{i}", problem=f"Compute {i} + {i}.", answer=str(2 * i)) for i in range(3)]
    (bench / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = ev.models.load_tokenizer(folder)
    (prompt_len,) = {len(tokenizer.encode(data.format_prompt(r["problem"], "qwen2.5"), add_special_tokens=False).ids)
                     for r in rows}
    return folder, bench, prompt_len


def cli(tiny, tmp_path, *extra):
    folder, bench, _ = tiny
    return ev.main(["--model", str(folder), "--bench", "tiny", "--data-dir", str(bench), "--max-new", "12",
                    "--batch-size", "2", "--threads", "1", "--out", str(tmp_path / "out"), *extra])


def test_cli_end_to_end(tiny, tmp_path, capsys):
    # the budget leaves W = 8 thought slots, m = 4: within 12 tokens one eviction, before token 8 is written
    results = cli(tiny, tmp_path, "--policy", "full,window", "--cache", str(tiny[2] + 8), "--evict", "0.5",
                  "--samples", "2", "--temperature", "1.0", "--seed", "3")
    printed = capsys.readouterr().out
    assert "--policy full,window" in printed
    assert "| tiny | full | 3 | 0 | 2 |" in printed and "| tiny | window | 3 | 0 | 2 |" in printed
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["grader_version"] == ev.grade.GRADER_VERSION and saved["chat_family"] == "qwen2.5"
    assert saved["args"]["seed"] == 3 and saved["args"]["max_new"] == 12 and saved["args"]["temperature"] == 1.0
    assert saved["results"] == json.loads(json.dumps(results["results"])) and saved["wall_s"] > 0
    assert data.contents(tmp_path / "out") == ["results.json", "samples.jsonl"]  # no .part left
    full, window = saved["results"]
    assert (full["policy"], window["policy"], window["budget"], window["evict"]) == ("full", "window", tiny[2] + 8, 0.5)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(s["policy"], s["id"], s["sample"]) for s in samples] == [
        (p, f"p{i}", k) for p in ("full", "window") for i in range(3) for k in range(2)]
    assert {s["gold"] for s in samples} == {"0", "2", "4"} and all(isinstance(s["completion"], str) for s in samples)
    assert all(1 <= s["length"] <= 12 and s["truncated"] == (s["length"] == 12) for s in samples)
    assert [s["evictions"] for s in samples] == [0] * 6 + [int(s["length"] >= 10) for s in samples[6:]]
    assert full["evictions_per_sample"] == 0 and window["evictions_per_sample"] == pytest.approx(
        sum(s["evictions"] for s in samples[6:]) / 6)
    assert full["mean_length"] == pytest.approx(sum(s["length"] for s in samples[:6]) / 6)


def test_adapter_policy_is_used(tiny, tmp_path):
    adapter = encoder.Adapter(ev.models.load(tiny[0]).config, encoder.AdapterConfig(mode="pte", rank=2, n_globals=2))
    encoder.save_adapter(adapter, tmp_path / "adapter", policy="pte")
    results = cli(tiny, tmp_path, "--adapter", str(tmp_path / "adapter"), "--cache", str(tiny[2] + 8), "--evict", "0.5")
    (pte,) = results["results"]
    assert (pte["policy"], results["adapter_mode"], pte["n"], pte["samples"]) == ("pte", "pte", 3, 1)


def errors(tiny, tmp_path, capsys, *extra):
    with pytest.raises(SystemExit) as e:
        cli(tiny, tmp_path, *extra)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_errors(tiny, tmp_path, capsys):
    folder, bench, _ = tiny
    (bench / "broken.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": \n')
    assert f"{bench / 'broken.jsonl'}, line 2" in errors(tiny, tmp_path, capsys, "--bench", "broken")
    assert "'nosuchbench' is not a known data set" in errors(tiny, tmp_path, capsys, "--bench", "nosuchbench")
    assert "eval.py: error: cache policy 'lru'" in errors(tiny, tmp_path, capsys, "--policy", "full,lru")
    assert "every prompt leaves fewer than 4 thought slots at --cache 20" in errors(
        tiny, tmp_path, capsys, "--policy", "window", "--cache", "20")
    fits = ("--cache", str(tiny[2] + 8))  # the default 1024 is beyond the tiny model's 512 positions
    assert "--cache 1024: more than the model's 512 positions" in errors(tiny, tmp_path, capsys, "--policy", "window")
    assert "--policy pte needs --adapter" in errors(tiny, tmp_path, capsys, "--policy", "pte", *fits)
    encoder.save_adapter(encoder.Adapter(ev.models.load(folder).config, encoder.AdapterConfig(mode="lora", rank=2)),
                         tmp_path / "lora")
    assert "records no policy" in errors(tiny, tmp_path, capsys, "--adapter", str(tmp_path / "lora"))
    assert "got mode lora" in errors(tiny, tmp_path, capsys, "--adapter", str(tmp_path / "lora"), "--policy", "pte",
                                     *fits)


def test_prompts_that_leave_too_few_thought_slots_are_skipped_and_counted(tiny, tmp_path, capsys):
    """A row's window is the budget less its own prompt: at budget P + 4 the 3 prompts of P tokens fit exactly (4 slots)
    and one prompt a token longer is skipped, counted in results.json and the table, never silently."""
    folder, bench, prompt_len = tiny
    rows = [dict(id=f"p{i}", problem=f"Compute {i} + {i}.", answer=str(2 * i)) for i in range(3)]
    rows.append(dict(id="long", problem="Compute 1 + 1 + 1.", answer="3"))
    (bench / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = ev.models.load_tokenizer(folder)
    long_prompt = tokenizer.encode(data.format_prompt(rows[3]["problem"], "qwen2.5"), add_special_tokens=False).ids
    assert len(long_prompt) > prompt_len
    results = cli(tiny, tmp_path, "--bench", "mixed", "--policy", "full,window", "--cache", str(prompt_len + 4))
    assert [(r["policy"], r["n"], r["skipped"]) for r in results["results"]] == [("full", 3, 1), ("window", 3, 1)]
    assert "| mixed | window | 3 | 1 | 1 |" in capsys.readouterr().out
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["id"] for s in samples} == {"p0", "p1", "p2"}
    full_only = cli(tiny, tmp_path / "full", "--bench", "mixed", "--policy", "full", "--cache", str(prompt_len + 4))
    assert [(r["n"], r["skipped"]) for r in full_only["results"]] == [(4, 0)]  # the full cache has no budget to leave


def test_out_never_overwrites_an_earlier_evaluation(tiny, tmp_path, capsys):
    cli(tiny, tmp_path, "--policy", "full")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("samples.jsonl", "results.json")}
    assert "holds an evaluation already" in errors(tiny, tmp_path, capsys, "--policy", "full")
    (tmp_path / "out" / "results.json").unlink()  # samples.jsonl alone is refused too: it is never emptied
    assert "holds an evaluation already" in errors(tiny, tmp_path, capsys, "--policy", "full")
    assert (tmp_path / "out" / "samples.jsonl").read_bytes() == before["samples.jsonl"]


@pytest.mark.parametrize("flag, value, message", [
    ("--limit", "-1", "must be >= 1"), ("--limit", "0", "must be >= 1"), ("--max-new", "0", "must be >= 1"),
    ("--batch-size", "0", "must be >= 1"), ("--samples", "0", "must be >= 1"), ("--top-p", "0", "must be > 0 and <= 1"),
    ("--top-p", "1.5", "must be > 0 and <= 1"), ("--temperature", "-1", "must be >= 0"),
    ("--threads", "-2", "must be >= 1"),
    ("--cache", "0", "must be >= 1"), ("--evict", "0", "must be > 0 and <= 1"), ("--device", "tpu", "unknown device"),
])
def test_flags_are_checked_before_any_model_loads(flag, value, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ev.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "toy", "--bench", "toy-eval", "--out", str(tmp_path), flag, value])
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_adapter_is_evaluated_as_it_was_trained(tiny, tmp_path, capsys):
    """--cache and --evict left unset take the budget and evict share recorded in adapter.json; another model warns."""
    folder, _, prompt_len = tiny
    adapter = encoder.Adapter(ev.models.load(folder).config, encoder.AdapterConfig(mode="pte", rank=2, n_globals=2))
    encoder.save_adapter(adapter, tmp_path / "adapter", policy="pte",
                         settings=dict(model=str(folder), cache=prompt_len + 8, evict=0.5))
    (pte,) = cli(tiny, tmp_path / "a", "--adapter", str(tmp_path / "adapter"))["results"]
    assert (pte["policy"], pte["budget"], pte["evict"]) == ("pte", prompt_len + 8, 0.5)
    assert "WARNING" not in capsys.readouterr().err
    (pte,) = cli(tiny, tmp_path / "b", "--adapter", str(tmp_path / "adapter"),
                 "--cache", str(prompt_len + 6))["results"]
    assert (pte["budget"], pte["evict"]) == (prompt_len + 6, 0.5)  # a flag given wins
    encoder.save_adapter(adapter, tmp_path / "other", policy="pte",
                         settings=dict(model="qwen2.5-3b", cache=prompt_len + 8))
    cli(tiny, tmp_path / "c", "--adapter", str(tmp_path / "other"))
    assert f"trained on --model qwen2.5-3b, not {folder}" in capsys.readouterr().err


def test_broken_model_and_adapter_files_are_refused(tiny_qwen, tmp_path):
    """A config.json of the wrong shape or types names the file and the key; NaN weights or adapters are refused
    when loaded (eval would otherwise score 0% with no warning)."""
    folder = Path(shutil.copytree(tiny_qwen[0], tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    for edit, message in ([[1, 2], "config.json: expected a JSON object, got list"],
                          [{**config, "hidden_size": "32"}, "config.json: hidden_size must be a positive integer"],
                          [{**config, "num_hidden_layers": True}, "num_hidden_layers must be a positive integer"],
                          [{**config, "rms_norm_eps": -1}, "rms_norm_eps must be a positive number, got -1"],
                          [{**config, "eos_token_id": "<eos>"}, "eos_token_id must be a token id or a list of them"]):
        (folder / "config.json").write_text(json.dumps(edit))
        with pytest.raises(ValueError, match=re.escape(message)):
            ev.models.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = ev.models.read_safetensors(folder)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("1 tensor(s) hold NaN or infinite values: layers.1.mlp.up_proj")):
        ev.models.load(folder)
    model_cfg = ev.models.load(tiny_qwen[0]).config
    adapter = encoder.Adapter(model_cfg, encoder.AdapterConfig(mode="pte", rank=2, n_globals=2))
    with torch.no_grad():
        adapter.q_g[0, 0, 0] = float("inf")
    encoder.save_adapter(adapter, tmp_path / "adapter", policy="pte")
    with pytest.raises(ValueError, match="adapter.safetensors: NaN or infinite values in q_g"):
        encoder.load_adapter(tmp_path / "adapter", model_cfg)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_one_writer_and_a_clean_stop(tmp_path, signum, code):
    """Two eval.py with one --out: the second is refused at once, naming the first's PID. Ctrl-C or SIGTERM then
    stop the first with exit 130 or 143, no traceback and no .part file left."""
    out = tmp_path / "out"
    command = [sys.executable, "eval.py", "--model", "toy", "--bench", "toy-eval", "--policy", "window", "--cache",
               "27", "--max-new", "24", "--batch-size", "8", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (a background shell ignores it)
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (out / "samples.jsonl.part").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-2000:]  # still running: it holds the lock
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2 and (f"eval.py: error: --out {out} is in use by another process (PID {first.pid})"
                                       in second.stderr), second.stderr[-2000:]
    first.send_signal(signum)
    _, err = first.communicate(timeout=120)
    assert first.returncode == code and "Traceback" not in err, err[-2000:]
    assert f"{signal.Signals(signum).name}: stopped; nothing was written" in err
    assert data.contents(out) == []  # the lock file aside


def test_out_must_be_new_or_empty_and_adapter_files_are_checked(tiny, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "is not empty (notes.txt): name a new or empty folder" in errors(tiny, tmp_path, capsys, "--policy", "full")
    assert data.contents(tmp_path / "out") == ["notes.txt"] and not (tmp_path / "out" / ".lock").exists()
    adapter = encoder.Adapter(ev.models.load(tiny[0]).config, encoder.AdapterConfig(mode="pte", rank=2, n_globals=2))
    encoder.save_adapter(adapter, tmp_path / "adapter", policy="pte", settings=dict(cache=-5))
    assert "adapter.json: settings.cache: must be >= 1, got -5" in errors(tiny, tmp_path / "a", capsys, "--adapter",
                                                                           str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter.json").write_text("{not json")
    assert f"{tmp_path / 'adapter' / 'adapter.json'}: malformed JSON" in errors(tiny, tmp_path / "b", capsys,
                                                                                 "--adapter", str(tmp_path / "adapter"))
