"""Every equation of the cache, the thought encoder and the adapter (docs/method.md §2-§4) against a value computed
by hand, here in the comments, on 2 x 2 matrices of small integers: one layer, one KV head of dimension 2, rank 2.

    q_g = [[1, 0], [0, 2]]   W_Q = [[1, 1], [0, 1]]   W_K = [[1, 0], [1, 1]]   W_V = [[2, 0], [0, 1]]
    so q_g W_Q = [[1, 1], [0, 2]], k W_K = [k1 + k2, k2] and v W_V = [2 v1, v2] for a token's k, v.
"""
import math

import pytest
import torch

from cache import RingCache, Schedule, evict_count
from encoder import Adapter, AdapterConfig, normalize
from model import ModelConfig
from rollout import fold

CFG = ModelConfig(vocab_size=5, dim=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, ffn_dim=2, rms_eps=1e-6,
                  rope_theta=1e4, rope_scaling=None, qkv_bias=False, o_bias=False, tie_embeddings=False)
K_G, V_G = [[0, 1], [1, 0]], [[0, 2], [0, 0]]  # the global tokens


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture
def adapter():
    adapter = Adapter(CFG, AdapterConfig("pte", rank=2, alpha=4.0, n_globals=2, targets=("v",)))
    with torch.no_grad():
        for name, value in dict(q_g=[[1, 0], [0, 2]], W_Q=[[1, 1], [0, 1]], W_K=[[1, 0], [1, 1]],
                                W_V=[[2, 0], [0, 1]], k_g=K_G, v_g=V_G).items():
            getattr(adapter, name)[0] = t(value)
    return adapter


def test_linear_attention_S_prime(adapter):
    """S'(K, V) = (q_g W_Q) (K W_K)^T (V W_V) / len(K). K = I, V = [[1, 1], [0, 1]]: K W_K = [[1, 0], [1, 1]],
    V W_V = [[2, 1], [0, 1]], (K W_K)^T (V W_V) = [[2, 2], [0, 1]], times q_g W_Q: [[2, 3], [0, 2]], over 2 tokens:
    [[1, 1.5], [0, 1]]. With the second token padding (valid False) only the first counts, len(K) = 1:
    [1, 0]^T [2, 1] = [[2, 1], [0, 0]], times q_g W_Q: [[2, 1], [0, 0]]."""
    K, V = t([[1, 0], [0, 1]]), t([[1, 1], [0, 1]])
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(K[None, None], V[None, None])[0, 0], t([[1, 1.5], [0, 1]]))
        got = adapter.encode(K[None, None], V[None, None], valid=torch.tensor([[True, False]]))[0, 0]
    torch.testing.assert_close(got, t([[2, 1], [0, 0]]))


def test_normalize():
    """Normalize(X) = sqrt(r) X / ||X||_F: ||[[3, 0], [0, 4]]||_F = 5, r = 2."""
    torch.testing.assert_close(normalize(t([[3, 0], [0, 4]])), math.sqrt(2) / 5 * t([[3, 0], [0, 4]]))


def test_initial_state_S0(adapter):
    """S(0) = Normalize(S'(k_g, v_g)). k_g W_K = [[1, 1], [1, 0]], v_g W_V = [[0, 2], [0, 0]], their product
    [[0, 2], [0, 2]], over 2 tokens [[0, 1], [0, 1]], times q_g W_Q: S' = [[0, 2], [0, 2]], ||S'|| = 2 sqrt(2), so
    S(0) = sqrt(2) S' / (2 sqrt(2)) = [[0, 1], [0, 1]] for every row (S' unnormalised would be twice that)."""
    with torch.no_grad():
        torch.testing.assert_close(adapter.initial_cores(3), t([[0, 1], [0, 1]]).expand(1, 3, 2, 2))


def test_fold_on_eviction(adapter):
    """S <- Normalize(S + S'(K_e, V_e)). K_e = [[1, 0], [-1, 1]] gives K_e W_K = I; V_e = [[2, -3], [0, 1]] gives
    V_e W_V = [[4, -3], [0, 1]]; over 2 tokens, times q_g W_Q: S' = [[2, -1], [0, 1]]. From S(0): S + S' = 2 I,
    whose norm is 2 sqrt(2): the new S is I (Normalize(S') alone, without S, would be S' / sqrt(3)).
    The keys at position 0 are not rotated."""
    K, V = t([[1, 0], [-1, 1]]), t([[2, -3], [0, 1]])
    with torch.no_grad():
        cores, _ = fold(adapter, adapter.initial_cores(1), [(K[None, :, None], V[None, :, None])],
                        torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]))
    torch.testing.assert_close(cores[0, 0], torch.eye(2), atol=1e-6, rtol=0)


def test_the_encoder_reads_keys_before_rope(adapter):
    """The cache holds keys after RoPE; the fold turns them back. With one frequency of pi / 2 a radian a
    position, a key [x1, x2] at position 1 is held as [-x2, x1] (rotate-half: x1 cos - x2 sin, x2 cos + x1 sin):
    K_e of the test above is held as [[0, 1], [-1, -1]], and folds into the same S = I."""
    held, V = t([[0, 1], [-1, -1]]), t([[2, -3], [0, 1]])
    with torch.no_grad():
        cores, _ = fold(adapter, adapter.initial_cores(1), [(held[None, :, None], V[None, :, None])],
                        torch.tensor([[1, 1]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([math.pi / 2]))
    torch.testing.assert_close(cores[0, 0], torch.eye(2), atol=1e-6, rtol=0)


def test_adapter_delta(adapter):
    """y += (alpha / r) B S A x. A = [[1, 0], [1, 1]], x = [1, 2]: A x = [1, 3]; S = [[2, 0], [1, 1]]:
    S A x = [2, 4]; B = [[1, 2], [0, 1]]: B S A x = [10, 4]; alpha / r = 4 / 2: [20, 8] (S^T would give [5, 3]
    before B)."""
    with torch.no_grad():
        adapter.A["v0"].copy_(t([[1, 0], [1, 1]]))
        adapter.B["v0"].copy_(t([[1, 2], [0, 1]]))
        got = adapter.delta(0, "v", t([[1, 2]])[None], t([[2, 0], [1, 1]])[None])
    torch.testing.assert_close(got[0, 0], t([20, 8]))


def test_eviction_schedule_by_hand():
    """W_i = budget - len_i and m_i = ceil(evict W_i): at budget 40 and evict 0.1, prompts of 10 and 7 tokens get
    W = 30, m = 3 and W = 33, m = ceil(3.3) = 4 (0.28 * 25 is 7.000000000000001 in floats: m is 7, not 8). Row 0 evicts
    before thoughts 30, 33, 36, 39; row 1 before 33, 37. Before thought 33 both do: row 0 its tokens [3, 6) (its
    second eviction; slots 10 + 3, 4, 5, padded to row 1's 4 by repeating the last), row 1 its [0, 4) (slots 7-10).
    A ring wraps: W = 8, m = ceil(0.3 * 8) = 3 evicts before 8, 11, 14, 17; before 14 its tokens [6, 9), in slots
    4 + (6, 7, 0) after a 4-token prompt."""
    assert evict_count(30, 0.1) == 3 and evict_count(33, 0.1) == 4 and evict_count(25, 0.28) == 7
    sched = Schedule.of("window", 40, 0.1, [10, 7], 60)
    assert (sched.windows, sched.counts) == ([30, 33], [3, 4])
    assert sched.steps(0, 40) == [30, 33, 36, 39] and sched.steps(1, 40) == [33, 37]
    assert sched.events(40) == {30: (1, 3), 33: (2, 4), 36: (1, 3), 37: (1, 4), 39: (1, 3)}
    cache = RingCache.allocate(CFG, [10, 7], sched.windows, sched.counts, torch.float32, "cpu")
    rows, slots, positions, valid = cache.evict(33, 2, 4)
    assert rows.tolist() == [0, 1] and slots.tolist() == [[13, 14, 15, 15], [7, 8, 9, 10]]
    assert positions.tolist() == [[13, 14, 15, 15], [7, 8, 9, 10]]
    assert valid.tolist() == [[True, True, True, False], [True, True, True, True]]
    sched = Schedule.of("window", 12, 0.3, [4], 20)
    assert (sched.windows, sched.counts, sched.steps(0, 20)) == ([8], [3], [8, 11, 14, 17])
    cache = RingCache.allocate(CFG, [4], [8], [3], torch.float32, "cpu")
    cache.pos[0, 4:] = torch.tensor([12, 13, 14, 15, 16, 17, 10, 11])  # thought j at slot 4 + j % 8 for j in 6..13
    assert [x.tolist() for x in cache.evict(14, 1, 3)[1:3]] == [[[10, 11, 4]], [[10, 11, 12]]]
    assert cache.pos[0].tolist() == [-1] * 5 + [13, 14, 15, 16, 17, -1, -1]
