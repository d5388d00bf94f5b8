"""model.py: logits equal to `transformers` on every checkpoint form we read, the loader's errors, the registry shapes,
and cached token-by-token decoding equal to one full forward."""
import contextlib
import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import rollout
from cache import RingCache
from conftest import chatml, tiny_hf

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
SCALED = dict(rope_theta=500.0, rope_scaling=LLAMA3)  # D = 8: wavelengths 6, 30, 140, 663 hit all three llama3 branches


def hf_model(kind, **overrides):
    """tiny_hf on a copy: transformers edits the rope_scaling dict it is given."""
    return tiny_hf(kind, **copy.deepcopy(overrides))


def random_tokens(shape, vocab=97, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(folder, hf, T=80):
    """Largest |logit difference| between our load of `folder` and the transformers model, on 2 rows of T > 32
    tokens."""
    tokens = random_tokens((2, T), hf.config.vocab_size)
    with torch.no_grad():
        return (M.load(folder)(tokens) - hf(tokens).logits).abs().max().item()


def saved(tmp_path, hf, **save_kwargs):
    hf.save_pretrained(tmp_path, **save_kwargs)
    return tmp_path


# ---------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("kind, overrides", [
    ("qwen2", {}),  # q/k/v biases, untied head
    ("qwen2", dict(tie_word_embeddings=True)),  # no lm_head.weight on disk
    ("llama", dict(num_attention_heads=8, num_key_value_heads=2)),  # GQA 4:1, no biases
    ("llama", SCALED),  # llama3 rope scaling, sequences longer than original_max_position_embeddings
], ids=["qwen2-untied", "qwen2-tied", "llama-gqa", "llama3-scaling"])
def test_logits_equal_transformers(tmp_path, kind, overrides):
    hf = hf_model(kind, **overrides)
    assert max_diff(saved(tmp_path, hf), hf) < 1e-4


def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf("qwen2")
    folder = saved(tmp_path, hf, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    assert max_diff(folder, hf) < 1e-4


def test_bf16_checkpoint_loads_in_fp32(tmp_path):
    from transformers import AutoModelForCausalLM
    folder = saved(tmp_path, tiny_hf("llama").to(torch.bfloat16))
    assert load_file(folder / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert max_diff(folder, hf) < 1e-4


def test_old_config_form(tmp_path):
    """Top-level rope_theta and rope_scaling (no rope_parameters), as older checkpoints write config.json."""
    hf = hf_model("llama", **SCALED)
    folder = saved(tmp_path, hf)
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = rope.pop("rope_theta"), rope
    (folder / "config.json").write_text(json.dumps(cfg))
    assert max_diff(folder, hf) < 1e-4
    cfg.pop("rope_scaling")  # trap: the comparison must see a lost scaling (and the default theta 1e4 for a lost theta)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert max_diff(folder, hf) > 1e-2
    cfg.pop("rope_theta")
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_scaling": rope}))
    assert max_diff(folder, hf) > 1e-2


def test_dtype(tiny_qwen):
    folder, _ = tiny_qwen
    assert {p.dtype for p in M.load(folder, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in M.load(folder).parameters()} == {torch.float32}


@pytest.mark.parametrize("packed", [False, True])
def test_cached_decoding_equals_one_forward(tiny_qwen, packed):
    """Prefill + one token at a time through RingCache (as rollout.generate does) gives the logits of one causal
    forward over the whole sequence; row 1's prompt is 3 tokens shorter (right-padded in the prefill, its ring from
    slot 5 on, where the pads were) and must match its own unpadded forward.
    packed: the decode runs through oneDNN's blocked weights (generate's CPU path), the reference does not."""
    ours = M.load(tiny_qwen[0])
    seq, P, T, lens = random_tokens((2, 24)), 8, 16, torch.tensor([8, 5])
    prompt_pos = torch.arange(P).expand(2, P).masked_fill(torch.arange(P) >= lens[:, None], -1)  # (2, P), -1 at pads
    cache = RingCache.allocate(ours.config, [8, 5], [T, T], [T, T], torch.float32, "cpu")
    with torch.no_grad(), (M.packed_weights(ours) if packed else contextlib.nullcontext()):
        assert hasattr(ours.layers[0].self_attn.q_proj, "packed") == (packed and M.ONEDNN)
        cache.write_prompt(slice(None), prompt_pos)
        prompt_logits, thought_logits = ours(seq[:, :P], prompt_pos.clamp(min=0), cache), []  # (2, P, V)
        for t in range(T):  # the thought tokens seq[:, P:] follow each row's own prompt
            cache.write_thought(t, lens + t)
            thought_logits.append(ours(seq[:, P + t:P + t + 1], (lens + t)[:, None], cache))
        thought_logits = torch.cat(thought_logits, 1)  # (2, T, V)
    assert not any(hasattr(m, "packed") for m in ours.modules())  # the copies are gone on exit
    with torch.no_grad():
        for row, n in enumerate(lens.tolist()):
            expected = ours(torch.cat([seq[row, :n], seq[row, P:P + T]])[None])[0]  # (n + T, V)
            assert (torch.cat([prompt_logits[row, :n], thought_logits[row]]) - expected).abs().max() < 1e-5


def test_generate_logprobs_equal_one_forward(tiny_qwen):
    ours = M.load(tiny_qwen[0])
    prompt = random_tokens((1, 7))[0].tolist()
    out = rollout.generate(ours, [prompt], rollout.CachePolicy("full"), max_new=20, eos_ids=[])
    seq = torch.cat([torch.tensor([prompt]), out.tokens], 1)
    with torch.no_grad():
        logp = torch.log_softmax(ours(seq)[:, len(prompt) - 1:-1], -1).gather(-1, out.tokens[..., None])[..., 0]
    assert out.mask.all() and (out.logprobs - logp).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------- registry, tokenizer

SHAPES = {  # docs/method.md §1: layers, d, ffn, H, Hkv, vocab, tied, rope theta; smollm2 from its config.json
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936, True, 1e6),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936, True, 1e6),
    "qwen2.5-3b": (36, 2048, 11008, 16, 2, 151936, True, 1e6),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 152064, False, 1e6),
    "r1-llama-8b": (32, 4096, 14336, 32, 8, 128256, False, 5e5),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, True, 1e5),
}


def test_masked_attention_with_expanded_kv_heads_equals_gqa():
    """attend_masked's cuda path (KV heads expanded, no enable_gqa) equals SDPA's own GQA, and attend_one (decode)
    equals both, under a mask that hides some keys: query head h reads KV head h // (H / Hkv)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
               torch.randn(2, 2, 5, 8, generator=g))
    mask = torch.zeros(2, 1, 3, 5).masked_fill_(torch.rand(2, 1, 3, 5, generator=g) < 0.3,
                                                torch.finfo(torch.float32).min)
    mask[..., 0] = 0  # every query sees a key
    plain = M.attend_masked(q, k, v, mask, expand=False)
    torch.testing.assert_close(M.attend_masked(q, k, v, mask, expand=True), plain)
    by_hand = (torch.softmax(q @ k.repeat_interleave(3, 1).transpose(-1, -2) / 8 ** 0.5 + mask, -1)
               @ v.repeat_interleave(3, 1))
    torch.testing.assert_close(plain, by_hand)
    torch.testing.assert_close(M.attend_one(q[:, :, :1], k, v, mask[:, :, :1]), by_hand[:, :, :1])


@pytest.mark.parametrize("name", SHAPES)
def test_registry_shapes(name):
    c = M.config_from_hf(M.REGISTRY[name][1])
    shapes = (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings, c.rope_theta)
    assert shapes == SHAPES[name]
    assert c.head_dim == c.dim // c.n_heads and c.qkv_bias == name.startswith("qwen")
    if name == "r1-llama-8b":
        assert c.rms_eps == 1e-5 and c.rope_scaling == dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)
    assert set(M.REGISTRY) == {*SHAPES, "toy"}


def test_tokenizer(tmp_path, qwen_tokenizer_dir):
    (tmp_path / "bare").mkdir()
    shutil.copy(qwen_tokenizer_dir / "tokenizer.json", tmp_path)
    assert M.load_tokenizer(tmp_path).encode("Hello world").ids == [9707, 1879]
    with pytest.raises(FileNotFoundError, match="the model folder has no tokenizer.json"):
        M.load_tokenizer(tmp_path / "bare")


# ---------------------------------------------------------------------------------------------------- bad input

def edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture
def tiny_copy(tiny_qwen, tmp_path):
    return Path(shutil.copytree(tiny_qwen[0], tmp_path / "copy"))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        M.load(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        M.load(tmp_path)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'qwen9'.*qwen2.5-0.5b.*r1-llama-8b"):
        M.load("qwen9")


def test_unsupported_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: qwen2, llama"):
        M.load(tiny_copy)


def test_malformed_config(tiny_copy):
    (tiny_copy / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        M.load(tiny_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "1 tensor.s. missing: layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}),
     "1 tensor.s. unexpected: layers.0.extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(31)}),
     r"wrong shape: norm.weight: \(31,\) on disk, \(32,\) expected"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_bad_tensors(tiny_copy, edit, message):
    edit_tensors(tiny_copy, edit)
    with pytest.raises(ValueError, match=message):
        M.load(tiny_copy)


def test_truncated_safetensors(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file, truncated or corrupt"):
        M.load(tiny_copy)


def test_registry_name_not_here_and_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    try:  # huggingface_hub reads these once at import, and transformers has imported it already
        import huggingface_hub.constants as hub
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    except ImportError:
        pass
    repo = re.escape("Qwen/Qwen2.5-0.5B-Instruct")
    message = rf"(?s)'qwen2.5-0.5b' \({repo}\) is not on this machine.*huggingface-cli download {repo}"
    with pytest.raises(FileNotFoundError, match=message):
        M.load("qwen2.5-0.5b")


# ---------------------------------------------------------------------------------------------------- real weights

@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smol):
    from transformers import AutoModelForCausalLM
    folder, ours, tok = smol
    prompt = torch.tensor([chatml(tok, "What is the capital of France?")])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(prompt) - hf(prompt).logits).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_answers_paris(smol):
    _, ours, tok = smol
    out = rollout.generate(ours, [chatml(tok, "What is the capital of France?")], rollout.CachePolicy("full"),
                           max_new=24)
    assert "Paris" in tok.decode(out.tokens[0][out.mask[0]].tolist())
