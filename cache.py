"""The fixed-size KV cache (docs/method.md §2): each row's own prompt, then its own ring of thought slots.

The budget is the memory. Under `window` and `pte` every row holds exactly `budget` slots, as a serving engine gives
each sequence its own cache: its prompt in slots [0, len_i) (never evicted), then a ring of W_i = budget - len_i
thought slots [len_i, budget), whatever the other rows' prompts are. Thought token t of row i goes to slot
len_i + t % W_i; before it is written, a full ring drops its oldest m_i = ceil(evict * W_i) tokens at once, so row i
evicts before tokens W_i, W_i + m_i, W_i + 2 m_i, ... Rows of different prompt lengths evict at different steps
(per-row schedules: no row loses any of its window to another row's prompt). `full` never evicts: its rows keep all
max_new thought tokens, and its cache is max_i(len_i) + max_new slots wide (what it must hold for the longest prompt;
shorter prompts leave their last slots unused).
Positions are absolute: a row's first prompt token has position 0, its thought token t position len_i + t. Keys are
stored after RoPE at those positions and never re-rotated (the encoder turns the evicted ones back, rollout.fold).

Three caches speak the model's cache protocol (`update(layer, k, v) -> keys, values` and `mask`):
- `RingCache`: generation. Preallocated, written in place, no autograd; an eviction is built on the device from
  per-row tensors (no host sync, a fixed number of operations whatever the rows that evict).
- `ReplayCache`: training (rollout.score). One segment's view: each row's own prompt and window, gathered from the
  kept pieces, with the segment's own keys appended out of place, so that gradients flow through the cache.
- `MaskedForward`: no past, one forward over a whole sequence under an explicit mask (references, the toy's build).
Minimum window (our choice, the paper has none): 4 thought slots, so that an eviction leaves a window. Prompts that
leave less are set aside when the data is loaded (data.py); here they are an error.
"""
import math
from dataclasses import dataclass, field

import torch

MIN_THOUGHT_SLOTS = 4


def thought_slots(policy, budget, prompt_len, max_new):
    """W of one row: `full` keeps all max_new tokens; `window`/`pte` get what the budget leaves after its prompt."""
    if policy == "full":
        return max(max_new, 1)
    window = budget - prompt_len
    if window < MIN_THOUGHT_SLOTS:
        raise ValueError(f"cache budget {budget} leaves {window} thought slots after a {prompt_len}-token prompt; "
                         f"need at least {MIN_THOUGHT_SLOTS}: raise --cache to {prompt_len + MIN_THOUGHT_SLOTS} "
                         "or more, or use shorter prompts")
    return window


def evict_count(window, evict):
    """m = ceil(evict * W), rounded first so that 0.28 * 25 (7.000000000000001 in floats) gives 7, not 8."""
    if not 0 < evict <= 1:
        raise ValueError(f"--evict must be in (0, 1], got {evict}")
    return min(window, max(1, math.ceil(round(evict * window, 6))))


def eviction_steps(n_tokens, window, m, policy):
    """Thought indices t before whose write m tokens are evicted: W, W + m, W + 2m, ... below n_tokens."""
    return [] if policy == "full" else list(range(window, n_tokens, m))


@dataclass
class Schedule:
    """Every row's ring: W_i thought slots and m_i tokens per eviction (`full`: W_i = max_new, never evicts)."""
    windows: list  # W_i
    counts: list  # m_i
    policy: str

    @classmethod
    def of(cls, policy, budget, evict, prompt_lens, max_new):
        windows = [thought_slots(policy, budget, n, max_new) for n in prompt_lens]
        return cls(windows, [evict_count(w, evict) for w in windows], policy)

    def steps(self, row, n_tokens):
        """Row's eviction steps below n_tokens."""
        return eviction_steps(n_tokens, self.windows[row], self.counts[row], self.policy)

    def events(self, n_tokens):
        """{t: (rows that evict before writing thought t, their largest m_i)} for t below n_tokens: what the host
        needs to know of an eviction (its shapes); which rows and slots is computed on the device (RingCache.evict)."""
        out = {}
        for row in range(len(self.windows)):
            for t in self.steps(row, n_tokens):
                rows, width = out.get(t, (0, 0))
                out[t] = (rows + 1, max(width, self.counts[row]))
        return out


def attention_mask(key_pos, query_pos, dtype):
    """Additive mask (B, 1, T, S): a query sees the valid keys (position >= 0) at or before its own position.
    Large negative instead of -inf so that a pad query, which sees nothing, stays finite (as transformers does)."""
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_pos.device)  # (B, T, S)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class RingCache:
    """Row i: its prompt in slots [0, len_i), its ring of W_i thought slots in [len_i, len_i + W_i)."""
    k: torch.Tensor  # (L, B, Hkv, S, D)
    v: torch.Tensor  # (L, B, Hkv, S, D)
    pos: torch.Tensor  # (B, S) absolute position held by each slot, -1 when empty, padded or evicted
    lens: torch.Tensor  # (B,) prompt lengths len_i
    windows: torch.Tensor  # (B,) W_i
    counts: torch.Tensor | None = None  # (B,) m_i, tokens per eviction
    longest: int = 0  # max_i len_i
    rows: slice = field(default_factory=lambda: slice(None))  # the rows of a prefill (a chunk of them, or all)
    slots: torch.Tensor | None = None  # (B,) the slot each row writes in the current decode step; None: a prefill
    used: int = 0  # slots [0, used) are attended over
    mask: torch.Tensor | None = None
    static: bool = False  # decode attends over every slot under the mask: shapes that never change (a compiled step)

    @classmethod
    def allocate(cls, cfg, lens, windows, counts, dtype, device):
        """Per-row lists lens, windows (W_i) and counts (m_i): S = max_i(len_i + W_i) slots a row (the budget under
        window and pte)."""
        shape = (cfg.n_layers, len(lens), cfg.n_kv_heads, max(n + w for n, w in zip(lens, windows)), cfg.head_dim)
        tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.full((len(lens), shape[3]), -1, device=device), tensor(lens), tensor(windows),
                   tensor(counts), max(lens))

    @property
    def ring(self):
        """The tensors a compiled decode step takes (decode_step rebuilds a static RingCache from them)."""
        return self.k, self.v, self.pos, self.lens, self.windows

    def write_prompt(self, rows, positions):
        """Before the prefill forward of `rows` (a slice): positions (R, n) of their right-padded prompts, -1 at
        pads. The pads' slots are ring slots that the first thought tokens overwrite."""
        self.pos[rows, :positions.shape[1]] = positions
        self.rows, self.slots, self.used = rows, None, positions.shape[1]
        self.mask = attention_mask(positions, positions, self.k.dtype)

    def write_thought(self, t, positions):
        """Before the forward of thought token t (an int, or a 0-d tensor when static): positions (B,) absolute."""
        self.slots = self.lens + t % self.windows  # (B,)
        self.pos[torch.arange(len(positions), device=positions.device), self.slots] = positions
        self.used = self.pos.shape[1] if self.static else min(self.longest + t + 1, self.pos.shape[1])
        self.mask = attention_mask(self.pos[:, :self.used], positions[:, None], self.k.dtype)

    def evict(self, t, n_rows, width):
        """Before thought t: the rows whose ring is full (t = W_i + j m_i) drop their oldest m_i tokens, thought
        indices [t - W_i, t - W_i + m_i). The host gives only the shapes, from the schedule: n_rows such rows and
        width = their largest m_i; which rows and slots is computed here on the device. Returns rows (R,), slots and
        positions (R, width) (a row with a smaller m_i repeats its last slot), valid (R, width). The evicted keys and
        values stay readable until the next write."""
        due = (t >= self.windows) & ((t - self.windows) % self.counts == 0)  # (B,)
        rows = torch.nonzero_static(due, size=n_rows)[:, 0]  # (R,)
        lens, window, m = self.lens[rows, None], self.windows[rows, None], self.counts[rows, None]  # (R, 1) each
        j = torch.arange(width, device=rows.device)  # (width,)
        thought = t - window + torch.minimum(j, m - 1)  # (R, width)
        slots = lens + thought % window  # (R, width)
        self.pos[rows[:, None], slots] = -1  # a repeated slot writes the same -1
        return rows, slots, lens + thought, j < m

    def update(self, layer, k, v):
        if self.slots is None:  # a prefill: the rows' prompts into slots [0, n); they attend to themselves only
            self.k[layer, self.rows, :, :k.shape[2]], self.v[layer, self.rows, :, :k.shape[2]] = k, v
            return k, v
        rows = torch.arange(k.shape[0], device=k.device)  # one token a row, each into its own ring's slot
        # static: the layer a tensor too, one scatter into the whole cache, which a compiled step does in place
        # (an int selects a view first, and the compiled scatter into that view copies the whole cache)
        at = torch.full_like(rows, layer) if self.static else layer
        self.k[at, rows, :, self.slots], self.v[at, rows, :, self.slots] = k[:, :, 0], v[:, :, 0]
        return self.k[layer, :, :, :self.used], self.v[layer, :, :, :self.used]


class ReplayCache:
    """One training segment's cache. The kept context comes as pieces (L, B, Hkv, n_i, D) (the prompt's, then the
    thought tokens' from the earliest any row still needs); `index` (B, S) picks each row's own keys from them joined
    with the segment's (its prompt, its window, then the segment), key_pos (B, S) their positions (-1: padding).
    So a row attends over at most budget + segment keys, whatever the other rows keep. Layer checkpoints hold this
    object until backward, so it holds nothing of the context's size: the join and the gather are made per use,
    and so is the mask. index None: the pieces are the row's keys as they are (a prefill). `new_k`/`new_v`
    collect what the segment wrote, for the segments after it."""

    def __init__(self, past_k, past_v, index, key_pos, query_pos, dtype):
        self.past_k, self.past_v, self.index, self.key_pos = past_k, past_v, index, key_pos
        self.query_pos, self.dtype = query_pos, dtype
        self.new_k, self.new_v = [None] * len(past_k[0]), [None] * len(past_v[0])

    @property
    def mask(self):
        return attention_mask(self.key_pos, self.query_pos, self.dtype)  # (B, 1, n, S)

    def rows_keys(self, pieces, layer, new):
        joined = torch.cat([p[layer] for p in pieces] + [new], 2)  # (B, Hkv, N, D)
        if self.index is None:
            return joined
        return joined.gather(2, self.index[:, None, :, None].expand(-1, joined.shape[1], -1, joined.shape[3]))

    def update(self, layer, k, v):
        self.new_k[layer], self.new_v[layer] = k, v
        return self.rows_keys(self.past_k, layer, k), self.rows_keys(self.past_v, layer, v)  # (B, Hkv, S, D) each


class MaskedForward:
    """No past: one forward over a whole sequence under an explicit additive mask (B, 1, T, T)."""

    def __init__(self, mask):
        self.mask = mask

    def update(self, layer, k, v):
        return k.contiguous(), v.contiguous()
