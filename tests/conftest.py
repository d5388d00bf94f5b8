"""Shared fixtures: tiny random checkpoints saved by transformers; the real SmolLM2 folder, the Qwen2.5 tokenizer and
the benchmark data, found through environment variables (PTE_SMOLLM2, PTE_QWEN_TOKENIZER, PTE_DATA) or the Hugging
Face cache and skipped with the way to get them where absent (.ci/run sets the variables)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "experiments"))  # the experiment scripts, which the tests import too
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


def hub_snapshot(repo_glob, *files):
    """The newest folder of the local Hugging Face cache (HF_HUB_CACHE, else $HF_HOME/hub) that holds `files`
    among the snapshots of the repos matching `repo_glob` (e.g. Qwen/Qwen2.5-[0-9]*B-Instruct); None when there is none.
    Never downloads: tests do not touch the network."""
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    snapshots = hub.glob(f"models--{repo_glob.replace('/', '--')}/snapshots/*")
    found = [s for s in snapshots if all((s / f).is_file() for f in files)]
    return max(found, key=os.path.getmtime) if found else None


def folder_from(variable, repo_glob, files, how):
    """$variable if set (it must hold `files`), else the Hugging Face cache; else skip, saying how to get it."""
    if os.environ.get(variable):
        folder = Path(os.environ[variable]).expanduser()
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            pytest.fail(f"${variable}={folder} lacks {', '.join(missing)}")
        return folder
    folder = hub_snapshot(repo_glob, *files)
    if folder is None:
        pytest.skip(f"{repo_glob} not in the Hugging Face cache: {how}, or set {variable} to a folder holding "
                    f"{', '.join(files)} (the README's Tests section)")
    return folder


SMOLLM2 = ("PTE_SMOLLM2", "HuggingFaceTB/SmolLM2-135M-Instruct", ("config.json", "model.safetensors", "tokenizer.json"),
           "pip install huggingface_hub && huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct")
QWEN_TOKENIZER = ("PTE_QWEN_TOKENIZER", "Qwen/Qwen2.5-[0-9]*B-Instruct",  # not -Math- or -Coder-: other templates
                  ("tokenizer.json", "tokenizer_config.json"),
                  "pip install huggingface_hub && huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct "
                  "tokenizer.json tokenizer_config.json")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct: $PTE_SMOLLM2, else the Hugging Face cache; skipped where absent."""
    return folder_from(*SMOLLM2)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """A folder with the Qwen2.5 tokenizer.json and tokenizer_config.json (chat template): $PTE_QWEN_TOKENIZER, else
    any Qwen2.5 Instruct model in the Hugging Face cache; skipped where absent."""
    return folder_from(*QWEN_TOKENIZER)


@pytest.fixture(scope="session")
def data_dir():
    """The folder of the benchmark JSONL files (math500.jsonl, math_train.jsonl, ...): $PTE_DATA, else the repository's
    data/ (where data.resolve_data looks too) when it holds them; skipped where neither does."""
    folder = Path(os.environ.get("PTE_DATA") or ROOT / "data").expanduser()
    if not (folder / "math500.jsonl").is_file():
        pytest.skip(f"benchmark data not in {folder}: set PTE_DATA to a folder of math500.jsonl, olympiadbench.jsonl, "
                    "math_train.jsonl, ... (one {\"problem\", \"answer\"} object a line; ours are the copies in "
                    "github.com/agentica-project/rllm, rllm/data/{test,train}/math: see the README's Tests section)")
    return folder


@pytest.fixture(scope="module")
def smol(smollm2):
    """(folder, our model, tokenizer) of the real SmolLM2."""
    import model
    return smollm2, model.load(smollm2), model.load_tokenizer(smollm2)


def chatml(tokenizer, question):
    """SmolLM2's chat format for one user message, as token ids."""
    return tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False).ids
