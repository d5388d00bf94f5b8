"""train.py's memory plan: `--plan` reads nothing but shapes, its terms against sizes counted by hand and from the
real toy model, the way each flag moves them, and a run refused before it loads when its plan does not fit.
(The plan against measured peaks is bench.py's: a benchmark, not a test.)"""
import re
import pytest

import model as M
import train
from encoder import Adapter, AdapterConfig

QWEN3B = M.config_from_hf(M.REGISTRY["qwen2.5-3b"][1])


def paper(**kw):
    """The paper's settings at qwen2.5-3b on cuda (bf16), with the default rollout batch."""
    return train.MemorySettings(**kw)


def gib(x):
    return x / 2**30


def test_plan_prints_every_phase_and_loads_nothing(monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("--plan must not load weights or look for the model's folder")
    monkeypatch.setattr(train, "load", refuse)
    monkeypatch.setattr(train, "resolve", refuse)
    monkeypatch.setattr(M, "load", refuse)
    assert train.main(["--model", "qwen2.5-3b", "--plan", "80"]) is None
    out = capsys.readouterr().out
    for phase in ("weights", "adapter", "rollout cache", "prefill", "decode step", "score micro-batch",
                  "optimizer step"):
        assert f"| {phase} |" in out
    total = float(re.search(r"total peak ([0-9.]+) GiB", out).group(1))
    assert 6 < total < 40 and "of 80.00 GiB: fits" in out  # the weights alone are 5.75 GiB


def test_terms_against_sizes_counted_by_hand():
    """The toy (2 layers, 2 KV heads of 16, vocab 27) in fp32 on the CPU: each term recounted here."""
    cfg = M.read_config(M.TOY_DIR)
    toy = M.load("toy")
    ad = AdapterConfig("pte", rank=4, alpha=4.0, n_globals=4, targets=("o",))
    s = train.MemorySettings(policy="window", cache=27, max_new=24, longest_prompt=19, shortest_prompt=19, rows=256,
                             rollout_rows=64, prefill_rows=16, micro_batch=8, adapter=ad, device="cpu", dtype_bytes=4,
                             packed=True, runtime=0)
    plan = train.memory_plan(cfg, s)
    assert plan["weights"] == sum(p.numel() for p in toy.parameters()) * 4  # tied embedding counted once
    adapter_params = sum(p.numel() for p in Adapter(cfg, ad).parameters())
    assert plan["adapter"] == adapter_params * 4 * 3 and plan["gradients"] == adapter_params * 4
    projections = sum(p.numel() for n, p in toy.named_parameters() if n.endswith("_proj.weight"))
    assert plan["packed_weights"] == (projections + 27 * 64) * 4  # lm_head is packed too, tied or not
    # 64 rows of one generate call x 27 slots x (K and V of 2 layers x 32 dims x 4 bytes + an 8-byte position),
    # and 64 x 24 outputs of 8 + 4 + 1 bytes
    assert plan["rollout_cache"] == 64 * 27 * (2 * 2 * 32 * 4 + 8) + 64 * 24 * 13
    full = train.memory_plan(cfg, train.MemorySettings(**{**vars(s), "policy": "full"}))
    assert full["rollout_cache"] == 64 * (19 + 24) * (2 * 2 * 32 * 4 + 8) + 64 * 24 * 13  # prompt + max_new slots


def test_flags_move_the_terms_they_should():
    base = train.memory_plan(QWEN3B, paper())
    longer = train.memory_plan(QWEN3B, paper(max_new=6144))
    assert longer["rollout_cache"] - base["rollout_cache"] == 128 * 3072 * 13  # pte: only the outputs grow
    full, full_longer = (train.memory_plan(QWEN3B, paper(policy="full", max_new=t)) for t in (3072, 6144))
    assert full_longer["rollout_cache"] > 1.5 * full["rollout_cache"]  # full: the cache grows with the rollout
    assert train.memory_plan(QWEN3B, paper(prefill_rows=64))["prefill"] > 1.9 * base["prefill"] - 128 * 151936 * 2
    truncated = train.memory_plan(QWEN3B, paper(truncate=True, max_new=16384))
    exact = train.memory_plan(QWEN3B, paper(max_new=16384))
    assert truncated["score"] < exact["score"] / 2  # --truncate: fixed by the budget, not the rollout
    assert train.memory_plan(QWEN3B, paper(truncate=True, max_new=32768))["score"] == truncated["score"]
    assert train.memory_plan(QWEN3B, paper(checkpoint=False))["score"] > 4 * base["score"]
    assert train.memory_plan(QWEN3B, paper(micro_batch=16))["score"] > 1.9 * base["score"]
    assert train.memory_plan(QWEN3B, paper(objective="distill"))["score"] > base["score"]
    assert train.memory_plan(QWEN3B, paper(rollout_rows=256))["rollout_cache"] > 1.9 * base["rollout_cache"]


@pytest.mark.parametrize("settings, phase, flag", [
    (dict(policy="full", rollout_rows=512), "rollout", "--rollout-batch"),
    (dict(policy="window", rollout_rows=512, prefill_rows=512), "prefill", "--prefill-rows"),
    (dict(micro_batch=64, prefill_rows=1, rollout_rows=8), "score", "--micro-batch"),
])
def test_the_advice_names_the_flag_of_the_phase_at_the_peak(settings, phase, flag):
    s = paper(**settings)
    found, fix = train.plan_advice(train.memory_plan(QWEN3B, s), s)
    assert found == phase and flag in fix


def test_a_run_that_cannot_fit_is_refused_before_it_loads(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("the model must not load")
    monkeypatch.setattr(train, "load", refuse)
    monkeypatch.setattr(train, "device_memory", lambda device: 2**20)  # 1 MiB
    with pytest.raises(ValueError, match=r"memory plan needs [0-9.]+ GiB .* than the 0.0 GiB of cpu: .*--"):
        train.main(["--model", "toy", "--steps", "1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_plan_of_this_machine(capsys):
    train.main(["--model", "toy", "--plan"])
    out = capsys.readouterr().out
    assert "this process before any weight" in out and re.search(r"of [0-9.]+ GiB: fits", out)
