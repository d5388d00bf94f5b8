"""Rollouts under a cache policy (`generate`, docs/method.md §5) and their training forward (`score`, §6).

`generate` prefills the prompts, each into its own row of a preallocated RingCache (its prompt, then its ring: the
budget is each row's memory), and decodes all rows together. Each row evicts on its own schedule (cache.Schedule:
its window is the budget less its own prompt), and under `pte` every eviction folds the evicted keys and values into
that row's cores S. A row's tokens do not depend on the other rows of the call (beyond float rounding), so a caller
may split its rows over several calls, and `prefill_rows` splits the prefill. No autograd. It records the
log-probability of each sampled token under softmax(logits / temperature) (top-p truncation is not renormalised
into it, as in TRL and verl), so that `score` can reproduce it exactly. Each decode step reads as five named steps:
`sample`, `record`, `stop`, `evict_and_fold`, `next_logits`. The host only counts: an eviction's rows and slots are
computed on the device, and whether every row has stopped is read every DONE_EVERY steps.

`generate(compile=True)` (the default on cuda) decodes through `compiled_step`: each step, all layers and one token
a row, is one torch.compile graph over the same cache (CUDA graphs on cuda), with the step and every slot as index
tensors; it attends over every slot under the mask (eager: over the slots filled so far), so no shape changes between
steps, and the batch, slot and prompt dimensions are dynamic, so no call recompiles. Evictions and folds into S stay
outside the graph. A compiler that fails (creating, compiling or capturing the step) costs one warning, and the
rest of the call decodes eagerly, with the same tokens.

`score` replays prompt and completion under the same policy in four named steps (docs/method.md §6):
1. `plan_segments`: cut the fed tokens at every row's evictions, and runs longer than the smallest m into chunks of
   it. paper: a segment is a run between evictions; here: runs between any row's evictions, cut to at most m
   tokens: nothing is evicted inside a segment, so no value changes, and the activation peak is set by m, not W.
2. `replay_segment`: one forward of a segment's tokens against each row's own kept context (its prompt and its
   window) with the rows' cores S, under torch.utils.checkpoint, and within it each layer too (a segment's
   activations are one layer's); lm_head, log-softmax and gather in checkpointed chunks of LOGIT_CHUNK positions.
3. `fold_last_eviction`: each segment recomputes every row's S as Normalize(S_before + S'(its last eviction)) from
   the state before that eviction, kept between segments. Exact mode: the same values and the same gradient as
   folding once (the chain through S_before is kept). `truncate`: S_before is a constant, and every target after
   a row's first eviction still reaches the encoder (W_Q, W_K, W_V, q_g) through that row's last fold.
4. `backprop_piece` (truncate only): each piece back-propagates its share of the incoming gradient at once against
   the cache and S_before of the pieces before it as constants (docs/method.md §6.4): memory fixed by the budget.
What stays in memory between segments is each segment's new keys and values, the cores and the values; gradients
are exact through the cache and the whole chain of S updates unless `truncate`.
Cost (counted in tests/test_rollout.py): each layer runs 3 forwards per segment in one score + backward: the
forward, the segment's recompute, the layer's recompute (plus the 2 backward matmuls of each forward's linears).
On the CPU in fp32, `generate` holds a second, blocked copy of the weights while it decodes (model.packed_weights).
"""
import inspect
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from cache import MIN_THOUGHT_SLOTS, ReplayCache, RingCache, Schedule, evict_count
from model import apply_rope, dense, packed_weights, rope_cos_sin, wide

POLICIES = ("full", "window", "pte")
LOGIT_CHUNK = 64  # positions per checkpointed lm_head + log-softmax in score: (B, 64, V) logits at most
DONE_EVERY = 16  # generate reads whether every row has stopped once in this many steps (a host sync each time)
# the compiled step marks one batch dimension shared by its tensors (mark_unbacked's shape_id): torch 2.11 or later
COMPILES = "shape_id" in inspect.signature(torch._dynamo.decorators.mark_unbacked).parameters


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
class Sampling:
    """How generate decodes: up to max_new tokens a row, from softmax(logits / temperature) cut to top_p (greedy at
    temperature 0), a row stopping at any of eos_ids (None: the model's) and padded with pad_id after it (None: the
    first EOS, else 0)."""
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    eos_ids: list | None = None
    pad_id: int | None = None


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


def pad_prompts(prompts, pad_id, device, right=False):
    """Token lists -> (B, P) tokens padded on the left (or right), lengths (B,), positions (B, P) with -1 at pads."""
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(map(len, prompts))
    pads = [[pad_id] * (P - len(p)) for p in prompts]
    tokens = torch.tensor([list(p) + pad if right else pad + list(p) for p, pad in zip(prompts, pads)], device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if not right:
        return tokens, lens, prompt_positions(lens, P)
    positions = torch.arange(P, device=device).expand(len(prompts), P)  # (B, P)
    return tokens, lens, positions.masked_fill(positions >= lens[:, None], -1)


def prompt_positions(lens, P):
    """Absolute positions (B, P) of prompts of lengths lens (B,) left-padded to P, -1 at pads."""
    return (torch.arange(P, device=lens.device) - (P - lens)[:, None]).clamp(min=-1)


def fold(adapter, cores, evicted, positions, valid, inv_freq):
    """S <- Normalize(S + S'(K_e, V_e)) of some rows, one layer at a time (all layers' copies at once: L times the
    memory). cores (L, R, r, r); evicted: each layer's keys (after RoPE at positions (R, m)) and values
    (R, m, Hkv, D); valid (R, m): rows evict different counts, padding counts nothing. Returns (cores, mean ratio
    ||S'|| / ||S||, a 0-d tensor)."""
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)  # (R, 1, m, D), once for every layer
    cos, sin = cos.transpose(1, 2), -sin.transpose(1, 2)  # (R, m, 1, D); -sin turns the rotation back
    out = []
    for layer, (k, v) in enumerate(evicted):
        k = apply_rope(wide(k), cos, sin)  # (R, m, Hkv, D) as before RoPE: the encoder sees no absolute position
        # all KV heads of a token side by side: (1, R, m, Hkv * D)
        out.append(adapter.update_cores(cores[layer:layer + 1], k.flatten(2)[None], v.flatten(2)[None],
                                        slice(layer, layer + 1), valid))
    return torch.cat([c for c, _ in out]), sum(r for _, r in out) / len(out)  # (L, R, r, r), ()


def _check(policy, adapter):
    if policy.policy == "pte" and (adapter is None or not adapter.encodes):
        raise ValueError("policy pte needs an adapter with a thought encoder (mode pte, global-0 or global-only)")


# ---------------------------------------------------------------------------------------------------- generate

def sample(logits, top_p=1.0, generator=None, greedy=False):
    """logits (B, V), already divided by the temperature -> token (B,) and its log-prob (B,) under softmax(logits).
    greedy: the argmax. Else the exponential race: with E_i ~ Exp(1), argmax_i p_i / E_i is token i with probability
    p_i. It is the draw torch.multinomial makes for one sample (the same tokens from the same generator), without the
    host syncs of its checks on the probabilities. At top-p 1: three passes that read the vocabulary (softmax, the
    division, the argmax) beside the one that writes the noise."""
    if greedy:
        logp = torch.log_softmax(logits, -1, dtype=torch.float32)  # (B, V)
        token = logp.argmax(-1)
        return token, logp.gather(-1, token[:, None])[:, 0]
    probs = weights = torch.softmax(logits, -1, dtype=torch.float32)  # (B, V)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        weights = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0))
    race = torch.empty_like(weights).exponential_(generator=generator)  # (B, V) E_i
    token = torch.div(weights, race, out=race).argmax(-1)  # (B,) a token without probability never wins
    return token, probs.gather(-1, token[:, None])[:, 0].log()


@dataclass
class Transcript:
    """What generate writes in place, one column a step (per-step survivors would pin the heap under the growing
    attention temporaries)."""
    tokens: torch.Tensor  # (B, max_new) pad after a row's EOS
    logprobs: torch.Tensor  # (B, max_new)
    mask: torch.Tensor  # (B, max_new) bool
    done: torch.Tensor  # (B,) bool: the row has sampled an EOS
    pad_id: int

    @classmethod
    def empty(cls, batch, max_new, pad_id, device):
        return cls(torch.full((batch, max_new), pad_id, device=device), torch.zeros(batch, max_new, device=device),
                   torch.zeros(batch, max_new, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.bool, device=device), pad_id)


def record(out, t, token, logp):
    """Write token t of every row (pad where the row has stopped); returns the tokens as written."""
    token = token.masked_fill(out.done, out.pad_id)
    out.tokens[:, t], out.logprobs[:, t], out.mask[:, t] = token, logp, ~out.done
    return token


def stop(out, t, token, eos, max_new):
    """Mark the rows that sampled an EOS; stop at the token limit, or when every row has stopped (read every
    DONE_EVERY steps: a host sync; until then a stopped row decodes pads that stay masked)."""
    out.done |= torch.isin(token, eos)
    return t == max_new - 1 or (t % DONE_EVERY == DONE_EVERY - 1 and bool(out.done.all()))


def head(model, h, temperature):
    """The logits at the temperature from the last hidden states (B, d): lm_head(h / T), which equals lm_head(h) / T
    (lm_head has no bias) at a d-wide division instead of a vocabulary-wide one."""
    return dense(h if temperature in (0, 1) else h / temperature, model.lm_head)  # (B, V)


def prefill(model, adapter, cores, cache, prompts, pad_id, temperature, chunk=None):
    """Every row's prompt into its slots [0, len_i), right-padded, `chunk` rows a forward (all by default: the
    prefill's peak grows with the rows of a forward). Returns the logits (B, V) after each row's last prompt token,
    at the temperature."""
    logits, device, chunk = [], cache.k.device, chunk or len(prompts)
    for a in range(0, len(prompts), chunk):
        tokens, lens, positions = pad_prompts(prompts[a:a + chunk], pad_id, device, right=True)  # (R, n) each
        rows = slice(a, a + len(lens))
        cache.write_prompt(rows, positions)
        h = model.hidden(tokens, positions.clamp(min=0), cache, adapter, None if cores is None else cores[:, rows])
        logits.append(head(model, h[torch.arange(len(lens), device=device), lens - 1], temperature))  # (R, V)
    return torch.cat(logits)


def evict_and_fold(model, encoder, cache, cores, t, event, ratios):
    """Before thought t, the rows whose ring is full evict their oldest m_i tokens (event: how many rows, their
    largest m_i). encoder: the adapter whose S folds them in (pte), else None (window forgets them). Every
    operation runs on the device, on R rows whichever they are, and appends ||S'|| / ||S|| to `ratios` unread."""
    rows, slots, positions, valid = cache.evict(t, *event)  # (R,), (R, m) each
    if encoder is None:
        return cores
    # each layer's evicted keys and values (R, m, Hkv, D)
    evicted = ((k[rows[:, None], :, slots], v[rows[:, None], :, slots]) for k, v in zip(cache.k, cache.v))
    folded, ratio = fold(encoder, cores[:, rows], evicted, positions, valid, model.inv_freq)  # (L, R, r, r)
    ratios.append(ratio)
    return cores.index_copy(1, rows, folded)


def feed(model, adapter, cache, t, token, cores):
    """Thought token t of every row, token (B,), through the cache -> the last hidden states (B, d). Eager: it
    attends over the slots filled so far; a static cache: over every slot."""
    pos = cache.lens + t  # (B,) each row's absolute position of thought t
    cache.write_thought(t, pos)
    return model.hidden(token[:, None], pos[:, None], cache, adapter, cores)[:, -1]


def next_logits(model, adapter, cache, cores, t, token, temperature, step=None):
    """Feed thought token t of every row -> the logits (B, V) of token t + 1, at the temperature; through `step`
    (compiled_step) if given, else eagerly."""
    return head(model, (step or feed)(model, adapter, cache, t, token, cores), temperature)


def decode_step(model, adapter, ring, t, token, cores):
    """Thought token t (a 0-d tensor) of every row, token (B,), over a static RingCache of ring = (k, v, pos, lens,
    windows) -> the last hidden states (B, d). Every shape is the cache's and every index a tensor, so one graph
    serves all steps of a generate call."""
    return feed(model, adapter, RingCache(*ring, static=True), t, token, cores)


# One function a variant: dynamo keeps the compiled graphs of a function together, and a variant's graph is a compile
# of its own, never a recompile of another's (each function only ever sees one of them).
def pte_step(model, adapter, ring, t, token, cores):
    return decode_step(model, adapter, ring, t, token, cores)


def lora_step(model, adapter, ring, t, token, cores):  # cores None: S = I
    return decode_step(model, adapter, ring, t, token, None)


def base_step(model, adapter, ring, t, token, cores):  # no adapter
    return decode_step(model, None, ring, t, token, None)


def compiled_step(model, adapter):
    """decode_step as one compiled graph, with the signature of feed, or None where compiling failed in an
    earlier call (model.compile_error). On cuda, CUDA graphs (mode reduce-overhead): a step costs its kernels, not
    Python; the graph writes into the cache in place, so the cache's tensors are marked static (fixed addresses).
    On the CPU, inductor fuses the small ops (RoPE, norms, SwiGLU, masks) between the linears. The batch and slot
    dimensions are dynamic and never specialised (not at size 1 either, nor to equal another size), so that calls
    of other batch sizes, prompt lengths or budgets reuse the graph. If creating, compiling, capturing or running
    it fails, one warning says why, and the step runs eagerly from then on (the same tokens: a partial step's
    writes are written again)."""
    if getattr(model, "compile_error", None):
        return None
    if not COMPILES:
        _compile_failed(model, RuntimeError(f"torch {torch.__version__}: the compiled step needs torch 2.11 or later"))
        return None
    cuda = model.embed_tokens.weight.device.type == "cuda"
    options = dict(fullgraph=True, dynamic=False, **(dict(mode="reduce-overhead") if cuda else {}))
    try:
        variant = base_step if adapter is None else pte_step if adapter.encodes else lora_step
        compiled = torch.compile(variant, **options)
    except Exception as e:  # noqa: BLE001  (whatever the compiler raises, decoding eagerly gives the same tokens)
        _compile_failed(model, e)
        return None

    def step(model, adapter, cache, t, token, cores):
        if not getattr(model, "compile_error", None):
            began = time.perf_counter()
            try:
                h = _run_compiled(compiled, model, adapter, cache, t, token, cores)
                step.first_s = step.first_s or time.perf_counter() - began  # the first call compiles
                return h
            except Exception as e:  # noqa: BLE001
                _compile_failed(model, e)
        return feed(model, adapter, cache, t, token, cores)
    step.first_s = None
    return step


def _run_compiled(compiled, model, adapter, cache, t, token, cores):
    """One call of the compiled step, with the batch and slot dimensions marked dynamic."""
    if cache.k.device.type == "cuda":
        for x in (cache.k, cache.v, cache.pos):
            torch._dynamo.mark_static_address(x)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's output is consumed: its memory may be reused
    # k, v (L, B, Hkv, S, D), pos (B, S), lens, windows, token (B,), cores (L, B, r, r). The batch is unbacked (one
    # symbol across the tensors, never specialised, not to 1 either); the slots (always more than 4) are dynamic
    for x, batch, slots in ((cache.k, 1, 3), (cache.v, 1, 3), (cache.pos, 0, 1), (cache.lens, 0, None),
                            (cache.windows, 0, None), (token, 0, None), (cores, 1, None)):
        if x is not None:
            torch._dynamo.decorators.mark_unbacked(x, batch, shape_id="batch")
        if slots is not None:
            torch._dynamo.mark_dynamic(x, slots)
    return compiled(model, adapter, cache.ring, torch.full((), t, device=token.device), token, cores)


def _compile_failed(model, error):
    """Remember on the model that compiling failed (later calls decode eagerly at once) and say so, once."""
    model.compile_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    warnings.warn(f"the compiled decode step failed ({model.compile_error}); decoding eagerly from here on, with the "
                  "same tokens. Pass --no-compile to skip compiling.", RuntimeWarning, stacklevel=3)


@torch.no_grad()
def generate(model, prompts, policy: CachePolicy, sampling: Sampling, adapter=None, generator=None, compile=None,
             prefill_rows=None):
    """Sample completions of token-list prompts under the cache policy. See Rollout for what comes back.
    compile: decode through `compiled_step` (the same tokens and log-probs up to float rounding; the first call of a
    process compiles it: stats["first_step_s"]), else step by step in eager mode, the reference; None: on cuda only
    (on the CPU the compiled step is slower than eager's oneDNN linears and attends over every slot while the window
    fills: bench.py table 1). prefill_rows: prompts prefilled a forward (default all): caps the prefill's peak
    memory, and leaves the tokens as they are."""
    _check(policy, adapter)
    device, B = model.embed_tokens.weight.device, len(prompts)
    max_new, temperature = sampling.max_new, sampling.temperature
    eos_ids = list(sampling.eos_ids if sampling.eos_ids is not None else model.config.eos_ids)
    pad_id = sampling.pad_id if sampling.pad_id is not None else max(eos_ids[:1] + [0])
    eos = torch.tensor(eos_ids or [-1], device=device)
    lens = [len(p) for p in prompts]
    sched = policy.schedule(lens, max_new)
    cache = RingCache.allocate(model.config, lens, sched.windows, sched.counts, model.embed_tokens.weight.dtype, device)
    events = sched.events(max_new)  # {t: (rows, their largest m)}: all the host knows of the evictions
    step = compiled_step(model, adapter) if (device.type == "cuda" if compile is None else compile) else None
    encoder = adapter if policy.policy == "pte" else None  # it folds evictions (global-only: into nothing)
    out, ratios = Transcript.empty(B, max_new, pad_id, device), []
    with packed_weights(model):  # CPU fp32: a second, blocked copy of the weights while decoding
        cores = adapter.initial_cores(B) if adapter is not None else None
        cores = None if cores is None else cores.contiguous()  # S(0) comes expanded over the rows: one copy, here
        t0 = time.perf_counter()
        logits = prefill(model, adapter, cores, cache, prompts, pad_id, temperature, prefill_rows)  # (B, V)
        for t in range(max_new):
            token = record(out, t, *sample(logits, sampling.top_p, generator, greedy=temperature == 0))
            if stop(out, t, token, eos, max_new):
                break
            if t in events:
                cores = evict_and_fold(model, encoder, cache, cores, t, events[t], ratios)
            logits = next_logits(model, adapter, cache, cores, t, token, temperature, step)
    seconds, steps = time.perf_counter() - t0, int(out.mask.any(0).sum())
    evictions = [sched.steps(i, steps - 1) for i in range(B)]  # the last token is never written
    mask = out.mask[:, :steps]
    stats = dict(seconds=seconds, tokens=int(mask.sum()), tokens_per_s=int(mask.sum()) / seconds, steps=steps,
                 cache_slots=cache.pos.shape[1], cache_slots_used=cache.pos.shape[1] if step else cache.used,
                 first_step_s=getattr(step, "first_s", None), windows=sched.windows,
                 evictions=sum(map(len, evictions)) / B,
                 s_update_ratio=torch.stack(ratios).mean().item() if ratios else None)
    prompt, prompt_lens, _ = pad_prompts(prompts, pad_id, device)
    return Rollout(prompt, prompt_lens, out.tokens[:, :steps], out.logprobs[:, :steps], mask, ~out.done, evictions,
                   stats)


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


@dataclass
class Replay:
    """What every piece of one score call shares."""
    model: torch.nn.Module
    adapter: torch.nn.Module | None
    rollout: Rollout
    counts: torch.Tensor  # (B,) m_i
    folds: bool  # pte, not global-only: each segment folds its rows' last eviction into S
    token_fn: object  # token_fn(logits (B, n, V), targets (B, n), span) -> (B, n)
    use_checkpoint: bool


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


def row_context(lens, P, seg, first):
    """Where each row's own keys are in [prompt (P slots, left-padded), thought tokens from `first`, the segment]:
    its prompt, its window [lo_i, start), then the segment's tokens; rows of shorter context are left-padded.
    Returns index and positions (B, C + n) (padding: index 0, position -1); C = max_i(len_i + start - lo_i), at
    most the budget."""
    context = lens + seg.start - seg.lo  # (B,) prompt + window of each row
    C, n = int(context.max()), seg.end - seg.start
    u = torch.arange(C, device=lens.device) - (C - context)[:, None]  # (B, C) index in the row's context; < 0: pad
    prompt = u < lens[:, None]
    window = seg.lo[:, None] + u - lens[:, None]  # (B, C) the thought index where u is in the window
    index = torch.where(prompt, P - lens[:, None] + u, P - first + window).clamp(min=0)
    key_pos = torch.where(u < 0, -1, torch.where(prompt, u, lens[:, None] + window))
    s = torch.arange(seg.start, seg.end, device=lens.device)  # the segment's own tokens
    return (torch.cat([index, (P - first + s).expand(len(lens), n)], 1),
            torch.cat([key_pos, lens[:, None] + s], 1))


def fold_last_eviction(ctx, base, seg, first, thought_k, thought_v):
    """Step 3. Every row's S for this segment: Normalize(S_before + S'(K_e, V_e)) of its last eviction, gathered
    from the thought pieces (which start at token `first`); S(0) for rows that have not evicted yet."""
    lens, counts = ctx.rollout.prompt_lens, ctx.counts
    s0 = ctx.adapter.initial_cores(len(lens))  # recomputed: under truncate the global tokens learn from every piece
    if not bool(seg.evicted.any()):
        return s0
    m = int(counts.max())
    j = torch.arange(m, device=lens.device)
    valid = (j < counts[:, None]) & seg.evicted[:, None]  # (B, m)
    tok = (seg.lo - counts)[:, None] + j  # (B, m) thought index of each evicted token
    index = torch.where(valid, tok - first, 0)  # (B, m) into the joined pieces

    def layer(pieces, i):  # (B, m, Hkv, D): the evicted tokens of layer i
        joined = torch.cat([p[i] for p in pieces], 2)  # (B, Hkv, n, D)
        index_ = index[:, None, :, None].expand(-1, joined.shape[1], -1, joined.shape[3])  # (B, Hkv, m, D)
        return joined.gather(2, index_).transpose(1, 2)
    evicted = ((layer(thought_k, i), layer(thought_v, i)) for i in range(len(base)))
    folded, _ = fold(ctx.adapter, base, evicted, lens[:, None] + tok, valid, ctx.model.inv_freq)
    return torch.where(seg.evicted[None, :, None, None], folded, s0)


def _forward(ctx, cache, cores, inputs, targets, start):
    """One forward of `inputs` (B, n) through `cache` (its query positions) -> (new keys, new values
    (L, B, Hkv, n, D), token values (B, n') of the targets, which start at completion token `start`); the (B, n, V)
    logits exist for LOGIT_CHUNK positions at a time."""
    model = ctx.model
    h = model.hidden(inputs, cache.query_pos.clamp(min=0), cache, ctx.adapter, cores,
                     checkpoint_layers=ctx.use_checkpoint)  # (B, n, d)
    h = h[:, -targets.shape[1]:]  # the prompt only predicts the first completion token
    new_k, new_v = torch.stack(cache.new_k), torch.stack(cache.new_v)  # (L, B, Hkv, n, D)
    cache.new_k, cache.new_v = [None] * len(cache.new_k), [None] * len(cache.new_v)  # the stack is the one copy kept

    def chunk_values(h, i):
        span = (start + i, start + i + h.shape[1])
        return ctx.token_fn(model.lm_head(h), targets[:, i:i + h.shape[1]], span)
    run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if ctx.use_checkpoint else (lambda f, *a: f(*a))
    values = [run(chunk_values, h[:, i:i + LOGIT_CHUNK], i)
              for i in range(0, h.shape[1], LOGIT_CHUNK)]  # (B, <= 64) each
    return new_k, new_v, torch.cat(values, 1)


def replay_segment(ctx, seg, base, prompt_k, prompt_v, first, *thought):
    """Step 2. Segment `seg` against each row's own prompt and window, from the prompt's keys and values and the
    thought pieces (keys, then values) that start at token `first`. Returns (cores, new keys, new values, token
    values (B, n))."""
    ro = ctx.rollout
    lens, P = ro.prompt_lens, ro.prompts.shape[1]
    thought_k, thought_v = thought[:len(thought) // 2], thought[len(thought) // 2:]
    cores = None
    if ctx.adapter is not None and ctx.adapter.encodes:
        cores = (fold_last_eviction(ctx, base, seg, first, thought_k, thought_v)
                 if ctx.folds else ctx.adapter.initial_cores(len(lens)))
    index, key_pos = row_context(lens, P, seg, first)  # (B, C + n) each
    q_pos = lens[:, None] + torch.arange(seg.start, seg.end, device=lens.device)  # (B, n)
    cache = ReplayCache([prompt_k, *thought_k], [prompt_v, *thought_v], index, key_pos, q_pos, prompt_k.dtype)
    inputs, targets = ro.tokens[:, seg.start:seg.end], ro.tokens[:, seg.start + 1:seg.end + 1]  # (B, n) each
    return (cores, *_forward(ctx, cache, cores, inputs, targets, seg.start + 1))


def _prefill(ctx):
    """The prompt, with S(0): its keys and values, and the value of the first completion token."""
    cfg, ro = ctx.model.config, ctx.rollout
    (B, P), lens = ro.prompts.shape, ro.prompt_lens
    cores = ctx.adapter.initial_cores(B) if ctx.adapter is not None else None
    pos = prompt_positions(lens, P)  # (B, P)
    empty = ctx.model.embed_tokens.weight.new_empty(cfg.n_layers, B, cfg.n_kv_heads, 0, cfg.head_dim)
    cache = ReplayCache([empty], [empty], None, pos, pos, empty.dtype)
    return (cores, *_forward(ctx, cache, cores, ro.prompts, ro.tokens[:, :1], 0))


def backprop_piece(grad, fn, span, *inputs):
    """Step 4 (truncate). Run a piece, back-propagate its slice of the values' gradient now, hand on constants."""
    out = fn(*inputs)
    torch.autograd.backward(out[-1], grad[:, span[0]:span[1]])
    return [None if o is None else o.detach() for o in out]


def _replay(ctx, plan, grad=None):
    """All pieces in order: one graph over them (each checkpointed), or, given the gradient of the (B, T) values,
    truncated backprop piece by piece. Returns the (B, T) values."""
    if grad is not None:
        piece = partial(backprop_piece, grad)
    elif ctx.use_checkpoint:
        piece = lambda fn, span, *a: checkpoint(fn, *a, use_reentrant=False)  # noqa: E731
    else:
        piece = lambda fn, span, *a: fn(*a)  # noqa: E731
    cores, prompt_k, prompt_v, first_values = piece(partial(_prefill, ctx), (0, 1))
    values, saved, base = [first_values], [], cores  # saved: (first token, keys, values) of earlier segments
    for seg in plan:
        if ctx.folds:  # S before each row's newest eviction: the cores of the segment before it
            base = torch.where(seg.fresh[None, :, None, None], cores, base)
        first = int((seg.lo - ctx.counts * seg.evicted).min())  # the earliest token a window or a fold still needs
        saved = [s for s in saved if s[0] + s[1].shape[3] > first]
        start = saved[0][0] if saved else seg.start
        ks, vs = _pieces_from([s[1] for s in saved], first - start), _pieces_from([s[2] for s in saved], first - start)
        fn = partial(replay_segment, ctx, seg)
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
    truncate: truncated backprop (docs/method.md §6.4, an option): each piece sees the cache and S_before of the
    pieces before it as constants and back-propagates as soon as its gradient is known, so training memory is fixed
    by the budget like generate's, not by the rollout length; the gradient drops the paths through the cache and
    the chain of S."""
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
    device = rollout.tokens.device
    ctx = Replay(model, adapter, rollout, torch.tensor(sched.counts, device=device),
                 policy.policy == "pte" and adapter.cfg.mode != "global-only",  # global-only: S stays S(0)
                 token_fn or token_logprobs(temperature), use_checkpoint)
    replay = partial(_replay, ctx, plan_segments(sched, fed, device))
    if truncate and torch.is_grad_enabled() and adapter is not None:
        return _Truncated.apply(replay, torch.ones((), requires_grad=True))  # the anchor makes the values need grad
    return replay()
