"""The thought encoder and its dynamic adapters (docs/method.md §3-§4): the only trainable part; the base model is
frozen.

Every adapted linear y = W x + b gets y += (alpha / r) * B (S (A x)), with A (r, d_in) and B (d_out, r) of its
own and S the (r, r) core of its layer and row. Plain LoRA (`full` and `window`) is the same code with S = I.
Under `pte` each layer's S starts from its global tokens and folds in every batch of evicted keys and values:

    S'(K, V) = (q_g W_Q) (K W_K)^T (V W_V) / len(K)     (linear attention of r query slots, no softmax)
    S(0)     = Normalize(S'(k_g, v_g))                   ("global-0": S(0) = 0)
    eviction: S <- Normalize(S + S'(K_e, V_e))           ("global-only": S stays S(0))
    Normalize(X) = sqrt(r) X / (||X||_F + eps)           (the Frobenius norm of the r x r identity)

Our reading where the paper is silent (docs/method.md §10): per-layer parameters, K_e/V_e with all KV heads
concatenated and keys un-rotated to their pre-RoPE values, the 1/len scaling, the Frobenius normalisation.
paper: W_V initialised like W_K; here: at a tenth of that scale, so that one eviction adds to S instead of
replacing it (at the usual scale ||S'|| outweighs ||S||, and every eviction mostly replaced the memory).
Adapter init (paper: silent beyond LoRA). Default LoRA's: A random, B = 0, so the first updates go to B with gradient
g (S A x)^T: one random projection S A x of S, alike at every position. `b_init` > 0 swaps it: A = 0,
B ~ N(0, b_init^2), so the first updates go to A with gradient S^T B^T g x^T: all of S, at the inputs x where the loss
speaks. Both start at the base model and both leave S without gradient at step 0. On the toy the swap took GRPO off
chance where the default stalled (docs/method.md §10); the argument does not depend on the model's size, but it is
unmeasured on real models, whose default therefore stays LoRA's (`--b-init` turns it on).
`param_groups`: the thought encoder may take its own learning rate (`--encoder-lr`). Under LoRA's init its steps
moved S, and through the readout every position's output, faster than the readout learned to use it (the toy's chain
broke); under A = 0 only the positions where the loss speaks read S, and the toy learns best with the encoder at the
adapters' rate (docs/method.md §10).
Adapter parameters are kept in fp32 (AdamW steps of 1e-5 vanish in bf16) and cast to the activations' dtype.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MODES = ("lora", "pte", "global-0", "global-only")  # lora: S = I; the other three evict and encode


@dataclass
class AdapterConfig:
    mode: str = "pte"
    rank: int = 32
    alpha: float = 32.0  # alpha / r = 1: the update starts at the scale of a plain LoRA with an identity core
    n_globals: int = 32
    targets: tuple = ("q", "k", "v", "o")
    b_init: float = 0.0  # 0: LoRA's init (A random, B = 0); > 0: A = 0 and B ~ N(0, b_init^2), the readout learns first

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.mode not in MODES:
            raise ValueError(f"adapter mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if bad := [t for t in self.targets if t not in TARGETS]:
            raise ValueError(f"unknown adapter target(s) {bad}: choose from {', '.join(TARGETS)}")
        if self.rank < 1 or (self.mode == "pte" and self.n_globals < 1):
            raise ValueError("rank must be >= 1, and pte needs >= 1 global token "
                             "(the ablation without them is mode 'global-0')")


def _shapes(cfg, target):
    """(d_in, d_out) of each adaptable linear."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_dim
    return dict(q=(cfg.dim, q), k=(cfg.dim, kv), v=(cfg.dim, kv), o=(q, cfg.dim),
                gate=(cfg.dim, cfg.ffn_dim), up=(cfg.dim, cfg.ffn_dim), down=(cfg.ffn_dim, cfg.dim))[target]


def normalize(x, eps=1e-6):
    r = x.shape[-1]
    return r ** 0.5 * x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)


class Adapter(nn.Module):
    def __init__(self, model_cfg, cfg: AdapterConfig):
        super().__init__()
        self.cfg, self.targets, self.scale = cfg, cfg.targets, cfg.alpha / cfg.rank
        L, r, d_kv = model_cfg.n_layers, cfg.rank, model_cfg.kv_dim
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for layer in range(L):
            for t in cfg.targets:
                d_in, d_out = _shapes(model_cfg, t)
                # one of A, B is zero: every variant starts as the base model
                a, b = (torch.randn(r, d_in) / d_in ** 0.5, torch.zeros(d_out, r)) if not cfg.b_init else \
                    (torch.zeros(r, d_in), torch.randn(d_out, r) * cfg.b_init)
                self.A[f"{t}{layer}"], self.B[f"{t}{layer}"] = nn.Parameter(a), nn.Parameter(b)
        if cfg.mode != "lora":
            self.q_g = nn.Parameter(torch.randn(L, r, d_kv) / d_kv ** 0.5)
            self.W_Q = nn.Parameter(torch.randn(L, d_kv, r) / d_kv ** 0.5)
            self.W_K = nn.Parameter(torch.randn(L, d_kv, r) / d_kv ** 0.5)
            self.W_V = nn.Parameter(torch.randn(L, d_kv, r) / d_kv ** 0.5 / 10)
            if cfg.mode != "global-0":
                self.k_g = nn.Parameter(torch.randn(L, cfg.n_globals, d_kv))
                self.v_g = nn.Parameter(torch.randn(L, cfg.n_globals, d_kv))

    @property
    def encodes(self):
        return self.cfg.mode != "lora"

    def delta(self, layer, target, x, core):
        """x (B, T, d_in), core (B, r, r) or None (identity) -> the update (B, T, d_out)."""
        h = x @ self.A[f"{target}{layer}"].to(x.dtype).T  # (B, T, r)
        if core is not None:
            h = h @ core.to(x.dtype).transpose(1, 2)  # S (A x) per token
        return self.scale * (h @ self.B[f"{target}{layer}"].to(x.dtype).T)  # (B, T, d_out)

    def encode(self, k, v, layers=slice(None), valid=None):
        """S'(K, V) of the layers (all by default): k, v (L, B, m, d_kv) -> (L, B, r, r), in fp32.
        valid (B, m): the tokens of each row (rows evict different counts; the others are padding and count nothing)."""
        k, v = k.to(self.W_K.dtype), v.to(self.W_V.dtype)  # fp32 (the adapter's dtype), whatever the model's
        v = v if valid is None else v * valid[..., None]  # (L, B, m, d_kv)
        count = k.shape[2] if valid is None else valid.sum(-1).clamp(min=1)[:, None, None]  # len(K) of each row
        query = self.q_g[layers] @ self.W_Q[layers]  # (L, r, r)
        kv = (k @ self.W_K[layers, None]).transpose(2, 3) @ (v @ self.W_V[layers, None])  # (L, B, r, r)
        return query[:, None] @ kv / count

    def initial_cores(self, batch):
        """S(0) for a batch: (L, B, r, r), or None for plain LoRA (identity core)."""
        if not self.encodes:
            return None
        L, r = self.W_Q.shape[0], self.cfg.rank
        if self.cfg.mode == "global-0":
            return torch.zeros(L, batch, r, r, device=self.W_Q.device)
        return normalize(self.encode(self.k_g[:, None], self.v_g[:, None])).expand(L, batch, r, r)

    def update_cores(self, cores, k, v, layers=slice(None), valid=None):
        """Fold evicted keys (un-rotated) and values (L, B, m, d_kv) into the layers' S (L, B, r, r); valid as encode's.
        Returns (new cores, ||S'|| / ||S|| averaged: a 0-d tensor, read without a device sync per layer)."""
        if self.cfg.mode == "global-only":
            return cores, cores.new_zeros(())
        new = self.encode(k, v, layers, valid)
        ratio = (torch.linalg.matrix_norm(new) / torch.linalg.matrix_norm(cores).clamp(min=1e-12)).mean()
        return normalize(cores + new), ratio


def trainable(adapter):
    return [p for p in adapter.parameters() if p.requires_grad]


ENCODER_PARAMS = ("q_g", "W_Q", "W_K", "W_V", "k_g", "v_g")


def param_groups(adapter, lr, encoder_lr=None):
    """AdamW parameter groups: the adapters' A and B at lr, the thought encoder's parameters at encoder_lr
    (default lr)."""
    named = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    encoder = [p for n, p in named if n in ENCODER_PARAMS]
    groups = [dict(params=[p for n, p in named if n not in ENCODER_PARAMS], lr=lr)]
    return groups + [dict(params=encoder, lr=lr if encoder_lr is None else encoder_lr)] * bool(encoder)


def save_adapter(adapter, folder, **extra):
    """adapter.safetensors + adapter.json (its settings and the shapes of the model it belongs to)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in adapter.state_dict().items()},
              str(folder / "adapter.safetensors"))
    (folder / "adapter.json").write_text(json.dumps(dict(adapter=asdict(adapter.cfg), **extra), indent=1))


def load_adapter(folder, model_cfg, device="cpu"):
    """The adapter saved in `folder`, checked against the model it is loaded into."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "adapter.json").exists() or not (folder / "adapter.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no adapter.json and adapter.safetensors (written by train.py)")
    try:
        meta = json.loads((folder / "adapter.json").read_text())
        adapter = Adapter(model_cfg, AdapterConfig(**meta["adapter"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / 'adapter.json'}: malformed ({e})") from None
    try:
        tensors = load_file(str(folder / "adapter.safetensors"))
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{folder / 'adapter.safetensors'} is unreadable, truncated or corrupt ({e})") from None
    broken = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{folder / 'adapter.safetensors'}: NaN or infinite values in {', '.join(broken[:4])}")
    expected = adapter.state_dict()
    bad = sorted(set(expected) ^ set(tensors)) + [k for k in expected
                                                  if k in tensors and tensors[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{folder}: this adapter does not fit the model (mismatched tensors: {', '.join(bad[:4])}): "
                         f"it was trained for another model or adapter shape")
    adapter.load_state_dict(tensors)
    return adapter.to(device)
