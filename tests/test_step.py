"""train.py's training step (`update`, `Objective`, `take`) on the toy and a tiny random Qwen2: the clip norm applied
as given, the PPO "old" log-probs from the learner's own replay, --epochs, and micro-batches trimmed without changing
a value."""
import pytest
import torch

import train
from encoder import Adapter, AdapterConfig, trainable
from model import load
from rollout import CachePolicy, Sampling, generate, score
from test_rollout import P, W, early_stopping_eos, make_adapter, run, tiny  # noqa: F401 (tiny: a fixture)
from data import make_problems
from toy import make_tokenizer


@pytest.fixture(scope="module")
def toy_step():
    """(model, adapter with random B, a pte rollout of 8 toy problems, random advantages)."""
    model = load("toy")
    torch.manual_seed(0)
    adapter = Adapter(model.config, AdapterConfig("pte", rank=4, alpha=4.0, n_globals=4, targets=("o",)))
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(0, 0.3)
    tok = make_tokenizer()
    prompts = [tok.encode(p["problem"], add_special_tokens=False).ids for p in make_problems(8, seed=5)]
    ro = generate(model, prompts, CachePolicy("pte", 27), Sampling(24, 1.0), adapter, torch.Generator().manual_seed(0))
    return model, adapter, ro, torch.randn(8, generator=torch.Generator().manual_seed(1))


def step(toy_step, optimizer_of, *flags):
    model, adapter, ro, adv = toy_step
    args = train.parse_args(["--model", "toy", "--micro-batch", "3", *flags])
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    objective = train.Objective(model, adapter, args, CachePolicy("pte", 27), CachePolicy("window", 27))
    optimizer = optimizer_of(trainable(adapter))
    stats = train.update(objective, optimizer, ro, adv, args, world=1)
    moved = {k: adapter.state_dict()[k] - v for k, v in state.items()}
    adapter.load_state_dict(state)
    return stats, moved, optimizer


def test_grad_clip_is_applied_as_given(toy_step):
    """SGD at lr 1 moves the parameters by exactly the clipped gradient: its norm is --grad-clip."""
    stats, moved, _ = step(toy_step, lambda p: torch.optim.SGD(p, lr=1.0), "--grad-clip", "1e-4")
    assert stats["grad_norm"] > 1e-3  # the norm before clipping is logged
    assert torch.cat([d.flatten() for d in moved.values()]).norm().item() == pytest.approx(1e-4, rel=1e-4)


def test_old_logprobs_are_the_learners_replay(toy_step):
    """generate's log-probs 0.3 nats off (a sampler-learner gap, as bf16 gives): the ratio is still exactly 1, so
    no token is clipped and the token-mean loss is -sum(A over tokens) / tokens; the gap is logged."""
    model, adapter, ro, adv = toy_step
    shifted = (model, adapter, train.Rollout(**{**vars(ro), "logprobs": ro.logprobs + 0.3}), adv)
    stats, _, _ = step(shifted, lambda p: torch.optim.SGD(p, lr=0.0), "--beta", "0")
    assert stats["clip_frac"] == 0
    assert stats["loss"] == pytest.approx(-(adv[:, None] * ro.mask).sum().item() / ro.mask.sum().item(), rel=1e-5)
    assert stats["sampler_gap_mean"] == pytest.approx(0.3, abs=1e-4)
    assert stats["sampler_gap_max"] == pytest.approx(0.3, abs=1e-4)


def test_epochs_take_that_many_steps_against_the_first_replay(toy_step):
    """--epochs 2: two optimizer steps; the second epoch's ratio moves away from 1 and a large step gets clipped."""
    _, _, optimizer = step(toy_step, lambda p: torch.optim.Adam(p, lr=0.05), "--epochs", "2")
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}
    stats, _, _ = step(toy_step, lambda p: torch.optim.Adam(p, lr=0.5), "--epochs", "2")
    assert stats["clip_frac"] > 0


def test_an_fp16_model_keeps_the_gradients_of_a_large_batch(toy_step):
    """A token-mean loss over the paper's ~1.5M tokens a step gives each token a gradient of about 7e-7, which an
    fp16 model's activations flush towards zero: a backward at that weight is far off the fp32 one. update's loss
    scaling keeps the fp16 update to fp16's precision, here over 90k tokens (a weight of 1e-5)."""
    model, adapter, ro, adv = toy_step
    half = load("toy", dtype=torch.float16)
    weights = adv[:, None] * ro.mask / 1.5e6  # (B, T): the paper's per-token weight
    grads = []
    for net in (model, half):
        adapter.zero_grad(set_to_none=True)
        (score(net, ro, CachePolicy("pte", 27), adapter, 1.0) * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainable(adapter) if p.grad is not None]))
    adapter.zero_grad(set_to_none=True)
    assert (grads[1] - grads[0]).norm() / grads[0].norm() > 0.2  # unscaled: 0.53 off
    n = 512  # the 8 rows, 512 times
    big = train.Rollout(ro.prompts.repeat(n, 1), ro.prompt_lens.repeat(n), ro.tokens.repeat(n, 1),
                        ro.logprobs.repeat(n, 1), ro.mask.repeat(n, 1), ro.truncated.repeat(n), ro.evictions * n,
                        ro.stats)
    moved = {}
    for dtype in (torch.float32, torch.float16):
        _, delta, _ = step((model if dtype == torch.float32 else half, adapter, big, adv.repeat(n)),
                           lambda p: torch.optim.SGD(p, lr=1.0), "--grad-clip", "1e9", "--micro-batch", "1024")
        moved[dtype] = torch.cat([d.flatten() for d in delta.values()])  # minus the gradient
    error = (moved[torch.float16] - moved[torch.float32]).norm() / moved[torch.float32].norm()
    assert int(big.mask.sum()) > 80_000 and error < 0.02, error


def test_micro_batches_trimmed_to_their_rows_score_the_same(tiny):
    """take() cuts a micro-batch to its own longest prompt and completion; with per-row windows that changes no
    value: a short-prompt row that stopped early scores as it does in the whole batch."""
    adapter = make_adapter(tiny.config, "pte")
    roll = run(tiny, "pte", adapter, eos_ids=[early_stopping_eos(tiny, "pte", adapter, 1.0)])
    row = 1 + int(roll.mask[1:].sum(1).argmin())  # prompt of 5 or 3 tokens
    part = train.take(roll, torch.tensor([row]))
    assert part.prompts.shape[1] < P and part.tokens.shape[1] == int(roll.mask[row].sum()) < roll.tokens.shape[1]
    with torch.no_grad():
        whole = score(tiny, roll, CachePolicy("pte", P + W), adapter, 1.0)[row:row + 1, :part.tokens.shape[1]]
        trimmed = score(tiny, part, CachePolicy("pte", P + W), adapter, 1.0)
    assert (whole - trimmed)[part.mask].abs().max() < 1e-5


def test_no_checkpoint_takes_the_same_step(toy_step, monkeypatch):
    """--no-checkpoint (the toy's default) reaches score and moves the parameters exactly as the checkpointed
    replay does: checkpoints trade a recompute for memory, never the gradient."""
    calls, real_score = [], train.score

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # the policy's replay; the reference's runs under no_grad
            calls.append(kwargs.get("use_checkpoint", True))
        return real_score(*args, **kwargs)
    monkeypatch.setattr(train, "score", spy)
    _, checkpointed, _ = step(toy_step, lambda p: torch.optim.SGD(p, lr=1.0), "--checkpoint")
    assert calls and set(calls) == {True}
    calls.clear()
    _, plain, _ = step(toy_step, lambda p: torch.optim.SGD(p, lr=1.0), "--no-checkpoint")
    assert calls and set(calls) == {False}
    assert train.parse_args(["--model", "toy"]).checkpoint is False  # toy/train_defaults.json
    assert torch.cat([d.flatten() for d in checkpointed.values()]).abs().max() > 1e-4  # a real step
    for name, delta in checkpointed.items():
        torch.testing.assert_close(plain[name], delta, rtol=1e-6, atol=1e-9)


def test_rollouts_in_chunks_are_one_rollout(toy_step):
    """train.roll_out at --rollout-batch 3: 8 rows of prompts of 19, 21 and 23 tokens, sorted by length, generated 3
    at a time and merged back in their order, are the rows one generate call makes (greedy): same tokens, masks,
    evictions and windows, prompts left-padded alike; the log-probs agree to float rounding."""
    model, adapter, _, _ = toy_step
    tok = make_tokenizer()
    problems = make_problems(8, seed=5)
    prompts = [tok.encode(p["problem"].replace("<sep>", "0 " * (i % 3) + "<sep>"), add_special_tokens=False).ids
               for i, p in enumerate(problems)]
    assert sorted({len(p) for p in prompts}) == [19, 20, 21]

    def roll_out(rows):
        args = train.parse_args(["--model", "toy", "--rollout-batch", str(rows), "--temperature", "0",
                                 "--objective", "distill"])
        return train.roll_out(model, prompts, CachePolicy("pte", 27), args, adapter, None, 0)
    one, chunked = roll_out(100), roll_out(3)
    assert (one.stats["chunks"], chunked.stats["chunks"]) == (1, 3)
    for field in ("prompts", "prompt_lens", "tokens", "mask", "truncated"):
        assert torch.equal(getattr(one, field), getattr(chunked, field)), field
    assert one.evictions == chunked.evictions and any(one.evictions)
    assert one.stats["windows"] == chunked.stats["windows"] == [27 - len(p) for p in prompts]
    assert one.stats["evictions"] == pytest.approx(chunked.stats["evictions"])
    torch.testing.assert_close(one.logprobs[one.mask], chunked.logprobs[one.mask])


def test_distillation_teacher_keeps_hidden_states_not_logits(tiny):
    """The distillation objective's forward and backward on an 80-token rollout of a 97-token vocabulary: no
    tensor of shape (b, n, V) with n above rollout.LOGIT_CHUNK is ever made (the teacher's log-probs were once kept
    whole, (b, T, V) in fp32), while the teacher's hidden states (b, T, d) are."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from rollout import LOGIT_CHUNK

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            return out
    adapter = make_adapter(tiny.config, "pte")
    ro = run(tiny, "pte", adapter, max_new=80)
    (B, T), V, d = ro.tokens.shape, tiny.config.vocab_size, tiny.config.dim
    args = train.parse_args(["--model", "toy", "--objective", "distill", "--cache", str(P + W)])
    objective = train.Objective(tiny, adapter, args, CachePolicy("pte", P + W), None)
    with Shapes() as shapes:
        loss, _, _ = objective(ro, None, None, B, int(ro.mask.sum()))
        loss.backward()
    logits = [s for s in shapes.seen if len(s) == 3 and s[0] == B and s[2] == V]
    assert T > LOGIT_CHUNK and logits and max(n for _, n, _ in logits) <= LOGIT_CHUNK, logits
    assert (B, T, d) in shapes.seen


def test_kl_estimator_reaches_the_loss(toy_step, monkeypatch):
    """--kl-estimator k3-ratio: the loss gets it, the logged KL keeps its value (ratio 1), the step differs from k3's
    (their gradients are those of KL(pi || ref) and KL(ref || pi): tests/test_grpo.py); the default stays k3."""
    seen, real_loss = [], train.grpo_loss

    def spy(logp, old_logp, adv, mask, ref_logp, cfg, *totals):
        seen.append(cfg.kl_estimator)
        return real_loss(logp, old_logp, adv, mask, ref_logp, cfg, *totals)
    monkeypatch.setattr(train, "grpo_loss", spy)
    sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    k3_stats, k3_moved, _ = step(toy_step, sgd, "--beta", "0.5")
    assert set(seen) == {"k3"}
    seen.clear()
    ratio_stats, ratio_moved, _ = step(toy_step, sgd, "--beta", "0.5", "--kl-estimator", "k3-ratio")
    assert set(seen) == {"k3-ratio"}
    assert k3_stats["kl"] > 1e-4 and ratio_stats["kl"] == pytest.approx(k3_stats["kl"], rel=1e-5)
    assert max((ratio_moved[k] - k3_moved[k]).abs().max().item() for k in k3_moved) > 1e-3
    assert train.parse_args(["--model", "toy"]).kl_estimator == "k3"
