"""The toy task (answers recomputed here from the prompt digits), its memory property, and the shipped toy/ model."""
import json

import pytest
import torch

import grade
import data
import toy
from cache import MaskedForward, evict_count, eviction_steps, thought_slots
from data import chat_family
from model import TOY_DIR, load, load_tokenizer
from rollout import CachePolicy, Sampling, generate


def chain(problem):
    """x0..x16 from a problem's text, computed independently of toy.py."""
    words = problem.split()
    assert words[0] == "<bos>" and words[-1] == "<sep>" and len(words) == data.PROMPT_LEN
    xs = [int(words[1])]
    for o in words[2:-1]:
        xs.append((xs[-1] + int(o)) % 10)
    return xs


def test_problems_are_deterministic_and_right():
    problems = data.make_problems(200, seed=7)
    assert problems == data.make_problems(200, seed=7) and problems != data.make_problems(200, seed=8)
    assert len({p["id"] for p in problems}) == 200
    for p in problems:
        xs = chain(p["problem"])
        assert p["answer"] == str((xs[4] + xs[16]) % 10)
    assert {p["answer"] for p in problems} == set("0123456789")


def test_trace_by_hand():
    # x0 = 1 and every operand 1: x_i = 1 + i mod 10, x4 = 5 (memo), x16 = 7, Y = (5 + 7) mod 10 = 2
    prompt, trace = data.encode(torch.ones(1, data.N_OPS + 1, dtype=torch.long))
    tokenizer = toy.make_tokenizer()
    assert tokenizer.decode(prompt[0].tolist(), skip_special_tokens=False) == "<bos> " + " ".join("1" * 17) + " <sep>"
    text = tokenizer.decode(trace[0].tolist(), skip_special_tokens=True)
    assert text == "2 3 4 m5 6 7 8 9 0 1 2 3 4 5 6 7 = 5 \\boxed{ 2 }"
    assert grade.extract_answer(text) == "2" and trace[0, -1] == data.ID["<eos>"]


def test_answer_needs_the_memo_thought_that_a_window_of_8_evicts():
    problems = data.make_problems(64, seed=3)
    digits = torch.tensor([[int(w) for w in p["problem"].split()[1:-1]] for p in problems])
    _, trace = data.encode(digits)
    words = [toy.make_tokenizer().decode(t.tolist(), skip_special_tokens=True).split() for t in trace]
    for w, p in zip(words, problems):
        x4 = chain(p["problem"])[4]
        assert w[3] == f"m{x4}" and w[w.index("=") + 1] == str(x4)  # X recalls the memo digit of thought 3
        assert sum(x.startswith("m") for x in w) == 1 and grade.score(" ".join(w), p["answer"]) == 1.0
    # at budget P + 8 the memo (thought 3) leaves before thought 10, long before X is written (thought 17)
    W = thought_slots("window", toy.TOY_DEFAULTS["cache"], data.PROMPT_LEN, data.TRACE_LEN)
    m = evict_count(W, toy.TOY_DEFAULTS["evict"])
    gone_before = eviction_steps(data.TRACE_LEN, W, m, "window")[3 // m]  # the eviction that takes thoughts [2, 4)
    recall_at = words[0].index("=") + 1
    assert (W, m, gone_before, recall_at) == (8, 2, 10, 17)


def test_model_recalls_the_memo_token_not_the_prompt():
    # rewrite the memo thought to another digit: under the full cache the model recalls what its thought says
    model = load("toy")
    g = torch.Generator().manual_seed(5)
    digits = data.draw_digits(64, g)
    prompt, trace = data.encode(digits)
    x4 = digits[:, :5].sum(1) % 10
    other = (x4 + torch.randint(1, 10, (64,), generator=g)) % 10
    trace[:, 3] = data.MEMO + other
    with torch.no_grad():
        recall = model(torch.cat([prompt, trace[:, :17]], 1))[:, -1].argmax(-1) - data.DIGIT  # (64,) after "="
    assert (recall == other).float().mean() >= 0.9


def test_shipped_model_full_cache_solves_window_forgets():
    files = {f.name: f.stat().st_size for f in TOY_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files) and sum(files.values()) < 2e6
    assert chat_family(TOY_DIR) is None  # no chat template: the prompt is the problem text
    model, tokenizer = load("toy"), load_tokenizer("toy")
    assert model.config.eos_ids == (data.ID["<eos>"],) and model.config.tie_embeddings
    assert 90_000 < sum(p.numel() for p in model.parameters()) < 110_000
    problems = data.make_problems(64, data.EVAL_SEED)
    prompts = [tokenizer.encode(p["problem"], add_special_tokens=False).ids for p in problems]
    assert {len(p) for p in prompts} == {data.PROMPT_LEN} and prompts[0][0] == data.ID["<bos>"]
    acc = {}
    for policy in ("full", "window"):
        out = generate(model, prompts, CachePolicy(policy, budget=data.PROMPT_LEN + 8), Sampling(24))
        assert not out.truncated.any() and out.mask.sum(1).tolist() == [data.TRACE_LEN] * 64  # stops on <eos>
        texts = tokenizer.decode_batch(out.tokens.tolist(), skip_special_tokens=True)
        acc[policy] = sum(grade.score(t, p["answer"]) for t, p in zip(texts, problems)) / 64
    assert acc["full"] >= 0.95 and acc["window"] <= 0.30, acc


def test_build_is_deterministic_and_round_trips(tmp_path):
    net = toy.train(steps=3, seed=0)
    toy.save(net, tmp_path / "a")
    toy.save(toy.train(steps=3, seed=0), tmp_path / "b")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = load(tmp_path / "a")
    x = torch.tensor([load_tokenizer(tmp_path / "a").encode(data.make_problems(1, 0)[0]["problem"]).ids])  # (1, 19)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_window_mask_reproduces_the_window_cache():
    """The build's windowed rows see exactly what a window-policy rollout sees (rollout.score is the reference)."""
    from rollout import Rollout, score
    model, B = load("toy"), 6
    prompt, trace = data.encode(data.draw_digits(B, torch.Generator().manual_seed(1)))
    windowed = torch.tensor([True, False] * (B // 2))
    with torch.no_grad():
        h = model.hidden(torch.cat([prompt, trace[:, :-1]], 1), cache=MaskedForward(toy.window_mask(windowed)))
        logp = torch.log_softmax(model.lm_head(h[:, data.PROMPT_LEN - 1:]), -1).gather(-1, trace[..., None])[..., 0]
        ro = Rollout(prompt, torch.full((B,), data.PROMPT_LEN), trace, None, torch.ones_like(trace, dtype=torch.bool),
                     None, [list(range(8, data.TRACE_LEN - 1, 2))] * B)
        for policy, rows in (("window", windowed), ("full", ~windowed)):
            ref = score(model, ro, CachePolicy(policy, toy.TOY_DEFAULTS["cache"]), use_checkpoint=False)
            torch.testing.assert_close(logp[rows], ref[rows], atol=1e-4, rtol=0)
    # and the window really hides the memo (thought 3) from X's predecessor (thought 16), not from thought 9
    allowed = toy.window_mask(torch.tensor([True]))[0, 0] == 0
    memo = data.PROMPT_LEN + 3
    assert (allowed[data.PROMPT_LEN + 9, memo] and not allowed[data.PROMPT_LEN + 10, memo]
            and not allowed[data.PROMPT_LEN + 16, memo])
    assert allowed[data.PROMPT_LEN + 16, :data.PROMPT_LEN].all()  # the prompt is pinned


def test_shipped_model_spreads_the_recall_over_the_digits_when_the_memo_is_gone():
    """Trained with a quarter of its batches under the window: there X is uniform (ln 10 nats), so GRPO's groups see
    different rewards; with the full cache X is certain."""
    from rollout import score
    model, tokenizer = load("toy"), load_tokenizer("toy")
    prompts = [tokenizer.encode(p["problem"]).ids for p in data.make_problems(32, data.EVAL_SEED)]
    entropy = {}
    for policy in ("full", "window"):
        pol = CachePolicy(policy, toy.TOY_DEFAULTS["cache"])
        out = generate(model, prompts, pol, Sampling(data.TRACE_LEN))
        with torch.no_grad():
            ent = score(model, out, pol,
                        token_fn=lambda logits, _, span: -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        entropy[policy] = ent[:, 17].mean().item()  # predicting X, thought 17
    assert entropy["full"] < 0.05 and entropy["window"] > 2.1, entropy  # ln 10 = 2.30


@pytest.mark.slow
def test_pte_distillation_recalls_what_the_window_forgets(tmp_path):
    """A broken encoder (or readout, or eviction hand-over) fails this: 40 distillation steps (~25 s on one core)
    take PTE from chance to > 0.5 on held-out problems, where the base model under the same window stays at ~0.1.
    LoRA's init and one learning rate, as in the paper (the toy's GRPO defaults reach 0.30 here: their encoder is
    slower)."""
    import train
    from encoder import load_adapter
    from eval import evaluate
    run = train.main(["--model", "toy", "--objective", "distill", "--steps", "40", "--prompts-per-step", "256",
                      "--group", "1", "--lr", "1e-3", "--encoder-lr", "1e-3", "--b-init", "0", "--seed", "0",
                      "--eval-size", "0", "--threads", "1", "--out", str(tmp_path / "run")])
    model, tokenizer = load("toy"), load_tokenizer("toy")
    problems = data.make_problems(128, data.EVAL_SEED)
    accuracy = {}
    for policy, adapter in (("window", None), ("pte", load_adapter(run / "adapter", model.config))):
        summary, _ = evaluate(model, tokenizer, problems, CachePolicy(policy, toy.TOY_DEFAULTS["cache"]), adapter,
                              max_new=toy.TOY_DEFAULTS["max_new"], batch_size=128, progress=False)
        accuracy[policy] = summary["accuracy"]
    assert accuracy["window"] < 0.25 and accuracy["pte"] > 0.5, accuracy


def test_compare_refuses_bad_seeds():
    with pytest.raises(SystemExit):
        toy.main(["compare", "--seeds", "0,one"])


def test_memo_family_by_hand():
    # k = 2, x0 = 1 and every operand 1: x_i = 1 + i; memos at thoughts 0 and 4 hold x1 = 2 (kind a), x5 = 6 (kind b)
    prompt, trace = toy.encode_memos(torch.ones(1, 33, dtype=torch.long), 2)
    tokenizer = toy.make_tokenizer(toy.VOCAB_MEMOS)
    assert tokenizer.decode(prompt[0].tolist(), skip_special_tokens=False) == (
        "<bos> " + " ".join("1" * 9 + "_" * 24) + " <sep>")
    assert tokenizer.decode(trace[0].tolist(), skip_special_tokens=False) == "a2 3 4 5 b6 7 8 9 = a2 b6 <eos>"
    problems = toy.make_memo_problems(50, 3, seed=1)
    assert problems == toy.make_memo_problems(50, 3, seed=1)
    for p in problems:  # the answer recomputed from the prompt's digits
        words = [w for w in p["problem"].split()[1:-1] if w != "_"]
        xs = [sum(int(w) for w in words[:i + 1]) % 10 for i in range(len(words))]
        assert p["answer"] == " ".join(f"{kind}{xs[4 * j + 1]}" for j, kind in enumerate("abc"))


def test_recall_score_counts_memos():
    digits = data.draw_digits(2, torch.Generator().manual_seed(0), 32)
    _, trace = toy.encode_memos(digits, 2)  # (2, 12): recall at 9, 10
    assert toy.recall_score(trace, trace, 2) == 1.0
    wrong = trace.clone()
    wrong[0, 9] = data.ID["<eos>"]
    assert toy.recall_score(wrong, trace, 2) == 0.75
    assert toy.recall_score(trace[:, :10], trace, 2) == 0.5  # stopped before the second recall: it counts as wrong


def test_longer_memo_traces_leave_more_to_s():
    """At prompt + 8 thought slots (m = 2) the window still holds memo j when recall j is written only for short
    traces: all of k = 1, the last of k = 2, none of k = 5 or more. Memo j (0-based) sits at thought 4j; recall j
    (thought 4k + 1 + j) is predicted by the forward of thought 4k + j, which sees thoughts from 2 x evictions so
    far."""
    def visible(k):
        steps = eviction_steps(5 * k + 2, 8, 2, "window")
        return [4 * j >= 2 * sum(e <= 4 * k + j for e in steps) for j in range(k)]
    assert visible(1) == [True] and visible(2) == [False, True] and not any(visible(5)) and not any(visible(8))


def test_ledger_keeps_finished_results(tmp_path):
    calls = []
    work = lambda: calls.append(1) or dict(accuracy=0.5)  # noqa: E731
    first = toy.ledger_result(tmp_path / "r.json", "run-a", work)
    assert toy.ledger_result(tmp_path / "r.json", "run-a", work) == first and len(calls) == 1
    assert first["accuracy"] == 0.5 and first["seconds"] >= 0
    toy.ledger_result(tmp_path / "r.json", "run-b", work)
    assert len(calls) == 2 and set(json.loads((tmp_path / "r.json").read_text())) == {"run-a", "run-b"}


def test_probe_reads_the_memo_from_s_only_when_evictions_fold_in():
    """The encoder at its initialisation already carries the memo digit linearly in S when X is predicted; with S
    fixed at S(0) (global-only) the probe is at chance. A fold that drops the evicted tokens fails the first."""
    from encoder import Adapter, AdapterConfig
    model = load("toy")
    torch.manual_seed(0)
    acc = {mode: toy.memo_probe(model, Adapter(model.config, AdapterConfig(mode, 16, 128.0, 8, ["o"])), n=512)
           for mode in ("pte", "global-only")}
    assert acc["pte"] > 0.9 and acc["global-only"] < 0.25, acc


def test_swapped_adapter_init_starts_at_the_base_model_and_trains_a_first():
    """b_init > 0 (the toy's choice): A = 0, B random, so the update is zero at step 0 and only A has a gradient;
    param_groups gives the encoder its own learning rate."""
    from encoder import ENCODER_PARAMS, Adapter, AdapterConfig, param_groups
    model = load("toy")
    torch.manual_seed(0)
    adapter = Adapter(model.config, AdapterConfig("pte", 4, 32.0, 2, ["o"], b_init=0.03))
    assert all(not a.any() for a in adapter.A.values()) and all(0.02 < b.std() < 0.04 for b in adapter.B.values())
    tokens = torch.tensor([load_tokenizer("toy").encode(data.make_problems(2, 0)[0]["problem"]).ids] * 2)
    cores = adapter.initial_cores(2)
    loss = model(tokens, adapter=adapter, cores=cores).logsumexp(-1).sum()
    with torch.no_grad():
        # starts as the base model
        torch.testing.assert_close(model(tokens, adapter=adapter, cores=cores), model(tokens))
    loss.backward()
    assert all(a.grad.abs().sum() > 0 for a in adapter.A.values()) and all(not b.grad.any() for b in adapter.B.values())
    groups = param_groups(adapter, 1e-3, 1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(getattr(adapter, n)) for n in ENCODER_PARAMS}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(adapter.parameters()))


def test_compare_resumes_from_its_ledger(tmp_path, monkeypatch, capsys):
    """Finished runs come from results.json and are not trained again; a row with some seeds done shows those."""
    done = {"base-full": 1.0, "base-window": 0.1, "pte-grpo-300steps-seed0": 0.9, "pte-grpo-300steps-seed1": 0.8}
    (tmp_path / "results.json").write_text(json.dumps({k: dict(accuracy=v, seconds=10) for k, v in done.items()}))
    monkeypatch.setattr(toy, "train_adapter", lambda *a: pytest.fail("a finished run was trained again"))
    toy.compare([0, 1, 2], 300, 150, 1, "cmd", rows=["none"], out=tmp_path, plots=tmp_path)
    table = capsys.readouterr().out
    assert "| PTE (seeds 0,1) | GRPO | 300 | 0.850 | 0.900 0.800 |" in table and "LoRA_c" not in table
    assert "| base, window | - | - | 0.100 | 0.100 |" in table and "total time 40 s" in table
