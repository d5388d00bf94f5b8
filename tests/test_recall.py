"""experiments/recall.py: the recall texts (seeded, training and held-out pairs disjoint, the fact evicted before the
recall, labelled items), the teacher's alignment with score under the full cache, the quick mode end to end with its
resume, and the mechanism: distilled PTE recalls digits the bare window cannot."""
import json

import pytest
import recall as R
import torch

import model as M
from eval import token_kl
from rollout import CachePolicy, score


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return M.load_tokenizer(smollm2)


def test_letter_split_halves_the_letters():
    train, held = R.letter_split(0)
    assert len(train) == len(held) == 10 and sorted(train + held) == sorted(R.LETTERS)
    assert R.letter_split(0) == (train, held) and R.letter_split(1) != (train, held)


@pytest.mark.parametrize("k, distance", [(1, 1), (4, 1), (8, 1), (4, 2), (4, 4)])
def test_texts_are_seeded_disjoint_labelled_and_evict_the_fact_before_the_recall(tokenizer, k, distance):
    task, eos = R.Task(k=k, distance=distance), 2
    train, held = (R.make_texts(task, tokenizer, 12, split, eos) for split in ("train", "held-out"))
    assert train == R.make_texts(task, tokenizer, 12, "train", eos)  # seeded
    assert train != R.make_texts(task, tokenizer, 12, "train", eos, draw=1)
    letters = lambda texts: set("".join(t.letters for t in texts))  # noqa: E731
    assert letters(train) <= set(R.letter_split(0)[0]) and letters(held) <= set(R.letter_split(0)[1])
    assert len({t.digits[0] for t in train + held}) >= 6  # the digits are drawn, not fixed
    P = len(train[0].prompt)
    evictions = CachePolicy("window", P + task.window, task.evict).schedule([P], 300).steps(0, 300)
    assert evictions[:2] == [task.window, task.window + task.m]
    for text in train + held:
        prompt = tokenizer.decode(text.prompt, skip_special_tokens=False)
        assert len(text.prompt) == P and not any(c.isdigit() for c in prompt)  # the prompt never holds the fact
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert all(f" {c}" in prompt for c in text.letters) and len(set(text.letters)) == k  # the labels are pinned
        for where in (text.stated, text.facts):  # each digit follows its own letter: labelled items
            assert [tokenizer.decode([text.thoughts[j]]) for j in where] == list(text.digits)
            assert [tokenizer.decode([text.thoughts[j - 1]]) for j in where] == [f" {c}" for c in text.letters]
        assert max(text.stated) < task.m  # the first eviction (before thought W) takes the whole fact
        # the first recalled digit is predicted at the token before it, after exactly `distance` evictions
        assert sum(t <= text.facts[0] - 1 for t in evictions) == distance and text.facts[0] > task.window
        assert text.thoughts[-1] == eos and text.facts[-1] < len(text.thoughts) - 1


def tiny_texts(n_prompt=6, lengths=(20, 17)):
    """Random ids in the tiny model's vocabulary, shaped like recall texts: one digit stated at thought 1, recalled
    at thought 12 (W = 8, m = 4: evictions before thoughts 8, 12, 16)."""
    gen = torch.Generator().manual_seed(0)
    return [R.Text(torch.randint(3, 97, (n_prompt,), generator=gen).tolist(),
                   torch.randint(3, 97, (n,), generator=gen).tolist(), [12], [1], "K", "4") for n in lengths]


def test_teacher_is_the_full_cache_and_the_window_departs_after_its_first_eviction(tiny_qwen):
    """The teacher's states line up with score's tokens: under the full cache the KL is 0 at every token; the bare
    window's is 0 up to thought W (its predictions saw no eviction) and not after."""
    net, task = M.load(tiny_qwen[0]), R.Task(k=1, distance=2, window=8, evict=0.5)
    texts = tiny_texts()
    full, cache = R.as_rollout(texts, task, "full", 0)
    hidden = R.teacher_hidden(net, full)
    assert full.evictions == [[], []] and full.mask.sum(1).tolist() == [20, 17]
    kl = score(net, full, cache, None, use_checkpoint=False, token_fn=R.kl_to_teacher(net, hidden))
    assert kl[full.mask].abs().max() < 1e-5
    window, cache = R.as_rollout(texts, task, "window", 0)
    assert window.evictions == [[8, 12, 16], [8, 12, 16]]  # every row evicts on the schedule of the padded length
    kl = score(net, window, cache, None, use_checkpoint=False, token_fn=R.kl_to_teacher(net, hidden))
    assert kl[:, :task.window + 1].abs().max() < 1e-5 and (kl[:, task.window + 1:] > 1e-4).any()
    with torch.no_grad():  # eval.py's KL, whose teacher is its own full-cache replay: the same values
        reference = token_kl(net, window, cache)
    assert torch.allclose(kl[window.mask], reference[window.mask], atol=1e-5)
    record = R.evaluate(net, None, task, [(texts, window, cache, hidden)])
    assert record["other_n"] == [20 - 9 - 1, 17 - 9 - 1]  # thoughts 9 .. end, less the recalled digit
    assert record["digit_kl"] == pytest.approx(kl[:, 12].tolist(), abs=1e-6)
    assert record["other_kl"][1] == pytest.approx((kl[1, 9:17].sum() - kl[1, 12]).item(), rel=1e-5)


def test_summaries_by_hand():
    assert R.mean_se([1.0, 0.0, 0.0, 1.0]) == pytest.approx((0.5, (1 / 3 / 4) ** 0.5))
    record = dict(accuracy=[1.0, 0.5], digit_kl=[0.0, 2.0], first=[1.0, 0.0], first_kl=[0.0, 1.0], other_kl=[3.0, 1.0],
                  other_n=[3, 1])
    s = R.summary(record)
    assert s["other_kl"] == pytest.approx((1.0, 0.0)) and s["accuracy"] == pytest.approx((0.75, 0.25))
    assert s["first"] == pytest.approx((0.5, 0.5)) and s["digit_kl"] == pytest.approx((1.0, 1.0))
    d = R.differences(record, dict(record, accuracy=[0.0, 0.0]))
    assert d["accuracy"] == [1.0, 0.5] and d["other_kl"] == [0.0, 0.0]


@pytest.mark.slow
def test_quick_mode_runs_every_row_end_to_end_and_resumes(smollm2, tmp_path, capsys, monkeypatch):
    """--quick, by its two worker processes: every table printed with every row, the ledger holds every run, the
    plots are written; the same command again, in this process alone, trains and evaluates nothing and prints the
    same tables."""
    monkeypatch.setenv("PTE_SMOLLM2", str(smollm2))
    argv = ["--quick", "--out", str(tmp_path)]
    R.main(argv)
    first = capsys.readouterr().out
    args = R.parse(argv)
    runs = {setting.key() for _, _, setting in R.plan(args)}
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert set(ledger["runs"]) == runs and ledger["counts"]["steps"] == R.QUICK["steps"]
    for title in ("### Main comparison", "### Recall against the fact's size", "### Recall against the distance",
                  "### Settings tried", "Paired difference PTE - LoRA_c"):
        assert title in first
    for label in ("| full cache | - |", "| bare window | - |", "| LoRA_c | 0 |", "| PTE | 1 |", "| global-only | 1 |",
                  "| 8 | ", "| all seeds |"):
        assert label in first
    for _, _, setting in R.plan(args):  # each trained adapter took its own number of steps
        if setting.trained:
            steps = args.twin_steps if setting.texts == "twins" else setting.steps or args.steps
            assert len(ledger["adapters"][setting.train_key()]["losses"]) == steps
    for name in ("main", "size", "distance"):
        assert (tmp_path / f"recall-{name}.svg").read_text().startswith("<svg")
    monkeypatch.setattr(R, "distill", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    R.main(argv + ["--jobs", "1", "--threads", "1"])
    tables = lambda out: out[out.index("\n### "):out.index("\ntime:")]  # noqa: E731
    assert tables(capsys.readouterr().out) == tables(first)


def test_the_workers_share_the_runs_and_each_adapter_is_trained_by_one():
    args = R.parse(["--jobs", "3"])
    entries = R.plan(args)
    worker = R.share(entries, args)
    assert set(worker) == {s.key() for *_, s in entries} and set(worker.values()) == {0, 1, 2}
    by_adapter = {}
    for *_, s in entries:
        if s.trained:
            by_adapter.setdefault(s.train_key(), set()).add(worker[s.key()])
    assert len(by_adapter) > 3 and all(len(w) == 1 for w in by_adapter.values())  # the size table's PTE serves 4 runs


@pytest.mark.slow
def test_distilled_pte_recalls_from_s_what_the_window_cannot(smol):
    """Two texts identical but for the digits: up to the first recalled digit the window holds the same tokens in
    both, so the bare window (or any row without S) predicts that digit alike in both and is right in one at most.
    A few distillation steps of PTE on the pair make it right in both: the difference can only have come through S,
    the fold of the evicted fact. A fold that carried nothing (S stuck at S(0)) or the wrong tokens fails here."""
    _, net, tokenizer = smol
    task, eos = R.Task(), net.config.eos_ids[0]
    pair = R.twins(task, tokenizer, 2, eos)
    assert pair[0].thoughts[:pair[0].stated[0]] == pair[1].thoughts[:pair[1].stated[0]]  # one text, two facts
    hidden = R.teacher_hidden(net, R.as_rollout(pair, task, "full", eos)[0])
    first = lambda adapter, policy: R.evaluate(net, adapter, task, [  # noqa: E731
        (pair, *R.as_rollout(pair, task, policy, eos), hidden)])["first"]
    assert first(None, "full") == [1.0, 1.0] and sum(first(None, "window")) <= 1
    setting = R.Setting("pte", task, alpha=256.0, b_init=0.01, v_scale=10.0)
    ro, cache = R.as_rollout(pair, task, "pte", eos)
    adapter, losses, _ = R.distill(net, setting, [(pair, ro, cache, hidden)] * STEPS, n_globals=32)
    assert first(adapter, "pte") == [1.0, 1.0], losses


STEPS = 20  # AdamW steps on the pair
