"""Shared fixtures: tiny random checkpoints saved by transformers, the real SmolLM2 folder, the shared data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: threads only add synchronisation, and CI machines may be shared


def tiny_hf(kind="qwen2", **overrides):
    """A tiny random transformers model (fp32, weights at a scale that makes logits differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    base.update(overrides)
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(**base)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**base))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """(folder, transformers model) of a tiny Qwen2 with q/k/v biases and an untied head."""
    folder = tmp_path_factory.mktemp("tiny_qwen")
    hf = tiny_hf("qwen2")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct folder, built once by ../shared/tools/smollm2.sh; skipped where it cannot be built."""
    script = SHARED / "tools" / "smollm2.sh"
    if not script.exists():
        pytest.skip(f"{script} not found: cannot build the real SmolLM2")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not build SmolLM2 with {script}: {done.stderr[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smol(smollm2):
    """(folder, our model, tokenizer) of the real SmolLM2."""
    import model
    return smollm2, model.load(smollm2), model.load_tokenizer(smollm2)


def chatml(tokenizer, question):
    """SmolLM2's chat format for one user message, as token ids."""
    return tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
