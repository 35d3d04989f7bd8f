"""Greedy decoding and beam search on hand-built next-token models whose best sequence is known by enumeration."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import generate

PAD, BOS, EOS = 0, 1, 2  # ids 3.. are words


def bigram_fn(table):
    """A toy decoder: log p(next | tokens) = table[last token]. table [V, V] of log-probabilities."""
    table = jnp.asarray(table, jnp.float32)

    def logprob_fn(tokens, t):
        return table[tokens[:, t]]

    return logprob_fn


def random_table(vocab, seed, temperature=1.0, ending=()):
    """Random bigram log-probabilities; after a word in `ending`, EOS is the likeliest next token."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(vocab, vocab)) / temperature
    logits[list(ending), EOS] = logits.max() + 1.0
    logits[:, BOS] = -30.0  # never generated in practice; keeps enumeration small
    logits[:, PAD] = -30.0
    return np.array(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


def run(fn, batch, **kw):
    """Generation under jit, as the CLI runs it."""
    return jax.jit(functools.partial(fn, batch=batch, bos=BOS, eos=EOS, pad=PAD, **kw))()


def best_by_enumeration(table, max_len, alpha):
    """Every caption BOS w1..wk EOS (or cut at max_len without EOS) scored exactly; the best one."""
    words = [EOS] + list(range(3, table.shape[0]))
    best, best_rank = None, -np.inf

    def visit(seq, score):
        nonlocal best, best_rank
        if seq[-1] == EOS or len(seq) == max_len:
            rank = score / (len(seq) - 1) ** alpha
            if rank > best_rank:
                best, best_rank = seq, rank
            return
        for w in words:
            visit(seq + [w], score + float(table[seq[-1], w]))

    visit([BOS], 0.0)
    return best + [PAD] * (max_len - len(best)), best_rank


def test_beam_finds_the_best_sequence_where_greedy_does_not():
    # After BOS: A 0.6, B 0.4. After A: EOS 0.4, A 0.3, B 0.3 (stopping is likeliest but weak). After B: EOS 0.9.
    # Greedy: BOS A EOS (0.24). Best: BOS B EOS (0.36).
    a, b = 3, 4
    probs = np.full((5, 5), 1e-9)
    probs[BOS, [a, b]] = [0.6, 0.4]
    probs[a, [EOS, a, b]] = [0.4, 0.3, 0.3]
    probs[b, [EOS, a, b]] = [0.9, 0.05, 0.05]
    probs[EOS, EOS] = probs[PAD, PAD] = 1.0
    table = np.log(probs / probs.sum(-1, keepdims=True))
    fn = bigram_fn(table)
    g_tokens, g_score = run(functools.partial(generate.greedy, fn), batch=1, max_len=6)
    np.testing.assert_array_equal(g_tokens[0], [BOS, a, EOS, PAD, PAD, PAD])
    np.testing.assert_allclose(float(g_score[0]), np.log(0.24), rtol=1e-5)
    tokens, scores = run(
        functools.partial(generate.beam_search, fn), batch=1, max_len=6, beam_size=2, length_penalty=0.0
    )
    np.testing.assert_array_equal(tokens[0, 0], [BOS, b, EOS, PAD, PAD, PAD])
    np.testing.assert_allclose(float(scores[0, 0]), np.log(0.36), rtol=1e-5)
    assert list(np.asarray(tokens[0, 1])) == [BOS, a, EOS, PAD, PAD, PAD]  # the runner-up, ended and kept


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    # 2 words + EOS, captions of up to 4 generated tokens: at most 8 live hypotheses, so 16 beams prune nothing.
    table = random_table(5, seed=3, temperature=0.7)
    tokens, scores = run(
        functools.partial(generate.beam_search, bigram_fn(table)),
        batch=1,
        max_len=5,
        beam_size=16,
        length_penalty=alpha,
    )
    want, want_rank = best_by_enumeration(table, 5, alpha)
    np.testing.assert_array_equal(tokens[0, 0], want)
    np.testing.assert_allclose(float(scores[0, 0]), want_rank, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_one_equals_greedy(alpha):
    # A batch of different start states: the first token after BOS comes from a per-row table.
    vocab, batch, max_len = 12, 6, 9
    table = random_table(vocab, seed=5, temperature=0.5, ending=(4, 9))
    first = jnp.asarray(random_table(vocab, seed=6)[3 : 3 + batch])

    def fn(tokens, t):
        return jnp.where(t == 0, first, bigram_fn(table)(tokens, t))

    g_tokens, g_score = run(functools.partial(generate.greedy, fn), batch=batch, max_len=max_len)
    b_tokens, b_score = run(
        functools.partial(generate.beam_search, fn),
        batch=batch,
        max_len=max_len,
        beam_size=1,
        length_penalty=alpha,
    )
    np.testing.assert_array_equal(b_tokens[:, 0], g_tokens)
    ended = np.asarray((g_tokens == EOS).any(axis=1))
    assert ended.any() and not ended.all()  # rows that end and rows cut by the buffer: both paths exercised
    lengths = np.maximum(1, np.argmax(np.asarray(g_tokens) == EOS, axis=1))
    lengths = np.where((np.asarray(g_tokens) == EOS).any(1), lengths, max_len - 1)
    np.testing.assert_allclose(np.asarray(b_score[:, 0]), np.asarray(g_score) / lengths**alpha, rtol=1e-5)


def test_after_eos_only_padding_and_scores_stop():
    table = random_table(6, seed=1)
    table[:, EOS] = np.log(0.9)  # end almost at once
    tokens, scores = run(
        functools.partial(generate.beam_search, bigram_fn(table)),
        batch=2,
        max_len=7,
        beam_size=3,
        length_penalty=0.0,
    )
    for row in np.asarray(tokens).reshape(-1, 7):
        assert row[0] == BOS
        ends = np.flatnonzero(row == EOS)
        if len(ends):
            assert (row[ends[0] + 1 :] == PAD).all()
    np.testing.assert_array_equal(tokens[:, 0, :3], [[BOS, EOS, PAD]] * 2)  # BOS EOS: log 0.9, the best
    np.testing.assert_allclose(np.asarray(scores[:, 0]), np.log(0.9), rtol=1e-5)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
