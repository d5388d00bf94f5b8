"""The compiled decode step (rollout.decode_step under torch.compile): the same tokens and log-probs as eager
`generate`, one graph for every step of a call and for every call of a variant (no recompile for another batch size,
prompt length or budget); a compiler that fails falls back to eager with one warning. Its static-shape logic (every
slot attended under the mask, the step an index tensor) is checked without compiling, so that a wrong mask or slot
fails fast. CPU only here: the CUDA graphs of mode reduce-overhead run where bench.py --gpu runs. The assertions
about compiles name the torch version they ran on."""
import dataclasses
import warnings

import pytest
import torch

import model as M
import rollout
from conftest import chatml
from encoder import Adapter, AdapterConfig
from rollout import CachePolicy, Sampling, generate

# a compiled step that fell back to eager would give eager's tokens: here that is an error, unless a test expects it
pytestmark = pytest.mark.filterwarnings("error:the compiled decode step failed:RuntimeWarning")

compiles = pytest.mark.skipif(not rollout.COMPILES,
                              reason=f"torch {torch.__version__}: the compiled decode step needs torch 2.11 or later")

# rows of different lengths: per-row windows W_i = budget - len_i and per-row eviction schedules
TOY_PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12], [1, 13, 14, 15, 16, 17, 18, 19]]


def pte_adapter(cfg):
    """A rank-4 pte adapter with B random, so that the cores S change the tokens."""
    torch.manual_seed(0)
    adapter = Adapter(cfg, AdapterConfig("pte", rank=4, alpha=4.0, n_globals=4))
    with torch.no_grad():
        for b in adapter.B.values():
            b.normal_(0, 0.3)
    return adapter


def both(model, prompts, policy, max_new, adapter=None, temperature=0.0):
    """(eager, compiled) rollouts of the same call, sampled from the same seed."""
    sampling = Sampling(max_new, temperature, eos_ids=[], pad_id=0)
    return [generate(model, prompts, policy, sampling, adapter, compile=c,
                     generator=torch.Generator().manual_seed(0) if temperature else None)
            for c in (False, True)]


def assert_same(eager, compiled):
    assert torch.equal(eager.tokens, compiled.tokens) and torch.equal(eager.mask, compiled.mask)
    assert eager.evictions == compiled.evictions
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=1e-4)  # fp32, fused in other orders


@compiles
@pytest.mark.parametrize("policy", ["full", "window", "pte"])
def test_static_step_equals_eager_without_compiling(monkeypatch, policy):
    """decode_step run eagerly (torch.compile made the identity): attending over every slot under the mask, with the
    step as a 0-d tensor, gives eager's tokens and log-probs; catches a wrong slot, a stale slot left unmasked."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    toy = M.load("toy")
    adapter = pte_adapter(toy.config) if policy == "pte" else None
    eager, static = both(toy, TOY_PROMPTS, CachePolicy(policy, 16), 30, adapter, temperature=1.0)
    assert (sum(map(len, eager.evictions)) >= 6) == (policy != "full")  # each row evicts twice or more, but in full
    assert_same(eager, static)


@compiles
def test_compiled_toy_equals_eager_one_graph():
    """The real compile (inductor on the CPU): pte with evictions folded between steps, sampled at temperature 1.
    One graph for the whole call: a Python int that changes per step (the step, a slot count) would recompile."""
    torch._dynamo.reset()
    toy = M.load("toy")
    adapter = pte_adapter(toy.config)
    with torch._dynamo.config.patch(error_on_recompile=True):
        eager, compiled = both(toy, TOY_PROMPTS, CachePolicy("pte", 16), 30, adapter, temperature=1.0)
    assert sum(map(len, eager.evictions)) > 6
    assert_same(eager, compiled)
    assert compiled.stats["first_step_s"] > 0 and eager.stats["first_step_s"] is None


@compiles
@pytest.mark.slow
def test_smollm2_compiled_equals_eager(smol):
    """SmolLM2's real weights (9 query heads on 3 KV heads, Llama RoPE), greedy, a window that evicts. Its first 2
    of 30 layers: the graph repeats per layer, and compiling all 30 takes minutes on two cores."""
    _, full, tok = smol
    model = M.Transformer(dataclasses.replace(full.config, n_layers=2))
    model.load_state_dict(full.state_dict(), strict=False)  # layers 0-1, the (tied) embeddings, the final norm
    prompts = [chatml(tok, "What is 7 times 8?"), chatml(tok, "Name the largest planet.")]
    eager, compiled = both(model.eval(), prompts, CachePolicy("window", max(map(len, prompts)) + 12), 24)
    assert all(len(e) >= 2 for e in eager.evictions)
    assert_same(eager, compiled)


def counting_compile(monkeypatch):
    """torch.compile with backend "eager" (no code generation, the same graphs dynamo would hand inductor) that
    counts the graphs it is given: a recompile is one more."""
    graphs, real = [], torch.compile

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": backend}))
    return graphs


@compiles
def test_no_recompile_across_calls(monkeypatch):
    """One graph a variant (with the thought encoder, with a plain LoRA, without an adapter), whatever the batch
    size (1 included, and 2, the number of KV heads and of layers), the prompt lengths or the budget; the tokens
    are eager's."""
    torch._dynamo.reset()
    graphs, toy = counting_compile(monkeypatch), M.load("toy")
    pte, lora = pte_adapter(toy.config), Adapter(toy.config, AdapterConfig("lora", rank=4, alpha=4.0))
    calls = [("pte", TOY_PROMPTS, 16, pte), ("pte", TOY_PROMPTS[:1], 16, pte), ("pte", TOY_PROMPTS[:2], 20, pte),
             ("pte", TOY_PROMPTS * 2, 30, pte), ("window", TOY_PROMPTS, 16, None), ("window", [[1, 2]], 24, None),
             ("full", TOY_PROMPTS, 16, None), ("window", TOY_PROMPTS[:1], 16, lora), ("full", TOY_PROMPTS, 40, lora),
             ("pte", [[1, 2, 3]], 12, pte_adapter(toy.config))]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, (policy, prompts, budget, adapter) in enumerate(calls):
            eager, compiled = both(toy, prompts, CachePolicy(policy, budget), 20, adapter)
            assert_same(eager, compiled)
            assert len(graphs) == 1 + (i >= 4) + (i >= 7), (f"torch {torch.__version__}: call {i} "
                                                            f"({policy}, {len(prompts)} rows, budget {budget}) "
                                                            f"compiled {len(graphs)} graphs")


@compiles
@pytest.mark.parametrize("when", ["creation", "first call", "later call"])
def test_a_failing_compiler_falls_back_to_eager(monkeypatch, when):
    """torch.compile that fails when the step is created, compiled at its first call, or run later: one warning
    that says why and names --no-compile, then eager decoding of the same tokens; the model remembers, so the next
    call decodes eagerly at once, without another warning."""
    toy, calls = M.load("toy"), []
    adapter, policy = pte_adapter(toy.config), CachePolicy("pte", 16)

    def broken(fn, **kw):
        if when == "creation":
            raise RuntimeError("no C compiler")

        def run(*args):
            calls.append(1)
            if len(calls) > (when == "later call") * 5:
                raise RuntimeError("no C compiler")
            return fn(*args)
        return run
    eager = generate(toy, TOY_PROMPTS, policy, Sampling(30, eos_ids=[], pad_id=0), adapter, compile=False)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match=r"compiled decode step failed \(RuntimeError: no C compiler\).*--no-compile"
                      ) as caught:
        fallen = generate(toy, TOY_PROMPTS, policy, Sampling(30, eos_ids=[], pad_id=0), adapter, compile=True)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert sum(map(len, eager.evictions)) >= 6 and torch.equal(eager.tokens, fallen.tokens)
    torch.testing.assert_close(fallen.logprobs, eager.logprobs, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = generate(toy, TOY_PROMPTS, policy, Sampling(30, eos_ids=[], pad_id=0), adapter, compile=True)
    assert torch.equal(again.tokens, eager.tokens) and len(calls) == {"creation": 0, "first call": 1}.get(when, 6)


def test_a_torch_without_shape_id_decodes_eagerly(monkeypatch):
    """torch before 2.11 (mark_unbacked without shape_id): one warning that names the version it needs and
    --no-compile, and eager's tokens."""
    toy, adapter, policy = M.load("toy"), None, CachePolicy("window", 16)
    eager = generate(toy, TOY_PROMPTS, policy, Sampling(20, eos_ids=[], pad_id=0), adapter, compile=False)
    monkeypatch.setattr(rollout, "COMPILES", False)
    needs = r"step failed \(RuntimeError: torch .*needs torch 2.11 or later\).*--no-compile"
    with pytest.warns(RuntimeWarning, match=needs):
        old = generate(toy, TOY_PROMPTS, policy, Sampling(20, eos_ids=[], pad_id=0), adapter, compile=True)
    assert torch.equal(old.tokens, eager.tokens)
