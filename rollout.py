"""Rollouts under a cache policy (`generate`) and their training forward (`score`), SPEC section 4.

`generate` prefills left-padded prompts and decodes all rows in lockstep into a preallocated RingCache,
evicting on the fixed schedule of cache.py; under `pte` every eviction folds the evicted keys and values
into the adapter's cores S. No autograd. It records the log-probability of each sampled token under
softmax(logits / temperature) (top-p truncation is not renormalised into it, as in TRL and verl), so that
`score` can reproduce it exactly.

`score` replays prompt and completion under the same policy, one segment at a time: the prompt, then the
runs of tokens between evictions (the first W long, then m each; `full` in chunks of m). paper: a segment is a run
between evictions; here: runs longer than m are cut into chunks of m, which changes no value (nothing is evicted
inside) but keeps the activation peak at m tokens instead of W (it was 2.3x full's on an H100). Each segment is
one forward of its tokens against the kept context (prompt + window) with its own S, under
torch.utils.checkpoint: what stays in memory between segments is each segment's new keys and values, S and
the log-probs; backward recomputes one segment at a time, and within it one layer at a time (layers are
checkpointed too, so a segment's activations are one layer's, not L layers'). Gradients are exact through the
cache and the whole chain of S updates. lm_head, log-softmax and gather run in checkpointed chunks of LOGIT_CHUNK positions,
so the (B, n, V) logits never exist for more than 64 positions at once. `truncate=True` (an option; PAPER.md
Q7) instead back-propagates each piece at once against constant cache and S: memory fixed by the budget.
On the CPU in fp32, `generate` holds a second, blocked copy of the weights while it decodes (model.packed_weights):
faster decoding (bench.py, table 1) for the memory of the weights once more.
"""
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cache import MIN_THOUGHT_SLOTS, ReplayCache, RingCache, evict_count, eviction_steps, thought_slots, unrotate
from model import dense, packed_weights

POLICIES = ("full", "window", "pte")
LOGIT_CHUNK = 64  # positions per checkpointed lm_head + log-softmax in score: (B, 64, V) logits at most


@dataclass
class CachePolicy:
    policy: str = "pte"
    budget: int = 1024  # prompt + thought slots (`full` ignores it except for its chunk size)
    evict: float = 0.25

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy {self.policy!r}: choose one of {', '.join(POLICIES)}")


@dataclass
class Rollout:
    prompts: torch.Tensor  # (B, P) left-padded
    prompt_lens: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T) completions, pad after a row stopped
    logprobs: torch.Tensor  # (B, T) fp32, log softmax(logits / temperature) of each sampled token
    mask: torch.Tensor  # (B, T) bool, the completion's tokens (its EOS included)
    truncated: torch.Tensor  # (B,) bool, stopped by the token limit, not by EOS
    evictions: list  # thought indices t before whose write m tokens were evicted
    stats: dict = field(default_factory=dict)


def pad_prompts(prompts, pad_id, device):
    """Token lists -> left-padded (B, P) tokens, lengths (B,), positions (B, P) with -1 at pads."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(map(len, prompts))
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    positions = torch.arange(P, device=device) - (P - lens)[:, None]  # (B, P)
    return tokens, lens, positions.masked_fill(positions < 0, -1)


def _flat(x):
    """(L, B, Hkv, m, D) -> (L, B, m, Hkv * D): all KV heads of a token concatenated, as the encoder reads them."""
    L, B, H, m, D = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(L, B, m, H * D)


def _tokens_from(pieces, skip):
    """Views of consecutive (L, B, Hkv, n_i, D) pieces without their first `skip` tokens (no copy)."""
    out = []
    for p in pieces:
        if skip < p.shape[3]:
            out.append(p[:, :, :, skip:])
        skip = max(skip - p.shape[3], 0)
    return out


def fold(adapter, cores, evicted, pos, inv_freq):
    """S <- Normalize(S + S'(K_e, V_e)) a layer at a time (all layers' copies at once: L times the memory).
    evicted: each layer's keys (after RoPE at positions pos (B, m)) and values, (B, Hkv, m, D)."""
    out = [adapter.update_cores(cores[i:i + 1], _flat(unrotate(k, pos, inv_freq)[None]), _flat(v[None]), slice(i, i + 1))
           for i, (k, v) in enumerate(evicted)]
    return torch.cat([c for c, _ in out]), sum(r for _, r in out) / len(out)  # (L, B, r, r), ()


def _check(policy, adapter):
    if policy.policy == "pte" and (adapter is None or not adapter.encodes):
        raise ValueError("policy pte needs an adapter with a thought encoder (mode pte, global-0 or global-only)")


def sample(logits, temperature, top_p, generator):
    """logits (B, V) -> token (B,), its log-prob (B,) under softmax(logits / temperature); greedy at temperature 0."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # (B, V)
    if temperature == 0:
        token = logp.argmax(-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0))
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompts, policy: CachePolicy, max_new, adapter=None, temperature=0.0, top_p=1.0,
             eos_ids=None, pad_id=None, generator=None):
    """Sample completions of token-list prompts under the cache policy. See Rollout for what comes back."""
    _check(policy, adapter)
    cfg, device, dtype = model.config, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    eos = torch.tensor(list(eos_ids if eos_ids is not None else cfg.eos_ids) or [-1], device=device)
    pad_id = pad_id if pad_id is not None else max(int(eos[0]), 0)
    prompt, lens, positions = pad_prompts(prompts, pad_id, device)
    B, P = prompt.shape
    W = thought_slots(policy.policy, policy.budget, P, max_new)
    m = evict_count(W, policy.evict)
    cache = RingCache.allocate(cfg, B, P, W, dtype, device)
    with packed_weights(model):  # CPU fp32: a second, blocked copy of the weights while decoding (1.9x: bench.py)
        cores = adapter.initial_cores(B) if adapter is not None else None
        t0 = time.perf_counter()
        cache.write_prompt(positions)
        logits = dense(model.hidden(prompt, positions.clamp(min=0), cache, adapter, cores)[:, -1], model.lm_head)  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # outputs written in place: per-step survivors would pin the heap under the growing attention temporaries
        tokens = torch.full((B, max_new), pad_id, device=device)  # (B, T)
        logprobs, masks = torch.zeros(B, max_new, device=device), torch.zeros(B, max_new, dtype=torch.bool, device=device)
        evictions, ratios, evicted, steps = [], [], 0, 0
        for t in range(max_new):
            token, logp = sample(logits, temperature, top_p, generator)
            token = token.masked_fill(done, pad_id)
            tokens[:, t], logprobs[:, t], masks[:, t], steps = token, logp, ~done, t + 1
            done = done | torch.isin(token, eos)
            if t == max_new - 1 or bool(done.all()):
                break
            if policy.policy != "full" and t - evicted == W:  # ring full: evict the oldest m before writing token t
                slots, pos = cache.evict(evicted, m)
                evicted, _ = evicted + m, evictions.append(t)
                if policy.policy == "pte":  # fold them into S
                    cores, ratio = fold(adapter, cores, ((k[:, :, slots], v[:, :, slots]) for k, v in zip(cache.k, cache.v)),
                                        pos, model.inv_freq)
                    ratios.append(ratio.item())
            cache.write_thought(t, lens + t)
            logits = dense(model.hidden(token[:, None], (lens + t)[:, None], cache, adapter, cores)[:, -1], model.lm_head)
    seconds = time.perf_counter() - t0
    tokens, logprobs, mask = tokens[:, :steps], logprobs[:, :steps], masks[:, :steps]
    stats = dict(seconds=seconds, tokens=int(mask.sum()), tokens_per_s=int(mask.sum()) / seconds, steps=steps,
                 cache_slots=P + W, cache_slots_used=cache.used, evictions=len(evictions),
                 s_update_ratio=sum(ratios) / len(ratios) if ratios else None)
    return Rollout(prompt, lens, tokens, logprobs, mask, ~done, evictions, stats)


def token_logprobs(temperature):
    """The default per-token value of `score`: log softmax(logits / T) of the target token."""
    def fn(logits, targets, span):
        return torch.log_softmax(logits.float() / (temperature or 1.0), -1).gather(-1, targets[..., None])[..., 0]
    return fn


class _Truncated(torch.autograd.Function):
    """values = replay() without a graph; backward replays once more, each piece back-propagating its share of
    the incoming gradient at once (replay(grad)), so that no graph ever spans two pieces."""

    @staticmethod
    def forward(ctx, replay, anchor):
        ctx.replay = replay
        return replay()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ctx.replay(grad)
        return None, None


def score(model, rollout: Rollout, policy: CachePolicy, adapter=None, temperature=0.0, use_checkpoint=True, token_fn=None,
          truncate=False):
    """Replay the rollout under its policy, segment by segment; returns (B, T) log-probs of its tokens (with
    autograd when enabled), or token_fn(logits (B, n, V), targets (B, n), span) -> (B, n) for each segment.
    truncate: truncated backprop (PAPER Q7, an option): each piece sees the cache and S of the pieces before it
    as constants and back-propagates as soon as its gradient is known, so training memory is fixed by the budget
    like generate's, not by the rollout length; the gradient drops the paths through the cache and the chain of S."""
    _check(policy, adapter)
    token_fn = token_fn or token_logprobs(temperature)
    prompt, lens, tokens = rollout.prompts, rollout.prompt_lens, rollout.tokens
    (B, P), T, dtype = prompt.shape, tokens.shape[1], model.embed_tokens.weight.dtype
    positions = torch.arange(P, device=prompt.device) - (P - lens)[:, None]
    positions = positions.masked_fill(positions < 0, -1)  # (B, P)
    W = thought_slots(policy.policy, policy.budget, P, T)
    # `full` never evicts: it is cut into chunks of the m a window of this budget would evict (at least 1)
    m = evict_count(max(policy.budget - P, MIN_THOUGHT_SLOTS) if policy.policy == "full" else W, policy.evict)
    fed = T - 1  # the last token is scored but never fed
    steps = eviction_steps(fed, W, m, policy.policy)
    if policy.policy != "full" and steps != [t for t in rollout.evictions if t < fed]:
        raise ValueError("the rollout's evictions do not match this policy's schedule: score it with the policy that generated it")
    # segments end at evictions and are cut into chunks of at most m tokens: nothing is evicted inside a segment,
    # so the cut changes no value, and the activation peak is set by m, not by W (the first run between evictions)
    bounds = sorted({0, fed, *steps, *range(0, fed, m)})
    run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if use_checkpoint else (lambda f, *a: f(*a))

    def forward(inputs, q_pos, key_pos, past_k, past_v, cores, last_only, span):
        """past_k, past_v: lists of (L, B, Hkv, n_i, D) pieces of the context, in order."""
        cache = ReplayCache(past_k, past_v, key_pos, q_pos, dtype)
        h = model.hidden(inputs, q_pos.clamp(min=0), cache, adapter, cores, checkpoint_layers=use_checkpoint)  # (B, n, d)
        h = h[:, -1:] if last_only else h  # the prompt only predicts the first completion token
        new_k, new_v = torch.stack(cache.new_k), torch.stack(cache.new_v)  # (L, B, Hkv, n, D)
        cache.new_k, cache.new_v = [None] * len(cache.new_k), [None] * len(cache.new_v)  # the stack is the one copy kept
        return new_k, new_v, torch.cat([
            run(token_values, h[:, i:i + LOGIT_CHUNK], span[0] + i) for i in range(0, h.shape[1], LOGIT_CHUNK)], 1)

    def token_values(h, a):  # (B, n, d) -> (B, n): the (B, n, V) logits of at most LOGIT_CHUNK positions at a time
        return token_fn(model.lm_head(h), tokens[:, a:a + h.shape[1]], (a, a + h.shape[1]))

    def prefill(cores):
        empty = model.embed_tokens.weight.new_empty(model.config.n_layers, B, model.config.n_kv_heads, 0, model.config.head_dim)
        return forward(prompt, positions, positions, [empty], [empty], cores, True, (0, 1))

    def segment(a, b, lo_prev, lo, first, cores, prompt_k, prompt_v, *thought):
        """Fed tokens [a, b); the window holds thought tokens [lo, a) after evicting [lo_prev, lo). `thought`: the
        keys, then the values, of the earlier segments that hold tokens from lo_prev on, the first starting at `first`."""
        thought_k, thought_v = thought[:len(thought) // 2], thought[len(thought) // 2:]  # (L, B, Hkv, n_i, D) each
        if lo > lo_prev and policy.policy == "pte":  # this segment opens with an eviction: fold it into S
            pos = lens[:, None] + torch.arange(lo_prev, lo, device=lens.device)  # (B, m)
            k_e, v_e = (_tokens_from(kv, lo_prev - first) for kv in (thought_k, thought_v))  # pieces from token lo_prev on
            evicted = lambda pieces, i: torch.cat([p[i] for p in pieces], 2)[:, :, :lo - lo_prev]  # (B, Hkv, m, D) of layer i
            cores, _ = fold(adapter, cores, ((evicted(k_e, i), evicted(v_e, i)) for i in range(len(cores))), pos, model.inv_freq)
        q_pos = lens[:, None] + torch.arange(a, b, device=lens.device)  # (B, n)
        key_pos = torch.cat([positions, lens[:, None] + torch.arange(lo, b, device=lens.device)], 1)  # (B, P + b - lo)
        past_k, past_v = [prompt_k, *_tokens_from(thought_k, lo - first)], [prompt_v, *_tokens_from(thought_v, lo - first)]
        return (cores, *forward(tokens[:, a:b], q_pos, key_pos, past_k, past_v, cores, False, (a + 1, b + 1)))

    def replay(grad=None):
        """All pieces in order: one graph over them (each checkpointed), or, given the gradient of the (B, T)
        values, truncated backprop: each piece back-propagates its slice of it and hands on detached outputs."""
        def piece(f, span, *inputs):
            if grad is None:
                return run(f, *inputs)
            out = f(*inputs)
            torch.autograd.backward(out[-1], grad[:, span[0]:span[1]])
            return [None if o is None else o.detach() for o in out]

        cores = adapter.initial_cores(B) if adapter is not None else None
        prompt_k, prompt_v, first_values = piece(prefill, (0, 1), cores)
        values, saved, lo = [first_values], [], 0  # saved: (first token, keys, values) of the segments in the window
        for a, b in zip(bounds, bounds[1:]):
            lo_prev, lo = lo, lo + (m if a in steps else 0)
            saved = [s for s in saved if s[0] + s[1].shape[3] > lo_prev]  # segments still holding tokens >= lo_prev
            if grad is not None and lo_prev == 0 and adapter is not None:
                cores = adapter.initial_cores(B)  # S(0) again: the global tokens learn from every piece before the first fold
            cores, k, v, seg_values = piece(partial(segment, a, b, lo_prev, lo, saved[0][0] if saved else a), (a + 1, b + 1),
                                            cores, prompt_k, prompt_v, *[s[1] for s in saved], *[s[2] for s in saved])
            saved.append((a, k, v))
            values.append(seg_values)
        return torch.cat(values, 1)  # (B, T)

    if truncate and torch.is_grad_enabled() and adapter is not None:
        return _Truncated.apply(replay, torch.ones((), requires_grad=True))  # the anchor makes the values need grad
    return replay()
