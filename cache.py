"""The fixed-size KV cache of SPEC section 2: prompt slots pinned, a ring of thought slots per row, absolute positions.

A batch's prompts are left-padded to P tokens and written once into slots [0, P) (pads masked, never evicted).
The budget is per sequence, as a serving engine gives each sequence its own cache: row i's ring holds
W_i = budget - len(prompt_i) thought slots, whatever the other rows' prompts are, and evicts m_i = ceil(evict * W_i)
at a time. Thought token t of row i goes to slot P + t % W_i; before it is written, a full ring drops its oldest
m_i tokens at once, so row i evicts before tokens W_i, W_i + m_i, W_i + 2 m_i, ... Rows of different prompt lengths
evict at different steps (per-row schedules, the faithful reading: no row loses any of its window to padding).
Keys are stored after RoPE at their absolute positions and never re-rotated; `unrotate` gives the encoder the keys
as they were before RoPE. The policies share one code path: `full` is a ring as long as the generation that never
fills, `window` and `pte` evict (and `pte` encodes what leaves).

Three caches speak the model's cache protocol (`update(layer, k, v) -> keys, values` and `mask`):
- `RingCache`: generation. Preallocated, written in place, no autograd; memory fixed by the budget.
- `ReplayCache`: training (rollout.score). One segment's view: the kept context, given as pieces, with the
  segment's own keys appended out of place, so that gradients flow through the cache.
- `MaskedForward`: no past, one forward over a whole sequence under an explicit mask (references, the toy's build).
Minimum window (our choice, the paper has none): 4 thought slots, so that an eviction leaves a window. Prompts that
leave less are set aside when the data is loaded (data.py); here they are an error.
"""
import math
from dataclasses import dataclass

import torch

from model import apply_rope, rope_cos_sin, wide

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
    """m = ceil(evict * W), rounded first so that 0.1 * 30 gives 3, not 4."""
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

    def evicting(self, n_tokens):
        """{t: [rows that evict before writing thought t]} for t below n_tokens."""
        out = {}
        for row in range(len(self.windows)):
            for t in self.steps(row, n_tokens):
                out.setdefault(t, []).append(row)
        return out


def attention_mask(key_pos, query_pos, dtype):
    """Additive mask (B, 1, T, S): a query sees the valid keys (position >= 0) at or before its own position.
    Large negative instead of -inf so that a pad query, which sees nothing, stays finite (as transformers does)."""
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_pos.device)  # (B, T, S)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def unrotate(keys, positions, inv_freq):
    """Keys after RoPE (..., B, Hkv, m, D) at positions (B, m) -> the keys before RoPE."""
    cos, sin = rope_cos_sin(inv_freq, positions, wide(keys).dtype)  # (B, 1, m, D)
    return apply_rope(wide(keys), cos, -sin).to(keys.dtype)


@dataclass
class RingCache:
    k: torch.Tensor  # (L, B, Hkv, P + max W_i, D)
    v: torch.Tensor  # (L, B, Hkv, P + max W_i, D)
    pos: torch.Tensor  # (B, P + max W_i) absolute position held by each slot, -1 when empty, padded or evicted
    windows: torch.Tensor  # (B,) W_i: row i's ring is slots [P, P + W_i)
    prompt_slots: int
    slots: torch.Tensor | None = None  # (B,) the slot each row writes in the current decode step; None: the prefill
    used: int = 0  # slots [0, used) are attended over
    mask: torch.Tensor | None = None
    static: bool = False  # decode attends over every slot under the mask: shapes that never change (a compiled step)

    @classmethod
    def allocate(cls, cfg, batch, prompt_slots, windows, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, prompt_slots + max(windows), cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.full((batch, shape[3]), -1, dtype=torch.long, device=device),
                   torch.tensor(windows, device=device), prompt_slots)

    def write_prompt(self, positions):
        """Before the prefill forward: positions (B, P) of the left-padded prompts, -1 at pads."""
        self.pos[:, :self.prompt_slots] = positions
        self.slots, self.used = None, self.prompt_slots
        self.mask = attention_mask(self.pos[:, :self.used], positions, self.k.dtype)

    def write_thought(self, t, positions):
        """Before the forward of thought token t (an int, or a 0-d tensor when static): positions (B,) absolute."""
        self.slots = self.prompt_slots + t % self.windows  # (B,)
        self.pos[torch.arange(len(positions), device=positions.device), self.slots] = positions
        self.used = self.pos.shape[1] if self.static else min(self.prompt_slots + t + 1, self.pos.shape[1])
        self.mask = attention_mask(self.pos[:, :self.used], positions[:, None], self.k.dtype)

    def evict(self, rows, slots, valid):
        """Drop the oldest thought tokens of `rows` (R,): their slots (R, m), valid (R, m) where a row evicts fewer
        than m. Returns their positions (R, m); their keys and values stay readable until the next write."""
        positions = self.pos[rows[:, None], slots]  # (R, m)
        self.pos[rows[:, None].expand_as(slots)[valid], slots[valid]] = -1  # a pad's slot may repeat a valid one
        return positions

    def update(self, layer, k, v):
        if self.slots is None:  # the prefill: slots [0, P)
            self.k[layer, :, :, :k.shape[2]], self.v[layer, :, :, :k.shape[2]] = k, v
        else:  # one token a row, each into its own ring's slot
            rows = torch.arange(k.shape[0], device=k.device)
            # static: the layer a tensor too, one scatter into the whole cache, which a compiled step does in place
            # (an int selects a view first, and the compiled scatter into that view copies the whole cache)
            at = torch.full_like(rows, layer) if self.static else layer
            self.k[at, rows, :, self.slots], self.v[at, rows, :, self.slots] = k[:, :, 0], v[:, :, 0]
        return self.k[layer, :, :, :self.used], self.v[layer, :, :, :self.used]


class ReplayCache:
    """One training segment's cache: the kept context as pieces (L, B, Hkv, n_i, D) (the prompt's, then the
    window's), and the segment's own keys, appended out of place one layer at a time. Layer checkpoints hold this
    object until backward, so it holds nothing of the context's size: no joined copy, and the mask is rebuilt from
    the positions on each use. `new_k`/`new_v` collect what the segment wrote, for the segments after it."""

    def __init__(self, past_k, past_v, key_pos, query_pos, dtype):
        self.past_k, self.past_v, self.key_pos, self.query_pos, self.dtype = past_k, past_v, key_pos, query_pos, dtype
        self.new_k, self.new_v = [None] * len(past_k[0]), [None] * len(past_v[0])

    @property
    def mask(self):
        return attention_mask(self.key_pos, self.query_pos, self.dtype)  # (B, 1, n, S)

    def update(self, layer, k, v):
        self.new_k[layer], self.new_v[layer] = k, v
        return torch.cat([p[layer] for p in self.past_k] + [k], 2), torch.cat([p[layer] for p in self.past_v] + [v], 2)


class MaskedForward:
    """No past: one forward over a whole sequence under an explicit additive mask (B, 1, T, T)."""

    def __init__(self, mask):
        self.mask = mask

    def update(self, layer, k, v):
        return k.contiguous(), v.contiguous()
