"""The fixed-size KV cache of SPEC section 2: prompt slots pinned, a ring of W thought slots, absolute positions.

A batch's prompts are left-padded to P tokens and written once into slots [0, P) (pads masked, never evicted).
Thought token t (0-based) goes to slot P + t % W. Before token t is written, a full ring (W tokens) drops its
oldest m = ceil(evict * W) tokens at once, so evictions happen before tokens W, W + m, W + 2m, ... in every
row (rows decode in lockstep). Keys are stored after RoPE at their absolute positions and never re-rotated;
`unrotate` gives the encoder the keys as they were before RoPE. The policies share one code path: `full` is
a ring as long as the generation that never fills, `window` and `pte` evict (and `pte` encodes what leaves).

Three caches speak the model's cache protocol (`update(layer, k, v) -> keys, values` and `mask`):
- `RingCache`: generation. Preallocated, written in place, no autograd; memory fixed by the budget.
- `ReplayCache`: training (rollout.score). One segment's view: the kept context, given as pieces, with the
  segment's own keys appended out of place, so that gradients flow through the cache.
- `MaskedForward`: no past, one forward over a whole sequence under an explicit mask (references, the toy's build).
Minimum budget (our choice, the paper has none): at least 4 thought slots, so that an eviction leaves a window.
"""
import math
from dataclasses import dataclass

import torch

from model import apply_rope, rope_cos_sin

MIN_THOUGHT_SLOTS = 4


def thought_slots(policy, budget, prompt_len, max_new):
    """W: ring size. `full` keeps all max_new tokens; `window`/`pte` get what the budget leaves after the prompt."""
    if policy == "full":
        return max(max_new, 1)
    window = budget - prompt_len
    if window < MIN_THOUGHT_SLOTS:
        raise ValueError(f"cache budget {budget} leaves {window} thought slots after a {prompt_len}-token prompt; "
                         f"need at least {MIN_THOUGHT_SLOTS}: raise --cache to {prompt_len + MIN_THOUGHT_SLOTS} or more, or use shorter prompts")
    return window


def evict_count(window, evict):
    """m = ceil(evict * W), rounded first so that 0.1 * 30 gives 3, not 4."""
    if not 0 < evict <= 1:
        raise ValueError(f"--evict must be in (0, 1], got {evict}")
    return min(window, max(1, math.ceil(round(evict * window, 6))))


def eviction_steps(n_tokens, window, m, policy):
    """Thought indices t before whose write m tokens are evicted: W, W + m, W + 2m, ... below n_tokens."""
    return [] if policy == "full" else list(range(window, n_tokens, m))


def attention_mask(key_pos, query_pos, dtype):
    """Additive mask (B, 1, T, S): a query sees the valid keys (position >= 0) at or before its own position.
    Large negative instead of -inf so that a pad query, which sees nothing, stays finite (as transformers does)."""
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])  # (B, T, S)
    return torch.zeros(allowed.shape, dtype=dtype, device=key_pos.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def unrotate(keys, positions, inv_freq):
    """Keys after RoPE (..., B, Hkv, m, D) at positions (B, m) -> the keys before RoPE."""
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)  # (B, 1, m, D)
    return apply_rope(keys.float(), cos, -sin).to(keys.dtype)


@dataclass
class RingCache:
    k: torch.Tensor  # (L, B, Hkv, P + W, D)
    v: torch.Tensor  # (L, B, Hkv, P + W, D)
    pos: torch.Tensor  # (B, P + W) absolute position held by each slot, -1 when empty, padded or evicted
    prompt_slots: int
    window: int
    start: int = 0  # first slot written by the current forward
    used: int = 0  # slots [0, used) are attended over
    mask: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cfg, batch, prompt_slots, window, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, prompt_slots + window, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.full((batch, prompt_slots + window), -1, dtype=torch.long, device=device), prompt_slots, window)

    def write_prompt(self, positions):
        """Before the prefill forward: positions (B, P) of the left-padded prompts, -1 at pads."""
        self.pos[:, :self.prompt_slots] = positions
        self.start, self.used = 0, self.prompt_slots
        self.mask = attention_mask(self.pos[:, :self.used], positions, self.k.dtype)

    def write_thought(self, t, positions):
        """Before the forward of thought token t: positions (B,) absolute."""
        self.start = self.prompt_slots + t % self.window
        self.pos[:, self.start] = positions
        self.used = max(self.used, self.start + 1)
        self.mask = attention_mask(self.pos[:, :self.used], positions[:, None], self.k.dtype)

    def evict(self, first, m):
        """Drop thought tokens first .. first+m-1 (the oldest); return their slots (m,) and positions (B, m): their
        keys and values stay readable until the next write, for pte to fold them in."""
        slots = torch.tensor([self.prompt_slots + (first + j) % self.window for j in range(m)], device=self.pos.device)
        positions = self.pos[:, slots]
        self.pos[:, slots] = -1
        return slots, positions

    def update(self, layer, k, v):
        end = self.start + k.shape[2]
        self.k[layer, :, :, self.start:end] = k
        self.v[layer, :, :, self.start:end] = v
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
