"""The decoder-only transformer of the Qwen2/Qwen2.5 and Llama/Llama-3 families, and its loader.

One module, written to be read next to docs/method.md §1: RMSNorm in fp32, rotate-half RoPE (Hugging Face
layout, with Llama-3 frequency scaling), grouped-query attention, SwiGLU, q/k/v bias when the checkpoint
has one, tied or untied `lm_head`. Two hooks make it the base of everything else without subclassing:
- `cache`: any object with `update(layer, k, v) -> (keys, values)` and `mask` (B, 1, T, S); keys arrive
  after RoPE at absolute positions (cache.py has the ring buffer of generation and the replay view of training);
- `adapter` + `cores`: per-layer low-rank updates added to the chosen linears (encoder.py); `cores` is the
  thought encoder's state S, one (B, r, r) matrix per layer, or None for plain LoRA.
`load()` reads Hugging Face folders (one safetensors file or shards) by path or by registry name, and fails
with a message that names the problem. Departure from `transformers`: none intended; tests prove parity.
Speed: decoding attends with one query per row through two plain matmuls (`attend_one`, no copy of the cache per
query head), and on the CPU (fp32, no grad) may run the linears through oneDNN's blocked copy of the weights
(`packed_weights`; in a compiled decode step through `packed_linear`). Masked attention over several queries expands
the KV heads on cuda (`attend_masked`).
"""
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    qkv_bias: bool
    o_bias: bool
    tie_embeddings: bool
    eos_ids: tuple = ()

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


SUPPORTED = ("qwen2", "llama")
COUNT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size")
SCALE_KEYS = ("rms_norm_eps", "rope_theta")


def eos_ids(value, where) -> tuple:
    """eos_token_id of a config (an id, a list of ids or none) as a tuple."""
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def config_from_hf(hf: dict, where="config.json") -> ModelConfig:
    """Translate a Hugging Face config.json (old `rope_theta` or new `rope_parameters` form) and refuse what we do
    not implement."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    kind = hf.get("model_type")
    for keys, kinds, what in ((COUNT_KEYS, int, "a positive integer"), (SCALE_KEYS, (int, float), "a positive number")):
        for key in keys:
            value = hf.get(key)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) or not value > 0):
                raise ValueError(f"{where}: {key} must be {what}, got {value!r}")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"{where}: {key} must be an object, got {hf[key]!r}")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        raise ValueError(f"{where}: tie_word_embeddings must be true or false, got {hf['tie_word_embeddings']!r}")
    if kind not in SUPPORTED:
        raise ValueError(f"{where}: model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)} "
                         "(Qwen2/Qwen2.5, Llama/Llama-3)")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or hf.get("use_sliding_window"):
        raise ValueError(f"{where}: unsupported option (hidden_act other than silu, mlp_bias or use_sliding_window)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"{where}: rope scaling {scaling.get('rope_type')!r} is not supported (only llama3)")
    try:
        heads = hf["num_attention_heads"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn_dim=hf["intermediate_size"], rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
            qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias")),
            o_bias=kind == "llama" and bool(hf.get("attention_bias")),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_ids=eos_ids(hf.get("eos_token_id"), where))
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e}") from None


# ---------------------------------------------------------------------------------------------------- layers

def wide(x):
    """x in fp32 at least: bf16/fp16 statistics in fp32, as transformers computes them; fp64 stays (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x, weight, eps):
    # statistics in fp32, cast back before the weight, exactly as transformers does
    return weight * F.rms_norm(wide(x), x.shape[-1:], eps=eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)  # (D/2,)
    s = cfg.rope_scaling
    if s:  # Llama-3: slow down low frequencies by `factor`, keep high ones, interpolate between
        wavelen = 2 * math.pi / inv_freq
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                  / (s["high_freq_factor"] - s["low_freq_factor"]))
        mid = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wl, inv_freq / s["factor"], torch.where(wavelen < high_wl, inv_freq, mid))
    return inv_freq.float()


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) int -> cos, sin (B, 1, T, D), computed in fp32 like transformers."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE: dims [0, D/2) pair with [D/2, D). Un-rotate with `apply_rope(x, cos, -sin)`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # private ops


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# the same as an op torch.compile calls as is: inductor cannot lower oneDNN's opaque blocked tensor
packed_linear = torch.library.custom_op("pte::packed_linear", onednn_linear, mutates_args=())
packed_linear.register_fake(lambda x, packed, bias: x.new_empty(*x.shape[:-1], packed.shape[0]))


def dense(x, linear):
    """linear(x), through oneDNN with the blocked copy of the weight that `packed_weights` made, if any."""
    if hasattr(linear, "packed"):  # eager calls the oneDNN op itself: the custom op's dispatch costs time
        return (packed_linear if torch.compiler.is_compiling() else onednn_linear)(x, linear.packed, linear.bias)
    return F.linear(x, linear.weight, linear.bias)


@contextmanager
def packed_weights(model):
    """No-grad use only. Within: every fp32 CPU linear of `model` also holds its weight in oneDNN's blocked layout
    (one more copy of the weights, dropped on exit) for `dense`; elsewhere a no-op. At decode shapes (8 rows)
    F.linear's MKL sgemm repacks the weight on every call; the blocked copy is packed once per generate call."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"] if ONEDNN else []
    for m in linears:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight)
    try:
        yield
    finally:
        for m in linears:
            del m.packed


def attend_one(q, k, v, mask):
    """Attention of one query per row (decode): q (B, H, 1, D), k, v (B, Hkv, S, D), mask (B, 1, 1, S) -> (B, H, 1, D).
    The H / Hkv queries of a KV head are the narrow side of two matmuls, so each key and value is read once."""
    B, H, _, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], D) * D ** -0.5  # (B, Hkv, G, D)
    scores = (k @ q.transpose(-1, -2)).transpose(-1, -2) + mask  # (B, Hkv, G, S)
    return (torch.softmax(wide(scores), -1).to(v.dtype) @ v).view(B, H, 1, D)  # at least fp32, like SDPA's


def attend_masked(q, k, v, mask, expand=None):
    """SDPA of q (B, H, T, D) over k, v (B, Hkv, S, D) under an additive mask (B, 1, T, S). PyTorch's fused kernels
    do not take GQA together with an explicit mask: given enable_gqa they fall back to the math kernel, which
    copies K and V once per query head anyway and materialises the scores in fp32. On cuda the KV heads are
    therefore expanded here, one copy, and the memory-efficient kernel runs (bench.py --gpu prints which ran)."""
    if not (q.device.type == "cuda" if expand is None else expand) or k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    B, Hkv, S, D = k.shape
    k, v = (x[:, :, None].expand(B, Hkv, q.shape[1] // Hkv, S, D).reshape(B, q.shape[1], S, D) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Block(nn.Module):
    """One decoder layer. Parameter names follow Hugging Face so that checkpoints load by name."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, q_dim = cfg.dim, cfg.n_heads * cfg.head_dim
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(d))
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.ones(d))
        self.self_attn = nn.ModuleDict(dict(
            q_proj=nn.Linear(d, q_dim, bias=cfg.qkv_bias), k_proj=nn.Linear(d, cfg.kv_dim, bias=cfg.qkv_bias),
            v_proj=nn.Linear(d, cfg.kv_dim, bias=cfg.qkv_bias), o_proj=nn.Linear(q_dim, d, bias=cfg.o_bias)))
        self.mlp = nn.ModuleDict(dict(
            gate_proj=nn.Linear(d, cfg.ffn_dim, bias=False), up_proj=nn.Linear(d, cfg.ffn_dim, bias=False),
            down_proj=nn.Linear(cfg.ffn_dim, d, bias=False)))

    def linear(self, group, name, x, adapter, core):
        y = dense(x, group[name + "_proj"])
        return y if adapter is None or name not in adapter.targets else y + adapter.delta(self.layer, name, x, core)

    def forward(self, x, cos, sin, cache, adapter, core):
        cfg, attn, mlp = self.cfg, self.self_attn, self.mlp
        B, T, _ = x.shape
        h = rms_norm(x, self.input_layernorm.weight, cfg.rms_eps)
        # q: (B, H, T, D); k, v: (B, Hkv, T, D)
        q = self.linear(attn, "q", h, adapter, core).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.linear(attn, "k", h, adapter, core).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.linear(attn, "v", h, adapter, core).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, D)
        else:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D): everything this chunk may see, itself included
            o = attend_one(q, k, v, cache.mask) if T == 1 else attend_masked(q, k, v, cache.mask)  # (B, H, T, D)
        x = x + self.linear(attn, "o", o.transpose(1, 2).reshape(B, T, -1), adapter, core)
        h = rms_norm(x, self.post_attention_layernorm.weight, cfg.rms_eps)
        gate_up = (F.silu(self.linear(mlp, "gate", h, adapter, core))
                   * self.linear(mlp, "up", h, adapter, core))  # (B, T, F)
        return x + self.linear(mlp, "down", gate_up, adapter, core)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.dim))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def hidden(self, tokens, positions=None, cache=None, adapter=None, cores=None, checkpoint_layers=False):
        """tokens (B, T) -> final-normed hidden states (B, T, d). Without a cache, a causal forward from position 0.
        checkpoint_layers: backward keeps each layer's input only and recomputes the layer (one more forward)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # (B, T, d)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            args = (x, cos, sin, cache, adapter, None if cores is None else cores[layer.layer])
            x = checkpoint(layer, *args, use_reentrant=False) if checkpoint_layers else layer(*args)  # (B, T, d)
        return rms_norm(x, self.norm.weight, self.config.rms_eps)

    def forward(self, tokens, positions=None, cache=None, adapter=None, cores=None):
        return self.lm_head(self.hidden(tokens, positions, cache, adapter, cores))  # (B, T, V)


# ---------------------------------------------------------------------------------------------------- loading

SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "rope_theta")


def _hf(shape, model_type="qwen2", eps=1e-6, scaling=None, eos=151645):
    """A Hugging Face config.json from shape = (layers, d, ffn, heads, KV heads, vocab, tied, rope theta)."""
    return dict(zip(SHAPE_KEYS, shape), model_type=model_type, rms_norm_eps=eps, rope_scaling=scaling,
                eos_token_id=eos)


# name -> (Hugging Face repo, its config: the shapes of docs/method.md §1, for random-weight models of real size)
REGISTRY = {
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", _hf((24, 896, 4864, 14, 2, 151936, True, 1e6))),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", _hf((28, 1536, 8960, 12, 2, 151936, True, 1e6))),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", _hf((36, 2048, 11008, 16, 2, 151936, True, 1e6))),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", _hf((28, 3584, 18944, 28, 4, 152064, False, 1e6))),
    "r1-llama-8b": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", _hf(
        (32, 4096, 14336, 32, 8, 128256, False, 5e5), "llama", 1e-5, eos=128001,
        scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192))),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", _hf(
        (30, 576, 1536, 9, 3, 49152, True, 1e5), "llama", 1e-5, eos=2)),
    "toy": (None, None),  # ships in this repository: toy/ (built by experiments/toy.py)
}
TOY_DIR = Path(__file__).resolve().parent / "toy"


def resolve(name_or_path) -> Path:
    """A folder, else a registry name: the local Hugging Face cache, else a download when huggingface_hub is
    installed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == "toy":
        if not (TOY_DIR / "config.json").exists():
            raise FileNotFoundError(f"the toy model is missing from {TOY_DIR}; rebuild it with: "
                                    "python experiments/toy.py build")
        return TOY_DIR
    if name_or_path not in REGISTRY:
        if os.sep in str(name_or_path) or path.suffix:
            raise FileNotFoundError(f"model folder not found: {path}")
        raise ValueError(f"unknown model {name_or_path!r}: give a Hugging Face folder or one of {', '.join(REGISTRY)}")
    repo = REGISTRY[name_or_path][0]
    hub = Path(os.environ.get("HF_HUB_CACHE")
               or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub")
    snapshots = sorted((hub / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*/config.json"),
                       key=os.path.getmtime)
    if snapshots:
        return snapshots[-1].parent
    why = "huggingface_hub is not installed"
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except ImportError:
        pass
    except Exception as e:  # offline, gated, no disk: say so below instead of a hub stack trace
        why = f"the download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise FileNotFoundError(f"model {name_or_path!r} ({repo}) is not on this machine and {why}.\n"
                            f"Download it with:  huggingface-cli download {repo}\n"
                            f"(or pass the path of a Hugging Face folder holding config.json and *.safetensors)")


def read_json(path) -> dict:
    """The JSON object of a file; a missing, malformed or non-object file is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(folder: Path) -> ModelConfig:
    cfg = config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    gen = folder / "generation_config.json"
    if gen.exists():  # instruct models stop on more ids than config.json names (Qwen2.5: <|im_end|> and <|endoftext|>)
        cfg.eos_ids = tuple(dict.fromkeys((*cfg.eos_ids, *eos_ids(read_json(gen).get("eos_token_id"), str(gen)))))
    return cfg


def read_safetensors(folder: Path) -> dict:
    """All tensors of one model.safetensors or of the shards that model.safetensors.index.json names."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard named by the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt? ({e})") from None
    return tensors


def load(name_or_path, dtype=None, device="cpu") -> Transformer:
    """A model by registry name or Hugging Face folder. dtype default: the checkpoint's on GPU, fp32 on CPU."""
    device = torch.device(device)
    folder = resolve(name_or_path)
    cfg = read_config(folder)
    tensors = {k.removeprefix("model."): v for k, v in read_safetensors(folder).items() if "rotary_emb" not in k}
    if "lm_head.weight" not in tensors:  # no separate head on disk: it is the embedding
        cfg.tie_embeddings = True
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k}: {tuple(v.shape)} on disk, {tuple(expected[k].shape)} expected" for k, v in tensors.items()
             if k in expected and v.shape != expected[k].shape]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)):
        if names:
            raise ValueError(f"{folder}: {len(names)} tensor(s) {what}: "
                             f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    broken = [k for k, v in tensors.items() if not torch.isfinite(v).all()]  # else generation is silently garbage
    if broken:
        raise ValueError(f"{folder}: {len(broken)} tensor(s) hold NaN or infinite values: {', '.join(broken[:5])}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(name_or_path):
    """The `tokenizers` tokenizer of a model folder or registry name; a missing or damaged tokenizer.json is named."""
    from tokenizers import Tokenizer
    path = resolve(name_or_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model folder has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception that names no file
        raise ValueError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
