"""eval.py --kl against KL computed by hand from two masked forwards (full causal, and the window of docs/method.md §2);
about 0 for the full cache; an adapter counts; on the toy, distillation under pte brings the KL below the window's."""
import sys
from types import SimpleNamespace

import pytest
import torch

import data
import eval as ev
import model as M
from cache import MaskedForward
from encoder import Adapter, AdapterConfig
from rollout import CachePolicy

P, W, M_EVICT, MAX_NEW = 6, 8, 2, 24  # budget P + W, evict 0.25: evictions before thoughts 8, 10, ..., 22
PROBLEMS = [dict(id="a", problem="abcdef", answer="1"), dict(id="b", problem="uvwxyz", answer="2")]  # P tokens each


class ModTokenizer:
    """One token a character, inside the tiny model's vocabulary of 97."""
    def encode(self, text, add_special_tokens=True):
        return SimpleNamespace(ids=[ord(c) % 90 + 5 for c in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(48 + i % 43) for i in ids)


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    torch.set_num_threads(1)
    return M.load(tiny_qwen[0])


def evaluate(model, policy, budget, monkeypatch, adapter=None):
    """evaluate with --kl on PROBLEMS (sampled, one batch), and the rollout it generated."""
    rollouts, generate = [], ev.rollout.generate
    monkeypatch.setattr(ev.rollout, "generate", lambda *a, **k: rollouts.append(generate(*a, **k)) or rollouts[-1])
    summary, records = ev.evaluate(model, ModTokenizer(), PROBLEMS, CachePolicy(policy, budget, 0.25), adapter,
                                   max_new=MAX_NEW, temperature=1.0, batch_size=2, progress=False, kl=True)
    (ro,) = rollouts
    return summary, records, ro


def by_hand(model, ro, first):
    """Mean KL(full || window) per token over tokens j >= first of every row, from two whole-sequence forwards:
    causal, and each thought t seeing the prompt and the thoughts a ring of W (m evicted at a time) held at t."""
    seq = torch.cat([ro.prompts, ro.tokens], 1)  # (B, P + T): no padding, the prompts are P tokens each
    S, T = seq.shape[1], ro.tokens.shape[1]
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    oldest = 0
    for t in range(T):
        oldest += M_EVICT if t >= W and (t - W) % M_EVICT == 0 else 0  # evicted before token t is written
        allowed[P + t, P:P + oldest] = False
    mask = torch.zeros(S, S).masked_fill(~allowed, torch.finfo(torch.float32).min).expand(len(seq), 1, S, S)
    with torch.no_grad():
        full = torch.log_softmax(model(seq)[:, P - 1:-1], -1)  # (B, T, V): predicts token j from position P - 1 + j
        window = torch.log_softmax(model(seq, cache=MaskedForward(mask))[:, P - 1:-1], -1)
    return (full.exp() * (full - window)).sum(-1)[:, first:].mean().item()


def test_window_kl_is_the_kl_by_hand(tiny, monkeypatch):
    summary, records, ro = evaluate(tiny, "window", P + W, monkeypatch)
    assert [row[0] for row in ro.evictions] == [W, W] and ro.tokens.shape[1] == MAX_NEW  # no EOS: every row runs on
    expected = by_hand(tiny, ro, W + 1)  # the first prediction after the eviction before token 8 is token 9's
    assert summary["kl"] == pytest.approx(expected, rel=1e-3) and expected > 1e-4  # fp32 sums of near-equal terms
    assert summary["kl_tokens"] == 2 * (MAX_NEW - W - 1) and all(r["kl_tokens"] == MAX_NEW - W - 1 for r in records)
    assert sum(r["kl"] for r in records) / 2 == pytest.approx(expected, rel=1e-3)
    assert "| KL to full |" in ev.table([dict(bench="b", policy="window", skipped=0, **summary)])


def test_full_cache_kl_is_zero_and_an_adapter_counts(tiny, monkeypatch):
    summary, records, _ = evaluate(tiny, "full", P + W, monkeypatch)  # scored where a window of P + W would be
    assert summary["kl_tokens"] == 2 * (MAX_NEW - W - 1) and abs(summary["kl"]) < 1e-6
    monkeypatch.undo()
    lora = Adapter(tiny.config, AdapterConfig(mode="lora", rank=4, alpha=4.0))
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(0, 0.1)
    summary, _, _ = evaluate(tiny, "full", P + W, monkeypatch, lora)
    assert summary["kl"] > 1e-4
    monkeypatch.undo()
    summary, records, _ = evaluate(tiny, "full", 1024, monkeypatch)  # a window of 1024 would never have evicted
    assert summary["kl"] is None and summary["kl_tokens"] == 0 and records[0]["kl"] is None
    assert "| - |" in ev.table([dict(bench="b", policy="full", skipped=0, **summary)])


def test_cli_writes_kl_beside_accuracy_and_length(tmp_path, capsys):
    """eval.py --kl on the shipped toy: results.json and the table carry the KL; the base window's is ln(10) / 13
    (see the toy test below), the full cache's 0."""
    import json
    import math

    import toy
    bench = tmp_path / "toy.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in data.make_problems(32, data.EVAL_SEED)))
    ev.main(["--model", "toy", "--bench", str(bench), "--policy", "full,window",
             "--cache", str(toy.TOY_DEFAULTS["cache"]),
             "--max-new", str(toy.TOY_DEFAULTS["max_new"]), "--batch-size", "32", "--threads", "1", "--kl",
             "--out", str(tmp_path / "out")])
    full, window = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert abs(full["kl"]) < 1e-6 and window["kl"] == pytest.approx(math.log(10) / 13, rel=0.1)
    assert full["kl_tokens"] == window["kl_tokens"] == 32 * 13 and full["accuracy"] == 1.0
    printed = capsys.readouterr().out
    assert "| mean length | KL to full |" in printed and f"| 22 | {window['kl']:.4f} |" in printed


@pytest.mark.slow
def test_toy_distillation_under_pte_lowers_the_kl_below_the_window(tmp_path):
    """The toy's window loses one thing, the memo x4: at the recall X the full cache is certain and the window spreads
    over the ten digits (ln 10 nats), every other scored token agrees, so the window's KL over the 13 tokens after the
    eviction before thought 8 (thoughts 9..21) is ln(10) / 13. 40 distillation steps under pte (~25 s on one core)
    must close a good part of it: a KL that ignores the adapter, or an encoder that carries nothing, fails."""
    import math

    import toy
    import train
    from encoder import load_adapter
    run = train.main(["--model", "toy", "--policy", "pte", "--objective", "distill", "--steps", "40", "--group", "1",
                      "--prompts-per-step", "64", "--lr", "3e-3", "--seed", "0", "--eval-size", "0", "--threads", "1",
                      "--b-init", "0", "--encoder-lr", "3e-3",  # LoRA's init and one lr, not the toy's GRPO choices
                      "--out", str(tmp_path / "run")])
    model, tokenizer, problems = M.load("toy"), M.load_tokenizer("toy"), data.make_problems(128, data.EVAL_SEED)
    kl = {}
    for policy, adapter in (("window", None), ("pte", load_adapter(run / "adapter", model.config))):
        summary, _ = ev.evaluate(model, tokenizer, problems, CachePolicy(policy, toy.TOY_DEFAULTS["cache"]), adapter,
                                 max_new=toy.TOY_DEFAULTS["max_new"], batch_size=128, progress=False, kl=True)
        assert summary["kl_tokens"] == 128 * 13
        kl[policy] = summary["kl"]
    assert kl["window"] == pytest.approx(math.log(10) / 13, rel=0.05) and kl["pte"] < 0.8 * kl["window"], kl


@pytest.mark.parametrize("policy", ["window", "full"])
def test_each_row_is_scored_after_its_own_first_eviction(tiny, monkeypatch, policy):
    # budget 14: the 6-token prompt leaves W = 8 (first eviction before thought 8: tokens 9..23 scored), the 4-token
    # one W = 10 (tokens 11..23); under full, the same tokens: where those windows would first have evicted
    monkeypatch.setattr(sys.modules[__name__], "PROBLEMS", [PROBLEMS[0], dict(id="c", problem="abcd", answer="3")])
    _, records, ro = evaluate(tiny, policy, P + W, monkeypatch)
    assert [r["kl_tokens"] for r in records] == [MAX_NEW - W - 1, MAX_NEW - W - 3]
    windowed = [list(range(W, MAX_NEW - 1, 2)), list(range(W + 2, MAX_NEW - 1, 3))]  # m = 2 and 3
    assert ro.evictions == ([[], []] if policy == "full" else windowed)
