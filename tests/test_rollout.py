"""rollout.py and cache.py: `window` against the docs/method.md §2 reference (one transformers forward with an explicit
4D mask computed here from a simulated ring), `pte` against `window`, `score` against `generate` and its gradients,
fixed memory, RoPE un-rotation, the eviction schedule; on the real SmolLM2, answers that survive eviction."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
from conftest import chatml
from cache import MaskedForward, RingCache, evict_count, eviction_steps, thought_slots
from encoder import Adapter, AdapterConfig
import rollout
from cache import Schedule
from rollout import CachePolicy, Sampling, fold, generate, sample, score

# left-padded to P = 8; picked so that greedy decoding of the tiny model does not loop on one token in every row
PROMPTS = [[47, 77, 70, 9, 43, 53, 67, 40], [32, 51, 44, 43, 93], [42, 44, 35]]
P, W, MAX_NEW = 8, 8, 24  # budget P + W: row 0 keeps W = 8 (m = 2), row 1 11 (m = 3), row 2 13 (m = 4) thought slots


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    return M.load(tiny_qwen[0])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(model, policy, adapter=None, budget=P + W, evict=0.25, max_new=MAX_NEW, temperature=1.0, eos_ids=(),
        prefill_rows=None):
    """generate on PROMPTS: temperature 1, seeded, no EOS unless asked."""
    sampling = Sampling(max_new, temperature, eos_ids=list(eos_ids), pad_id=0)
    return generate(model, PROMPTS, CachePolicy(policy, budget, evict), sampling, adapter, gen(),
                    prefill_rows=prefill_rows)


def make_adapter(cfg, mode, b_std=0.1):
    """A rank-4 adapter (alpha / r = 1) with B random, so that it changes the model; b_std=0 keeps B = 0."""
    torch.manual_seed(0)
    adapter = Adapter(cfg, AdapterConfig(mode=mode, rank=4, alpha=4.0, n_globals=4))
    if b_std:
        with torch.no_grad():
            for b in adapter.B.values():
                b.normal_(0, b_std)
    return adapter


# ---------------------------------------------------------------------------------------------------- the reference

def rings(budget, evict=0.25):
    """Each row's (W_i, m_i) at this budget: W_i = budget - len(prompt_i), docs/method.md §2."""
    return [(budget - len(p), evict_count(budget - len(p), evict)) for p in PROMPTS]


def simulate_ring(n_tokens, window, m):
    """Thought tokens in the window when each token t is written, and the steps before which m were evicted."""
    ring, seen, steps = [], [], []
    for t in range(n_tokens):
        if len(ring) == window:
            ring = ring[m:]
            steps.append(t)
        ring.append(t)
        seen.append(list(ring))
    return seen, steps


def reference_mask(roll, ring):
    """allowed (B, P+T, P+T) bool and absolute positions (B, P+T) of docs/method.md §2 for prompt + completion;
    ring: each row's (W_i, m_i)."""
    (B, P), T = roll.prompts.shape, roll.tokens.shape[1]
    allowed = torch.zeros(B, P + T, P + T, dtype=torch.bool)
    positions = torch.zeros(B, P + T, dtype=torch.long)
    for b, n in enumerate(roll.prompt_lens.tolist()):
        seen, pad = simulate_ring(T, *ring[b])[0], P - n
        allowed[b, :P, pad:P] = torch.ones(P, n, dtype=torch.bool).tril(-pad)  # prompt: causal over real tokens
        allowed[b, range(pad), range(pad)] = True  # pad queries see themselves only (finite, seen by nobody)
        allowed[b, P:, pad:P] = True  # thoughts see the whole prompt
        for t in range(T):
            allowed[b, P + t, [P + j for j in seen[t]]] = True
        positions[b, pad:] = torch.arange(n + T)
    return allowed, positions


def additive(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]  # (B, 1, S, S)


def gather_logprobs(logits, roll, temperature=1.0):
    """Log-probs of the completion tokens from logits over prompt + completion (B, P+T, V)."""
    P, T = roll.prompts.shape[1], roll.tokens.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:P + T - 1].float() / (temperature or 1.0), -1)
    return logp.gather(-1, roll.tokens[..., None])[..., 0]  # (B, T)


def hf_reference(hf, roll, ring, temperature=1.0):
    allowed, positions = reference_mask(roll, ring)
    with torch.no_grad():
        seq = torch.cat([roll.prompts, roll.tokens], 1)  # (B, P + T)
        logits = hf(seq, attention_mask=additive(allowed), position_ids=positions).logits
    return gather_logprobs(logits, roll, temperature)


def masked_diff(a, b, mask):
    return (a - b)[mask].abs().max().item()


# ---------------------------------------------------------------------------------------------------- window, pte

def test_window_with_room_equals_full(tiny):
    full, window = run(tiny, "full"), run(tiny, "window", budget=P + MAX_NEW + 5)
    assert (window.evictions == [[]] * 3 and torch.equal(full.tokens, window.tokens)
            and torch.equal(full.logprobs, window.logprobs))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("budget, evict", [(P + 8, 0.25), (P + 6, 0.5), (P + 3 + 4, 0.25)])
def test_window_equals_masked_reference(tiny, tiny_qwen, impl, budget, evict):
    """Prompts of 8, 5 and 3 tokens in one batch: each row keeps its own window (budget - its prompt; at P + 7 the
    longest prompt leaves 4 slots while the shortest leaves 8) and evicts on its own schedule."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen[0], attn_implementation=impl, dtype=torch.float32).eval()
    roll = run(tiny, "window", budget=budget, evict=evict, max_new=30)
    ring = rings(budget, evict)
    assert roll.evictions == [simulate_ring(30 - 1, *r)[1] for r in ring]  # the last token is never written
    assert roll.stats["windows"] == [w for w, _ in ring] and min(map(len, roll.evictions)) >= 3
    assert len({tuple(e) for e in roll.evictions}) == 3  # three different schedules
    assert masked_diff(roll.logprobs, hf_reference(hf, roll, ring), roll.mask) < 1e-5


def test_pte_with_zero_B_equals_window_and_random_B_differs(tiny):
    window = run(tiny, "window")
    pte = run(tiny, "pte", make_adapter(tiny.config, "pte", b_std=0))
    assert window.evictions[0] and torch.equal(window.tokens, pte.tokens) and torch.equal(window.logprobs, pte.logprobs)
    assert (run(tiny, "pte", make_adapter(tiny.config, "pte")).logprobs - window.logprobs).abs().max() > 1e-3


def test_evictions_feed_the_encoder(tiny):
    """pte and global-only (S never updated) with the same parameters agree in each row until its first eviction,
    not after: the eviction before token W_i changes row i's S for the forward of token W_i, which predicts W_i + 1."""
    pte = make_adapter(tiny.config, "pte")
    frozen = make_adapter(tiny.config, "global-only")
    frozen.load_state_dict(pte.state_dict())
    a, b = run(tiny, "pte", pte, temperature=0.0), run(tiny, "pte", frozen, temperature=0.0)
    for row, (window, _) in enumerate(rings(P + W)):
        assert a.evictions[row][0] == window and torch.equal(a.logprobs[row, :window + 1], b.logprobs[row, :window + 1])
        assert (a.logprobs[row, window + 1] - b.logprobs[row, window + 1]).abs() > 1e-6


def test_fold_is_the_spec_update(tiny):
    """One eviction into S, by hand for every layer and row (docs/method.md §3): S <- sqrt(r) X / ||X||_F with
    X = S + (q_g W_Q) (K W_K)^T (V W_V) / m, K the evicted keys before RoPE with the KV heads side by side.
    Row 0 evicts 3 tokens, row 1 only 2 (its third is padding, which must count for nothing, not even in m)."""
    cfg, adapter, (B, m) = tiny.config, make_adapter(tiny.config, "pte"), (2, 3)
    positions = torch.tensor([[5, 6, 7], [9, 10, 11]])  # (B, m)
    valid, counts = torch.tensor([[True, True, True], [True, True, False]]), [3, 2]
    raw_k = torch.randn(cfg.n_layers, B, cfg.n_kv_heads, m, cfg.head_dim, generator=gen())  # before RoPE
    values = torch.randn(raw_k.shape, generator=gen(1))
    keys = M.apply_rope(raw_k, *M.rope_cos_sin(tiny.inv_freq, positions, torch.float32))  # as the cache holds them
    cores = adapter.initial_cores(B)  # (L, B, r, r)
    with torch.no_grad():
        # each layer's (B, m, Hkv, D), the layout of tokens gathered from the cache
        folded, ratio = fold(adapter, cores, zip(keys.transpose(2, 3), values.transpose(2, 3)), positions, valid,
                             tiny.inv_freq)
    ratios = []
    for layer in range(cfg.n_layers):
        for row, m in enumerate(counts):
            K, V = (x[layer, row, :, :m].transpose(0, 1).reshape(m, -1) for x in (raw_k, values))  # (m, Hkv * D)
            new = (adapter.q_g[layer] @ adapter.W_Q[layer]) @ (K @ adapter.W_K[layer]).T @ (V @ adapter.W_V[layer]) / m
            X = cores[layer, row] + new.detach()
            torch.testing.assert_close(folded[layer, row], 4 ** 0.5 * X / X.norm(), atol=1e-5, rtol=1e-4)
            ratios.append(new.norm() / cores[layer, row].norm())
    assert ratio.item() == pytest.approx(sum(ratios).item() / len(ratios), rel=1e-4)


# ---------------------------------------------------------------------------------------------------- score

def early_stopping_eos(model, policy, adapter, temperature):
    """An id that some row samples, near mid-completion, and another row never does: as EOS it stops rows at
    different steps."""
    rows = run(model, policy, adapter, temperature=temperature).tokens.tolist()
    candidates = [(abs(i - MAX_NEW // 2), t) for row in rows for i, t in enumerate(row)
                  if any(t not in other for other in rows)]
    return min(candidates)[1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("policy", ["full", "window", "pte"])
def test_score_reproduces_generate(tiny, policy, temperature):
    adapter = make_adapter(tiny.config, "pte" if policy == "pte" else "lora")
    eos = early_stopping_eos(tiny, policy, adapter, temperature)
    roll = run(tiny, policy, adapter, temperature=temperature, eos_ids=[eos])
    lengths = roll.mask.sum(1)
    assert lengths.min() < lengths.max() == MAX_NEW and not roll.truncated[lengths.argmin()]
    assert (policy == "full") == (roll.evictions == [[]] * 3)
    with torch.no_grad():
        logp = score(tiny, roll, CachePolicy(policy, P + W), adapter, temperature)
    assert masked_diff(logp, roll.logprobs, roll.mask) <= 2e-5


@pytest.mark.parametrize("policy, mode", [("window", "lora"), ("pte", "pte")])
def test_score_gradients(tiny, policy, mode):
    adapter = make_adapter(tiny.config, mode)
    roll = run(tiny, policy, adapter)
    weights = torch.randn(roll.tokens.shape, generator=gen(1))

    def grads(logp):
        adapter.zero_grad(set_to_none=True)
        (logp * roll.mask * weights).sum().backward()
        return {name: p.grad.clone() for name, p in adapter.named_parameters()}

    pol = CachePolicy(policy, P + W)
    checkpointed = grads(score(tiny, roll, pol, adapter, 1.0))
    references = [grads(score(tiny, roll, pol, adapter, 1.0, use_checkpoint=False))]
    assert all(p.grad is None for p in tiny.parameters())
    if policy == "window":  # one masked forward of the whole sequence: the gradients are exact through the cache
        allowed, positions = reference_mask(roll, rings(P + W))
        seq = torch.cat([roll.prompts, roll.tokens], 1)
        references.append(grads(gather_logprobs(tiny(seq, positions, MaskedForward(additive(allowed)), adapter), roll)))
    expected = {"A", "B"} | ({"q_g", "W_Q", "W_K", "W_V", "k_g", "v_g"} if mode == "pte" else set())
    assert {name.split(".")[0] for name in checkpointed} == expected
    for name, g in checkpointed.items():
        assert all(torch.allclose(g, ref[name], rtol=1e-4, atol=1e-7) for ref in references), name
        per_layer = g.flatten(1) if g.dim() == 3 else g.flatten()[None]  # encoder tensors are (L, ...): every layer
        assert (per_layer.abs().sum(1) > 0).all(), f"{name} gets no gradient"


@pytest.mark.parametrize("policy, mode", [("full", "lora"), ("window", "lora"), ("pte", "pte")])
def test_bf16_model_with_fp32_adapter(tiny, tiny_qwen, policy, mode):
    """A GPU run's dtypes on the CPU: the base model in bf16, the adapter and its gradients in fp32. generate and score
    run under every policy, and score's values and gradients on a bf16 rollout are those of the fp32 model to bf16's
    precision (a path cast to bf16 and back, or cut, would show in the gradients' direction)."""
    half = M.load(tiny_qwen[0], dtype=torch.bfloat16)
    adapter = make_adapter(tiny.config, mode)
    roll = run(half, policy, adapter)
    assert roll.logprobs.dtype == torch.float32 and bool(roll.mask.any())
    weights = torch.randn(roll.tokens.shape, generator=gen(1))
    values, grads = {}, {}
    for name, net in (("bf16", half), ("fp32", tiny)):
        adapter.zero_grad(set_to_none=True)
        logp = score(net, roll, CachePolicy(policy, P + W), adapter, 1.0)  # (B, T)
        (logp * roll.mask * weights).sum().backward()
        values[name], grads[name] = logp.detach(), {n: q.grad for n, q in adapter.named_parameters()}
    assert values["bf16"].dtype == torch.float32
    assert masked_diff(values["bf16"], values["fp32"], roll.mask) < 0.02  # measured: 0.003-0.005
    assert masked_diff(values["bf16"], roll.logprobs, roll.mask) < 0.02  # score reproduces generate in bf16 too
    for name, g in grads["bf16"].items():
        ref = grads["fp32"][name]
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert F.cosine_similarity(g.flatten(), ref.flatten(), 0) > 0.999, name  # measured: 0.9996 at least


class DetachOutside(MaskedForward):
    """MaskedForward whose keys and values outside one piece of the sequence are constants: truncated backprop by
    hand."""

    def __init__(self, mask, inside):
        super().__init__(mask)
        self.inside = inside[:, None]  # (S, 1): broadcasts over (B, Hkv, S, D)

    def update(self, layer, k, v):
        return torch.where(self.inside, k, k.detach()), torch.where(self.inside, v, v.detach())


def test_truncated_gradients_equal_pieces_by_hand(tiny):
    """score(truncate=True) returns the same values; its gradient is the sum over pieces (the prompt, then the
    segments cut at every row's evictions and runs cut into chunks of the smallest m) of each piece's own gradient
    with every other token's keys and values held constant, computed here on one masked forward; and it differs
    from the exact gradient."""
    adapter = make_adapter(tiny.config, "lora")
    roll, pol = run(tiny, "window", adapter), CachePolicy("window", P + W)
    weights = torch.randn(roll.tokens.shape, generator=gen(1))

    def grads(logp, t0=0, t1=None):
        adapter.zero_grad(set_to_none=True)
        (logp * roll.mask * weights)[:, t0:t1].sum().backward()
        return {name: p.grad.clone() for name, p in adapter.named_parameters()}

    exact, truncated = score(tiny, roll, pol, adapter, 1.0), score(tiny, roll, pol, adapter, 1.0, truncate=True)
    assert torch.equal(exact, truncated) and truncated.requires_grad
    exact, truncated = grads(exact), grads(truncated)
    T, ring = roll.tokens.shape[1], rings(P + W)
    bounds = sorted({0, T - 1, *(t for w, m in ring for t in eviction_steps(T - 1, w, m, "window"))})
    chunk = min(m for _, m in ring)
    bounds = sorted({c for a, b in zip(bounds, bounds[1:]) for c in range(a, b, chunk)} | {T - 1})
    pieces = [(0, P, 0, 1)] + [(P + a, P + b, a + 1, b + 1) for a, b in zip(bounds, bounds[1:])]  # inputs, targets
    allowed, positions = reference_mask(roll, ring)
    seq, by_hand = torch.cat([roll.prompts, roll.tokens], 1), {}
    for s0, s1, t0, t1 in pieces:
        inside = torch.zeros(P + T, dtype=torch.bool)
        inside[s0:s1] = True
        logits = tiny(seq, positions, DetachOutside(additive(allowed), inside), adapter)
        for name, g in grads(gather_logprobs(logits, roll), t0, t1).items():
            by_hand[name] = by_hand.get(name, 0) + g
    for name, g in truncated.items():
        assert torch.allclose(g, by_hand[name], rtol=1e-4, atol=1e-7), name
    assert not all(torch.allclose(g, exact[name], rtol=1e-3) for name, g in truncated.items())


def test_truncated_pte_reaches_every_parameter(tiny):
    """Under pte, truncation still trains every encoder tensor in every layer (S(0)'s global tokens included), and
    a loss on the first completion token alone (the prompt piece) has the exact gradient."""
    adapter = make_adapter(tiny.config, "pte")
    roll, pol = run(tiny, "pte", adapter), CachePolicy("pte", P + W)
    for t1 in (None, 1):
        g = {}
        for truncate in (False, True):
            adapter.zero_grad(set_to_none=True)
            (score(tiny, roll, pol, adapter, 1.0, truncate=truncate) * roll.mask)[:, :t1].sum().backward()
            g[truncate] = {name: p.grad.clone() for name, p in adapter.named_parameters() if p.grad is not None}
        if t1 is None:
            assert len(g[True]) == len(list(adapter.parameters()))
            assert all((x.flatten(1) if x.dim() == 3 else x.flatten()[None]).abs().sum(1).gt(0).all()
                       for x in g[True].values())
        else:
            assert g[True].keys() == g[False].keys() and all(torch.allclose(g[True][n], g[False][n]) for n in g[True])


def test_score_attends_over_each_rows_own_context(tiny, monkeypatch):
    """score's replay gives each row its own prompt and window: with prompts of 3 and 300 tokens at budget 320, no
    segment's keys exceed the budget plus the segment's own (not the longest prompt plus the union of the windows),
    and it still reproduces generate."""
    import cache
    widths, init = [], cache.ReplayCache.__init__

    def spy(self, past_k, past_v, index, key_pos, query_pos, dtype):
        widths.append((key_pos.shape[1], query_pos.shape[1], index is None))
        init(self, past_k, past_v, index, key_pos, query_pos, dtype)
    monkeypatch.setattr(cache.ReplayCache, "__init__", spy)
    prompts, adapter = [[5, 6, 7], [(11 * i) % 97 for i in range(300)]], make_adapter(tiny.config, "pte")
    roll = generate(tiny, prompts, CachePolicy("pte", 320), Sampling(60, 1.0, eos_ids=[], pad_id=0), adapter, gen())
    assert roll.evictions[1][:2] == [20, 25] and roll.evictions[0] == []
    with torch.no_grad():
        logp = score(tiny, roll, CachePolicy("pte", 320), adapter, 1.0)
    assert masked_diff(logp, roll.logprobs, roll.mask) <= 2e-5
    segments = [(keys, n) for keys, n, prefill in widths if not prefill]
    assert len(segments) > 10 and all(keys - n <= 320 for keys, n in segments), segments
    # row 1 (W = 20, m = 5) holds its prompt and 15 thought tokens when a segment starts; the union would add row
    # 0's whole completion to it
    assert max(keys - n for keys, n in segments) == 300 + 15


def test_full_ignores_budget(tiny):
    roll = run(tiny, "full", budget=P)  # full keeps everything: the budget only sets its checkpoint chunk size
    with torch.no_grad():
        assert masked_diff(score(tiny, roll, CachePolicy("full", P), None, 1.0), roll.logprobs, roll.mask) <= 2e-5


# ---------------------------------------------------------------------------------------------------- cache

def test_memory_is_the_budget(tiny, monkeypatch):
    """Every row holds exactly `budget` slots, its prompt and its own ring, whatever the other rows' prompts are:
    prompts of 3 and 300 tokens at budget 320 allocate 2 x 320 slots a layer (not the longest prompt + the widest
    window, 300 + 317), at 40 new tokens as at 400; `full` holds what it must, the longest prompt + max_new."""
    assert thought_slots("window", P + W, P, 100) == thought_slots("pte", P + W, P, 10_000) == W
    assert (thought_slots("full", P + W, P, 100), thought_slots("full", P + W, P, 10_000)) == (100, 10_000)
    allocate, caches = RingCache.allocate, []
    monkeypatch.setattr(RingCache, "allocate", lambda *a: caches.append(allocate(*a)) or caches[-1])
    prompts, cfg = [[5, 6, 7], [(11 * i) % 97 for i in range(300)]], tiny.config
    adapter = make_adapter(cfg, "pte")
    for policy, max_new, slots in (("window", 40, 320), ("window", 400, 320), ("pte", 40, 320), ("full", 40, 340)):
        roll = generate(tiny, prompts, CachePolicy(policy, 320), Sampling(max_new, eos_ids=[], pad_id=0),
                        adapter if policy == "pte" else None)
        assert roll.stats["steps"] == max_new and roll.stats["cache_slots"] == slots, policy
        assert caches[-1].k.shape == caches[-1].v.shape == (cfg.n_layers, 2, cfg.n_kv_heads, slots, cfg.head_dim)
        assert roll.evictions[1] == ([] if policy == "full" else list(range(20, max_new - 1, 5)))  # W 20, m 5


def test_eviction_schedule():
    assert evict_count(25, 0.28) == 7  # 0.28 * 25 = 7.000000000000001 in floats: a bare ceil gives 8
    assert evict_count(30, 0.1) == 3
    assert [evict_count(8, 0.25), evict_count(10, 0.25), evict_count(3, 0.1), evict_count(5, 1.0)] == [2, 3, 1, 5]
    assert eviction_steps(23, 8, 2, "window") == [8, 10, 12, 14, 16, 18, 20, 22] == simulate_ring(23, 8, 2)[1]
    assert eviction_steps(23, 8, 2, "full") == []
    with pytest.raises(ValueError, match=r"--evict must be in \(0, 1\]"):
        evict_count(8, 0)


def test_budget_too_small(tiny):
    with pytest.raises(ValueError,
                       match="cache budget 10 leaves 2 thought slots after a 8-token prompt; need at least 4"):
        run(tiny, "window", budget=10)
    assert thought_slots("window", 12, 8, 100) == 4


# ---------------------------------------------------------------------------------------------------- rows and the host

@pytest.mark.parametrize("policy", ["full", "window", "pte"])
def test_a_row_decodes_alone_as_in_any_batch(tiny, policy):
    """Greedy tokens of each row are the same alone and inside the mixed batch (prompts of 8, 5 and 3 tokens, each
    row on its own schedule), and with the prefill split into forwards of 1 or 2 rows: what lets a caller split
    a step's rows over several calls."""
    adapter = make_adapter(tiny.config, "pte" if policy == "pte" else "lora")
    kw = dict(temperature=0.0, max_new=30)
    batch = run(tiny, policy, adapter, **kw)
    assert (policy == "full") == (batch.evictions == [[]] * 3)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(tiny, [prompt], CachePolicy(policy, P + W), Sampling(30, eos_ids=[], pad_id=0), adapter)
        assert torch.equal(alone.tokens[0], batch.tokens[row]) and alone.evictions[0] == batch.evictions[row]
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[row], rtol=0, atol=1e-5)
    for chunk in (1, 2):
        chunked = run(tiny, policy, adapter, prefill_rows=chunk, **kw)
        assert torch.equal(chunked.tokens, batch.tokens) and torch.equal(chunked.mask, batch.mask)
        torch.testing.assert_close(chunked.logprobs, batch.logprobs, rtol=0, atol=1e-5)


def test_stopped_rows_stay_pad_until_the_batch_stops(tiny):
    """Whether every row has stopped is read every DONE_EVERY steps: a row that stopped decodes pads, masked, until
    the next read, and the completion is trimmed to the last step any row ran. Each row stops here on an EOS among
    its first 5 tokens (the fifth tokens of a run without EOS, the same draws), well before a read."""
    free = run(tiny, "window")
    eos = sorted({int(row[4]) for row in free.tokens})
    roll = run(tiny, "window", eos_ids=eos)
    lengths = roll.mask.sum(1)
    assert not roll.truncated.any() and roll.tokens.shape[1] == lengths.max() <= 5 < rollout.DONE_EVERY
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(roll.tokens[row, :n], free.tokens[row, :n]) and int(roll.tokens[row, n - 1]) in eos
        assert roll.mask[row, :n].all() and not roll.mask[row, n:].any() and (roll.tokens[row, n:] == 0).all()


class OpLog(TorchDispatchMode):
    """Every aten op run within, by name and with the shapes of its tensor inputs and output: a stand-in on the
    CPU for the kernels a GPU would launch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(x.shape) for x in (*args, *(kwargs or {}).values(), out) if isinstance(x, torch.Tensor)]
        self.ops.append((func.__name__.split(".")[0], shapes))
        return out

    def names(self):
        return [name for name, _ in self.ops]


SYNCS = {"_local_scalar_dense", "nonzero", "item"}  # a value read on the host: .item(), bool(), a boolean mask
# Pinned on torch 2.13 (CPU) for the tiny 2-layer model: a change there means more work per event or per step (or
# per layer), or work that depends on the rows. Other torch releases decompose some ops otherwise (torch 2.6: 27 and
# 201 ops an event, 283 a window step): there only the rest of the test holds.
EVENT_OPS = {"window": 25, "pte": 184}
STEP_OPS = {"window": 244, "pte": 382}


def pinned(ops, count):
    return len(ops) == count or not torch.__version__.startswith("2.13.")


@pytest.mark.parametrize("policy", ["window", "pte"])
def test_eviction_event_and_decode_step_op_counts(tiny, policy):
    """One eviction event costs the same operations whether 1 row or all 3 evict (per-row schedules: prompts of
    8, 5 and 3 tokens, budget 16, only row 0 evicts before thought 8; prompts all of 8: all three do), reads
    nothing on the host, and is pinned; so is one decode step (sample, record, stop, next logits)."""
    cfg, adapter = tiny.config, make_adapter(tiny.config, "pte") if policy == "pte" else None
    encoder = adapter if policy == "pte" else None

    def event(lens):
        sched = Schedule.of(policy, P + W, 0.25, lens, 30)
        cache = RingCache.allocate(cfg, lens, sched.windows, sched.counts, torch.float32, "cpu")
        cache.k.normal_(generator=gen()), cache.v.normal_(generator=gen(1))
        cores = adapter.initial_cores(3) if adapter is not None else None
        with OpLog() as log, torch.no_grad():
            out = rollout.evict_and_fold(tiny, encoder, cache, cores, 8, sched.events(30)[8], [])
        return log.names(), sched.events(30)[8], out
    (one, shape_one, _), (three, shape_three, folded) = event([8, 5, 3]), event([8, 8, 8])
    assert (shape_one, shape_three) == ((1, 2), (3, 2)) and one == three and not SYNCS & set(one)
    assert pinned(one, EVENT_OPS[policy]), f"torch {torch.__version__}: {len(one)} ops: {one}"
    if policy == "pte":
        assert (folded - adapter.initial_cores(3)).abs().amax((0, 2, 3)).gt(0).all()  # all three rows folded

    sched = Schedule.of(policy, P + W, 0.25, [8, 5, 3], 30)
    cache = RingCache.allocate(cfg, [8, 5, 3], sched.windows, sched.counts, torch.float32, "cpu")
    out, eos = rollout.Transcript.empty(3, 30, 0, "cpu"), torch.tensor([5])
    with torch.no_grad(), OpLog() as log:
        cores = adapter.initial_cores(3) if adapter is not None else None
        logits = rollout.prefill(tiny, adapter, cores, cache, PROMPTS, 0, 1.0)
        first = len(log.ops)
        token = rollout.record(out, 0, *sample(logits, 1.0, gen()))
        rollout.stop(out, 0, token, eos, 30)
        rollout.next_logits(tiny, adapter, cache, cores, 0, token, 1.0)
    step = log.names()[first:]
    assert not SYNCS & set(step) and pinned(step, STEP_OPS[policy]), f"torch {torch.__version__}: {len(step)}: {step}"


def test_sample_passes_over_the_vocabulary():
    """At top-p 1, sampling reads the (B, V) logits in three passes (softmax, the division by the noise, the argmax)
    beside the fill of the noise, and gathers one entry a row; greedy in two (log-softmax, argmax) and a gather.
    Allocations and views, which read nothing, aside."""
    logits = torch.randn(4, 97, generator=gen())

    def touching(**kw):
        with OpLog() as log:
            sample(logits, generator=gen(), **kw)
        return [name for name, shapes in log.ops if (4, 97) in shapes and name not in ("slice", "select", "empty_like")]
    assert touching() == ["_softmax", "exponential_", "div", "argmax", "gather"]
    assert touching(greedy=True) == ["_log_softmax", "argmax", "gather"]


# ---------------------------------------------------------------------------------------------------- real SmolLM2

@pytest.mark.slow
def test_smollm2_window_equals_masked_reference(smol):
    from transformers import AutoModelForCausalLM
    folder, ours, tok = smol
    prompt = chatml(tok, "Write a short paragraph about the history of Paris.")
    roll = generate(ours, [prompt], CachePolicy("window", len(prompt) + 32), Sampling(80, eos_ids=[]))
    assert len(roll.evictions[0]) >= 5
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert masked_diff(roll.logprobs, hf_reference(hf, roll, [(32, 8)]), roll.mask) < 1e-4


@pytest.mark.slow
def test_smollm2_answers_under_window(smol, capsys):
    _, ours, tok = smol
    prompt = chatml(tok, "What is the capital of France?")
    out = generate(ours, [prompt], CachePolicy("window", len(prompt) + 64), Sampling(32))
    assert "Paris" in tok.decode(out.tokens[0][out.mask[0]].tolist())
    prompt = chatml(tok, "Write a short paragraph about the history of Paris.")
    out = generate(ours, [prompt], CachePolicy("window", len(prompt) + 24), Sampling(80))
    tokens = out.tokens[0][out.mask[0]].tolist()
    with capsys.disabled():
        print(f"\n[window, budget prompt + 24, {len(out.evictions[0])} evictions] {tok.decode(tokens)!r}")
    assert len(out.evictions[0]) >= 3 and len(set(tokens[-40:])) >= 15


# ---------------------------------------------------------------------------------------------------- the method pinned

def test_adapter_delta_is_B_S_A_x_by_hand(tiny):
    """y += (alpha / r) B S A x per token with the row's own S (not S^T: S is not symmetric here)."""
    adapter = make_adapter(tiny.config, "pte")
    x = torch.randn(2, 3, tiny.config.dim, generator=gen())  # (B, T, d)
    core = torch.randn(2, 4, 4, generator=gen(1))  # (B, r, r)
    assert (core - core.transpose(1, 2)).abs().max() > 0.1
    A, B = adapter.A["v1"], adapter.B["v1"]
    with torch.no_grad():
        got = adapter.delta(1, "v", x, core)
    for row in range(2):
        for t in range(3):
            by_hand = adapter.scale * B @ (core[row] @ (A @ x[row, t]))
            torch.testing.assert_close(got[row, t], by_hand, atol=1e-6, rtol=1e-5)


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    """p = (0.5, 0.3, 0.2), top-p 0.6: 0.5 alone falls short, so the nucleus is {0, 1}, drawn 5:3; the recorded
    log-prob is under the full softmax (log 0.3 for token 1), not the truncated one. At top-p 1: drawn 5:3:2."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4000, 3)
    token, logp = sample(logits, 0.6, gen())
    counts = torch.bincount(token, minlength=3)
    assert counts[2] == 0 and counts[1] > 0
    assert counts[0] / 4000 == pytest.approx(0.625, abs=0.03)
    torch.testing.assert_close(logp[token == 1], torch.full_like(logp[token == 1], 0.3).log())
    token, logp = sample(logits, 1.0, gen())
    assert (torch.bincount(token, minlength=3) / 4000).tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.3, 0.2]).log()[token])
    assert torch.equal(token, sample(logits, 1.0, gen())[0])  # the generator makes it reproducible


def test_sample_is_multinomials_draw_and_never_draws_a_token_without_mass():
    """The same tokens as torch.multinomial from the same generator (its one-sample draw, which seeded runs made
    before); a token whose probability underflows to 0 is never drawn."""
    probs = torch.softmax(torch.randn(64, 97, generator=gen(2)), -1)
    assert torch.equal(sample(probs.log(), 1.0, gen())[0], torch.multinomial(probs, 1, generator=gen())[:, 0])
    token, logp = sample(torch.tensor([[-1e4, 0.0, 0.0], [-1e4, -1e4, 0.0]]).repeat(2000, 1), 1.0, gen())
    assert (token[0::2] != 0).all() and 0.45 < (token[0::2] == 1).float().mean() < 0.55 and (token[1::2] == 2).all()
    assert torch.isfinite(logp).all()


def test_truncate_feeds_the_encoder_from_every_target(tiny):
    """Under --truncate, every target's loss reaches the encoder (q_g, W_Q, W_K, W_V), as it does in exact mode,
    also when W % m != 0 and when a segment is cut by another row's eviction: budget 19 gives row 0 W = 11, m = 3 and
    row 1 (3 prompt tokens) W = 16, m = 4. A grid of chunks that is not aligned to each row's evictions makes the
    targets of a piece that does not open with that row's eviction see S as a constant."""
    adapter = make_adapter(tiny.config, "pte")
    prompts = [PROMPTS[0], PROMPTS[2]]
    roll = generate(tiny, prompts, CachePolicy("pte", 19), Sampling(24, 1.0, eos_ids=[], pad_id=0), adapter, gen())
    assert roll.evictions == [[11, 14, 17, 20], [16, 20]]
    for row, first in enumerate((11, 16)):
        for t in range(first + 1, 24):  # targets after the row's first eviction (S(0) is recomputed in every piece)
            adapter.zero_grad(set_to_none=True)
            score(tiny, roll, CachePolicy("pte", 19), adapter, 1.0, truncate=True)[row, t].backward()
            assert all(p.grad.abs().sum() > 0 for p in (adapter.q_g, adapter.W_Q, adapter.W_K, adapter.W_V)), (row, t)


def test_score_gradients_equal_finite_differences(tiny_qwen):
    """The gradient of score (exact mode, checkpointed) with respect to every encoder tensor equals central finite
    differences in fp64: it fails if the chain of S, the keys' path into S or S(0)'s global tokens is detached."""
    model = M.load(tiny_qwen[0], dtype=torch.float64)
    adapter = make_adapter(model.config, "pte").double()
    roll = generate(model, PROMPTS, CachePolicy("pte", P + W), Sampling(MAX_NEW, 1.0, eos_ids=[], pad_id=0), adapter,
                    gen())
    weights = torch.randn(roll.tokens.shape, generator=gen(1), dtype=torch.float64)
    loss = lambda: (score(model, roll, CachePolicy("pte", P + W), adapter, 1.0) * weights).sum()  # noqa: E731
    names = ["q_g", "W_Q", "W_K", "W_V", "k_g", "v_g"]
    grads = torch.autograd.grad(loss(), [getattr(adapter, n) for n in names])
    picks = torch.Generator().manual_seed(2)
    for name, g in zip(names, grads):
        p = getattr(adapter, name)
        for _ in range(2):
            i = tuple(int(torch.randint(0, n, (1,), generator=picks)) for n in p.shape)
            with torch.no_grad():  # a step of 1e-5: rounding (the loss is about 30) and curvature both stay below 1e-5
                p[i] += 1e-5
                up = loss()
                p[i] -= 2e-5
                down = loss()
                p[i] += 1e-5
            assert g[i].item() == pytest.approx(((up - down) / 2e-5).item(), rel=1e-5, abs=1e-10), (name, i)
        assert g.abs().sum() > 0, name


def test_layer_forwards_per_score_and_backward(tiny):
    """The cost the docstring states: each layer runs 3 forwards per piece (prompt and every segment) in one
    score + backward (forward, segment recompute, layer recompute)."""
    adapter = make_adapter(tiny.config, "pte")
    roll = run(tiny, "pte", adapter)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in tiny.layers]
    try:
        score(tiny, roll, CachePolicy("pte", P + W), adapter, 1.0).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    T, ring = MAX_NEW - 1, rings(P + W)
    bounds = sorted({0, T, *(t for w, m in ring for t in eviction_steps(T, w, m, "pte"))})
    pieces = 1 + len({c for a, b in zip(bounds, bounds[1:]) for c in range(a, b, min(m for _, m in ring))})
    assert len(calls) == 3 * tiny.config.n_layers * pieces
