"""Rollouts under a cache policy (`generate`) and their training forward (`score`), SPEC section 4.

`generate` prefills left-padded prompts and decodes all rows together into a preallocated RingCache; each row
evicts on its own schedule (cache.Schedule: its window is the budget less its own prompt), and under `pte` every
eviction folds the evicted keys and values into that row's cores S. No autograd. It records the log-probability of
each sampled token under softmax(logits / temperature) (top-p truncation is not renormalised into it, as in TRL and
verl), so that `score` can reproduce it exactly.

`generate(compile=True)` (the default on cuda) decodes through `compiled_step`: each step, all layers and one token
a row, is one torch.compile graph over the same cache (CUDA graphs on cuda), with the step and every slot as index
tensors; it attends over every slot under the mask (eager: over the slots filled so far), so no shape changes between
steps. Evictions and folds into S stay outside the graph (once per eviction).

`score` replays prompt and completion under the same policy in four named steps (SPEC section 4):
1. `plan_segments`: cut the fed tokens at every row's evictions, and runs longer than the smallest m into chunks of
   it. paper: a segment is a run between evictions; here: runs between any row's evictions, cut to at most m
   tokens: nothing is evicted inside a segment, so no value changes, and the activation peak is set by m, not W.
2. `replay_segment`: one forward of a segment's tokens against the kept context (prompt + each row's window) with
   the rows' cores S, under torch.utils.checkpoint, and within it each layer too (a segment's activations are one
   layer's); lm_head, log-softmax and gather in checkpointed chunks of LOGIT_CHUNK positions.
3. `fold_last_eviction`: each segment recomputes every row's S as Normalize(S_before + S'(its last eviction)) from
   the state before that eviction, kept between segments. Exact mode: the same values and the same gradient as
   folding once (the chain through S_before is kept). `truncate`: S_before is a constant, and every target after
   a row's first eviction still reaches the encoder (W_Q, W_K, W_V, q_g) through that row's last fold.
4. `backprop_piece` (truncate only): each piece back-propagates its share of the incoming gradient at once against
   the cache and S_before of the pieces before it as constants (PAPER.md Q7): memory fixed by the budget.
What stays in memory between segments is each segment's new keys and values, the cores and the values; gradients
are exact through the cache and the whole chain of S updates unless `truncate`.
Cost (counted in tests/test_rollout.py): each layer runs 3 forwards per segment in one score + backward: the
forward, the segment's recompute, the layer's recompute (plus the 2 backward matmuls of each forward's linears).
On the CPU in fp32, `generate` holds a second, blocked copy of the weights while it decodes (model.packed_weights).
"""
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from cache import MIN_THOUGHT_SLOTS, ReplayCache, RingCache, Schedule, evict_count, unrotate
from model import dense, packed_weights, wide

POLICIES = ("full", "window", "pte")
LOGIT_CHUNK = 64  # positions per checkpointed lm_head + log-softmax in score: (B, 64, V) logits at most


@dataclass
class CachePolicy:
    policy: str = "pte"
    budget: int = 1024  # prompt + thought slots of each row (`full` ignores it except for its chunk size)
    evict: float = 0.25

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy {self.policy!r}: choose one of {', '.join(POLICIES)}")

    def schedule(self, prompt_lens, max_new):
        return Schedule.of(self.policy, self.budget, self.evict, prompt_lens, max_new)


@dataclass
class Rollout:
    prompts: torch.Tensor  # (B, P) left-padded
    prompt_lens: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T) completions, pad after a row stopped
    logprobs: torch.Tensor  # (B, T) fp32, log softmax(logits / temperature) of each sampled token
    mask: torch.Tensor  # (B, T) bool, the completion's tokens (its EOS included)
    truncated: torch.Tensor  # (B,) bool, stopped by the token limit, not by EOS
    evictions: list  # per row: thought indices t before whose write that row evicted its oldest m_i tokens
    stats: dict = field(default_factory=dict)


def pad_prompts(prompts, pad_id, device):
    """Token lists -> left-padded (B, P) tokens, lengths (B,), positions (B, P) with -1 at pads."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(map(len, prompts))
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    return tokens, lens, prompt_positions(lens, P)


def prompt_positions(lens, P):
    """Absolute positions (B, P) of prompts of lengths lens (B,) left-padded to P, -1 at pads."""
    return (torch.arange(P, device=lens.device) - (P - lens)[:, None]).clamp(min=-1)


def _flat(x):
    """(B, Hkv, m, D) -> (1, B, m, Hkv * D): all KV heads of a token concatenated, as the encoder reads them."""
    B, H, m, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(1, B, m, H * D)


def fold(adapter, cores, evicted, pos, valid, inv_freq):
    """S <- Normalize(S + S'(K_e, V_e)) of some rows, one layer at a time (all layers' copies at once: L times the
    memory). cores (L, R, r, r); evicted: each layer's keys (after RoPE at positions pos (R, m)) and values
    (R, Hkv, m, D); valid (R, m): rows evict different counts, padding counts nothing. Returns (cores, mean ratio)."""
    out = [adapter.update_cores(cores[i:i + 1], _flat(unrotate(k, pos, inv_freq)), _flat(v), slice(i, i + 1), valid)
           for i, (k, v) in enumerate(evicted)]
    return torch.cat([c for c, _ in out]), sum(r for _, r in out) / len(out)  # (L, R, r, r), ()


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


def _evict(cache, sched, rows, evicted, device):
    """Drop the oldest m_i tokens of each row in `rows` from its ring. Returns rows (R,), their positions (R, m) and
    slots (R, m), and valid (R, m) (m = the largest m_i; a row with a smaller m_i is padded)."""
    m = max(sched.counts[i] for i in rows)
    slots = [[cache.prompt_slots + (evicted[i] + min(j, sched.counts[i] - 1)) % sched.windows[i] for j in range(m)]
             for i in rows]
    valid = torch.tensor([[j < sched.counts[i] for j in range(m)] for i in rows], device=device)
    rows, slots = torch.tensor(rows, device=device), torch.tensor(slots, device=device)
    return rows, cache.evict(rows, slots, valid), slots, valid


def decode_step(model, adapter, k, v, pos, windows, prompt_slots, t, token, lens, cores):
    """Thought token t (a 0-d tensor) of every row, token (B,), over a static RingCache of these tensors -> logits
    (B, V). Every shape is the cache's and every index a tensor, so one graph serves all steps of a generate call."""
    cache = RingCache(k, v, pos, windows, prompt_slots, static=True)
    cache.write_thought(t, lens + t)
    return dense(model.hidden(token[:, None], (lens + t)[:, None], cache, adapter, cores)[:, -1], model.lm_head)


def compiled_step(cache):
    """decode_step as one compiled graph. On cuda, CUDA graphs (mode reduce-overhead): a step costs its kernels,
    not Python; the graph writes into the cache in place, so the cache's tensors are marked static (fixed addresses).
    On the CPU, inductor fuses the small ops (RoPE, norms, SwiGLU, masks) between the linears."""
    if cache.k.device.type != "cuda":
        return torch.compile(decode_step, fullgraph=True, dynamic=True)
    for x in (cache.k, cache.v, cache.pos):
        torch._dynamo.mark_static_address(x)
    step = torch.compile(decode_step, fullgraph=True, dynamic=True, mode="reduce-overhead")

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: their memory may be reused
        return step(*args)
    return run


@torch.no_grad()
def generate(model, prompts, policy: CachePolicy, max_new, adapter=None, temperature=0.0, top_p=1.0,
             eos_ids=None, pad_id=None, generator=None, compile=None):
    """Sample completions of token-list prompts under the cache policy. See Rollout for what comes back.
    compile: decode through `compiled_step` (the same tokens and log-probs up to float rounding; the first call of a
    process compiles it: stats["first_step_s"]), else step by step in eager mode, the reference; None: on cuda only
    (on the CPU it is slower than eager's oneDNN linears, 0.83x to 0.89x at 1,024 tokens on SmolLM2, and attends
    over every slot while the window fills: bench.py table 1)."""
    _check(policy, adapter)
    cfg, device, dtype = model.config, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    eos = torch.tensor(list(eos_ids if eos_ids is not None else cfg.eos_ids) or [-1], device=device)
    pad_id = pad_id if pad_id is not None else max(int(eos[0]), 0)
    prompt, lens, positions = pad_prompts(prompts, pad_id, device)
    B, P = prompt.shape
    sched = policy.schedule([len(p) for p in prompts], max_new)
    evicting = sched.evicting(max_new)  # {t: rows}
    cache = RingCache.allocate(cfg, B, P, sched.windows, dtype, device)
    compile = device.type == "cuda" if compile is None else compile
    step, first_step_s = compiled_step(cache) if compile else None, None
    with packed_weights(model):  # CPU fp32: a second, blocked copy of the weights while decoding (1.9x: bench.py)
        cores = adapter.initial_cores(B) if adapter is not None else None
        t0 = time.perf_counter()
        cache.write_prompt(positions)
        logits = dense(model.hidden(prompt, positions.clamp(min=0), cache, adapter, cores)[:, -1],
                       model.lm_head)  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # outputs written in place: per-step survivors would pin the heap under the growing attention temporaries
        tokens = torch.full((B, max_new), pad_id, device=device)  # (B, T)
        logprobs, masks = (torch.zeros(B, max_new, device=device),
                           torch.zeros(B, max_new, dtype=torch.bool, device=device))
        evictions, evicted, ratios, steps = [[] for _ in range(B)], [0] * B, [], 0
        for t in range(max_new):
            token, logp = sample(logits, temperature, top_p, generator)
            token = token.masked_fill(done, pad_id)
            tokens[:, t], logprobs[:, t], masks[:, t], steps = token, logp, ~done, t + 1
            done = done | torch.isin(token, eos)
            if t == max_new - 1 or bool(done.all()):
                break
            if t in evicting:  # these rows' rings are full: evict their oldest m_i before writing token t
                rows, pos, slots, valid = _evict(cache, sched, evicting[t], evicted, device)
                for i in evicting[t]:
                    evicted[i] += sched.counts[i]
                    evictions[i].append(t)
                if policy.policy == "pte":  # fold them into those rows' S
                    layers = ((k[rows[:, None], :, slots].transpose(1, 2), v[rows[:, None], :, slots].transpose(1, 2))
                              for k, v in zip(cache.k, cache.v))  # (R, Hkv, m, D) each
                    folded, ratio = fold(adapter, cores[:, rows], layers, pos, valid, model.inv_freq)
                    cores = cores.index_copy(1, rows, folded)
                    ratios.append(ratio.item())
            if step is None:
                cache.write_thought(t, lens + t)
                h = model.hidden(token[:, None], (lens + t)[:, None], cache, adapter, cores)  # (B, 1, d)
                logits = dense(h[:, -1], model.lm_head)
            else:
                t1 = time.perf_counter()
                cores = cores if cores is None else cores.contiguous()  # S(0) is expanded over the rows: one layout
                logits = step(model, adapter, cache.k, cache.v, cache.pos, cache.windows, P,
                              torch.full((), t, device=device), token, lens, cores)  # (B, V)
                first_step_s = first_step_s or time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    tokens, logprobs, mask = tokens[:, :steps], logprobs[:, :steps], masks[:, :steps]
    stats = dict(seconds=seconds, tokens=int(mask.sum()), tokens_per_s=int(mask.sum()) / seconds, steps=steps,
                 cache_slots=cache.pos.shape[1], cache_slots_used=cache.pos.shape[1] if compile else cache.used,
                 first_step_s=first_step_s, windows=sched.windows,
                 evictions=sum(map(len, evictions)) / B, s_update_ratio=sum(ratios) / len(ratios) if ratios else None)
    return Rollout(prompt, lens, tokens, logprobs, mask, ~done, evictions, stats)


def token_logprobs(temperature):
    """The default per-token value of `score`: log softmax(logits / T) of the target token."""
    def fn(logits, targets, span):
        return torch.log_softmax(wide(logits) / (temperature or 1.0), -1).gather(-1, targets[..., None])[..., 0]
    return fn


# ---------------------------------------------------------------------------------------------------- score

@dataclass
class Segment:
    """Fed thought tokens [start, end) of every row. Row i's window holds its tokens [lo_i, start) (and the
    segment's own); its last eviction took [lo_i - m_i, lo_i) if evicted_i; fresh_i: that eviction came right
    before `start`."""
    start: int
    end: int
    lo: torch.Tensor  # (B,) long
    evicted: torch.Tensor  # (B,) bool
    fresh: torch.Tensor  # (B,) bool


def plan_segments(sched: Schedule, fed, device):
    """Step 1. Segments cut at every row's evictions, runs longer than the smallest m cut into chunks of it.
    `full` never evicts: its chunks are the m a window of this budget would evict."""
    steps = [sched.steps(i, fed) for i in range(len(sched.counts))]
    bounds = sorted({0, fed, *(t for row in steps for t in row)})
    chunk = min(sched.counts)
    cuts = sorted({c for a, b in zip(bounds, bounds[1:]) for c in range(a, b, chunk)} | {fed})
    m = torch.tensor(sched.counts, device=device)
    plan = []
    for a, b in zip(cuts, cuts[1:]):
        n_evictions = torch.tensor([sum(t <= a for t in row) for row in steps], device=device)
        fresh = torch.tensor([a in row for row in steps], device=device)
        plan.append(Segment(a, b, m * n_evictions, n_evictions > 0, fresh))
    return plan


def _pieces_from(pieces, skip):
    """Views of consecutive (L, B, Hkv, n_i, D) pieces without their first `skip` tokens (no copy)."""
    out = []
    for p in pieces:
        if skip < p.shape[3]:
            out.append(p[:, :, :, skip:])
        skip = max(skip - p.shape[3], 0)
    return out


def fold_last_eviction(adapter, base, seg, counts, first, thought_k, thought_v, lens, inv_freq):
    """Step 3. Every row's S for this segment: Normalize(S_before + S'(K_e, V_e)) of its last eviction, gathered
    from the thought pieces (which start at token `first`); S(0) for rows that have not evicted yet."""
    s0 = adapter.initial_cores(len(lens))  # recomputed: under truncate the global tokens learn from every piece
    if not bool(seg.evicted.any()):
        return s0
    m = int(counts.max())
    j = torch.arange(m, device=lens.device)
    valid = (j < counts[:, None]) & seg.evicted[:, None]  # (B, m)
    tok = (seg.lo - counts)[:, None] + j  # (B, m) thought index of each evicted token
    index = torch.where(valid, tok - first, 0)  # (B, m) into the joined pieces

    def layer(pieces, i):  # (B, Hkv, m, D): the evicted tokens of layer i
        joined = torch.cat([p[i] for p in pieces], 2)  # (B, Hkv, n, D)
        return joined.gather(2, index[:, None, :, None].expand(-1, joined.shape[1], -1, joined.shape[3]))
    evicted = ((layer(thought_k, i), layer(thought_v, i)) for i in range(len(base)))
    folded, _ = fold(adapter, base, evicted, lens[:, None] + tok, valid, inv_freq)
    return torch.where(seg.evicted[None, :, None, None], folded, s0)


def _forward(model, adapter, cores, inputs, q_pos, key_pos, past_k, past_v, targets, start, token_fn, use_checkpoint):
    """One forward of `inputs` (B, n) against the context pieces -> (new keys, new values (L, B, Hkv, n, D),
    token values (B, n') of the targets); the (B, n, V) logits exist for LOGIT_CHUNK positions at a time."""
    cache = ReplayCache(past_k, past_v, key_pos, q_pos, model.embed_tokens.weight.dtype)
    h = model.hidden(inputs, q_pos.clamp(min=0), cache, adapter, cores, checkpoint_layers=use_checkpoint)  # (B, n, d)
    h = h[:, -targets.shape[1]:]  # the prompt only predicts the first completion token
    new_k, new_v = torch.stack(cache.new_k), torch.stack(cache.new_v)  # (L, B, Hkv, n, D)
    cache.new_k, cache.new_v = [None] * len(cache.new_k), [None] * len(cache.new_v)  # the stack is the one copy kept

    def chunk_values(h, i):
        span = (start + i, start + i + h.shape[1])
        return token_fn(model.lm_head(h), targets[:, i:i + h.shape[1]], span)
    run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if use_checkpoint else (lambda f, *a: f(*a))
    values = [run(chunk_values, h[:, i:i + LOGIT_CHUNK], i)
              for i in range(0, h.shape[1], LOGIT_CHUNK)]  # (B, <= 64) each
    return new_k, new_v, torch.cat(values, 1)


def replay_segment(model, adapter, ro, seg, counts, folds, token_fn, use_checkpoint,
                   base, prompt_k, prompt_v, first, *thought):
    """Step 2. Segment `seg` against the prompt's keys and values and the thought pieces (keys, then values) that
    start at token `first`. Returns (cores, new keys, new values, token values (B, n))."""
    lens, P = ro.prompt_lens, ro.prompts.shape[1]
    thought_k, thought_v = thought[:len(thought) // 2], thought[len(thought) // 2:]
    cores = None
    if adapter is not None and adapter.encodes:
        cores = (fold_last_eviction(adapter, base, seg, counts, first, thought_k, thought_v, lens, model.inv_freq)
                 if folds else adapter.initial_cores(len(lens)))
    prompt_pos = prompt_positions(lens, P)  # (B, P), -1 at pads
    t = torch.arange(first, seg.end, device=lens.device)
    thought_pos = torch.where(t >= seg.lo[:, None], lens[:, None] + t, -1)  # (B, end - first): each row's window
    key_pos = torch.cat([prompt_pos, thought_pos], 1)
    q_pos = lens[:, None] + torch.arange(seg.start, seg.end, device=lens.device)  # (B, n)
    inputs, targets = ro.tokens[:, seg.start:seg.end], ro.tokens[:, seg.start + 1:seg.end + 1]  # (B, n) each
    return (cores, *_forward(model, adapter, cores, inputs, q_pos, key_pos, [prompt_k, *thought_k],
                             [prompt_v, *thought_v], targets, seg.start + 1, token_fn, use_checkpoint))


def _prefill(model, adapter, ro, token_fn, use_checkpoint):
    """The prompt, with S(0): its keys and values, and the value of the first completion token."""
    cfg, (B, P), lens = model.config, ro.prompts.shape, ro.prompt_lens
    cores = adapter.initial_cores(B) if adapter is not None else None
    pos = prompt_positions(lens, P)  # (B, P)
    empty = model.embed_tokens.weight.new_empty(cfg.n_layers, B, cfg.n_kv_heads, 0, cfg.head_dim)
    return (cores, *_forward(model, adapter, cores, ro.prompts, pos, pos, [empty], [empty], ro.tokens[:, :1], 0,
                             token_fn, use_checkpoint))


def backprop_piece(grad, fn, span, *inputs):
    """Step 4 (truncate). Run a piece, back-propagate its slice of the values' gradient now, hand on constants."""
    out = fn(*inputs)
    torch.autograd.backward(out[-1], grad[:, span[0]:span[1]])
    return [None if o is None else o.detach() for o in out]


def _replay(model, ro, plan, sched, adapter, folds, token_fn, use_checkpoint, grad=None):
    """All pieces in order: one graph over them (each checkpointed), or, given the gradient of the (B, T) values,
    truncated backprop piece by piece. Returns the (B, T) values."""
    if grad is not None:
        piece = partial(backprop_piece, grad)
    elif use_checkpoint:
        piece = lambda fn, span, *a: checkpoint(fn, *a, use_reentrant=False)  # noqa: E731
    else:
        piece = lambda fn, span, *a: fn(*a)  # noqa: E731
    counts = torch.tensor(sched.counts, device=ro.tokens.device)
    prefill = partial(_prefill, model, adapter, ro, token_fn, use_checkpoint)
    cores, prompt_k, prompt_v, first_values = piece(prefill, (0, 1))
    values, saved, base = [first_values], [], cores  # saved: (first token, keys, values) of earlier segments
    for seg in plan:
        if folds:  # S before each row's newest eviction: the cores of the segment before it
            base = torch.where(seg.fresh[None, :, None, None], cores, base)
        first = int((seg.lo - counts * seg.evicted).min())  # the earliest token a window or a fold still needs
        saved = [s for s in saved if s[0] + s[1].shape[3] > first]
        start = saved[0][0] if saved else seg.start
        ks, vs = _pieces_from([s[1] for s in saved], first - start), _pieces_from([s[2] for s in saved], first - start)
        fn = partial(replay_segment, model, adapter, ro, seg, counts, folds, token_fn, use_checkpoint)
        cores, k, v, seg_values = piece(fn, (seg.start + 1, seg.end + 1), base, prompt_k, prompt_v, first, *ks, *vs)
        saved.append((seg.start, k, v))
        values.append(seg_values)
    return torch.cat(values, 1)  # (B, T)


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
            ctx.replay(grad=grad)
        return None, None


def score(model, rollout: Rollout, policy: CachePolicy, adapter=None, temperature=0.0, use_checkpoint=True,
          token_fn=None, truncate=False):
    """Replay the rollout under its policy, segment by segment; returns (B, T) log-probs of its tokens (with
    autograd when enabled), or token_fn(logits (B, n, V), targets (B, n), span) -> (B, n) for each segment.
    truncate: truncated backprop (PAPER Q7, an option): each piece sees the cache and S_before of the pieces before
    it as constants and back-propagates as soon as its gradient is known, so training memory is fixed by the budget
    like generate's, not by the rollout length; the gradient drops the paths through the cache and the chain of S."""
    _check(policy, adapter)
    lens = rollout.prompt_lens.tolist()
    fed = rollout.tokens.shape[1] - 1  # the last token is scored but never fed
    if policy.policy == "full":  # no evictions: chunks of the m a window of this budget would evict
        sched = Schedule([fed] * len(lens), [evict_count(max(policy.budget - n, MIN_THOUGHT_SLOTS), policy.evict)
                                              for n in lens], "full")
    else:
        sched = policy.schedule(lens, fed)
        if ([sched.steps(i, fed) for i in range(len(lens))]
                != [[t for t in row if t < fed] for row in rollout.evictions]):
            raise ValueError("the rollout's evictions do not match this policy's schedule: "
                             "score it with the policy that generated it")
    folds = policy.policy == "pte" and adapter.cfg.mode != "global-only"  # global-only: S stays S(0)
    replay = partial(_replay, model, rollout, plan_segments(sched, fed, rollout.tokens.device), sched, adapter, folds,
                     token_fn or token_logprobs(temperature), use_checkpoint)
    if truncate and torch.is_grad_enabled() and adapter is not None:
        return _Truncated.apply(replay, torch.ones((), requires_grad=True))  # the anchor makes the values need grad
    return replay()
