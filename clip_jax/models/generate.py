"""Caption generation: greedy decoding and beam search, jitted and batched, for any next-token model.

Both take `logprob_fn(tokens [N, L] int32, t) -> [N, V] float32`, the log-probabilities of the token at position
t+1 given tokens[:, :t+1]; whatever tokens[:, t+1:] hold must not matter (a causal decoder). The loop runs
inside jax.lax.while_loop and stops as soon as every sequence has ended. The functions are pure and traceable:
call them under jax.jit (`caption` below is what the CLI and the evaluator jit, with the parameters as an
argument so one compilation serves every checkpoint of a model).

No KV cache: each position recomputes the decoder over the whole (fixed-length) token buffer, L forward passes
of L positions per caption. At caption lengths (<= 77) and eval batch sizes this costs seconds, and it keeps
the decoder a single teacher-forced function (no second, cached code path that could disagree with training).

Sequences start with `bos`; the end token `eos` is kept; every position after it is `pad`. Scores are sums of
log-probabilities of the generated tokens (eos included, bos not).

Beam search keeps `beam_size` hypotheses per example. Each step, every live hypothesis is extended by every token
and every ended one is carried over unchanged as a single candidate; the best `beam_size` candidates survive,
ranked by score / length ** length_penalty (length = generated tokens, eos included; 0 = raw log-probability).
Ended and live hypotheses compete in one ranking, so with beam_size 1 the search is exactly greedy decoding.
It stops when all kept hypotheses have ended or the buffer is full; a hypothesis cut by the buffer end competes
as it is.
"""

import jax
import jax.numpy as jnp

# Score of a non-candidate (the empty initial beams, continuations of ended ones): finite so no NaN can arise.
_NEG = -1e9


def _start(batch_shape, max_len, bos, pad):
    tokens = jnp.full((*batch_shape, max_len), pad, jnp.int32)
    return tokens.at[..., 0].set(bos)


def greedy(logprob_fn, *, batch, max_len, bos, eos, pad):
    """(tokens [batch, max_len] int32, scores [batch] float32): the most likely token at every step."""

    def cond(state):
        t, _, done, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, tokens, done, score = state
        logp = logprob_fn(tokens, t)
        nxt = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0])
        tokens = tokens.at[:, t + 1].set(jnp.where(done, pad, nxt))
        return t + 1, tokens, done | (nxt == eos), score

    init = (0, _start((batch,), max_len, bos, pad), jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
    _, tokens, _, score = jax.lax.while_loop(cond, body, init)
    return tokens, score


def _rank(score, length, alpha):
    return score / jnp.maximum(length, 1).astype(jnp.float32) ** alpha


def beam_search(logprob_fn, *, batch, beam_size, max_len, bos, eos, pad, length_penalty=0.0):
    """(tokens [batch, beam, max_len], ranked scores [batch, beam]), best hypothesis first.

    logprob_fn sees batch * beam_size rows, hypothesis k of example b at row b * beam_size + k (so per-example
    inputs such as image features are repeated beam_size times with jnp.repeat(x, beam_size, axis=0)).
    The ranked score is sum log-prob / length ** length_penalty.
    """
    k = beam_size

    def cond(state):
        t, _, _, ended, _ = state
        return (t < max_len - 1) & ~jnp.all(ended)

    def body(state):
        t, tokens, score, ended, length = state
        logp = logprob_fn(tokens.reshape(batch * k, max_len), t).reshape(batch, k, -1)
        vocab = logp.shape[-1]
        # An ended hypothesis has one candidate, itself followed by pad, at its unchanged score.
        carry_over = jnp.where(jnp.arange(vocab) == pad, score[..., None], _NEG)
        cand = jnp.where(ended[..., None], carry_over, score[..., None] + logp)
        cand_len = jnp.where(ended, length, t + 1)[..., None]
        _, idx = jax.lax.top_k(_rank(cand, cand_len, length_penalty).reshape(batch, k * vocab), k)
        beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        was_ended = jnp.take_along_axis(ended, beam, axis=1)
        tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, t + 1].set(tok)
        score = jnp.take_along_axis(cand.reshape(batch, k * vocab), idx, axis=1)
        length = jnp.where(was_ended, jnp.take_along_axis(length, beam, axis=1), t + 1)
        return t + 1, tokens, score, was_ended | (tok == eos), length

    # Only hypothesis 0 is real at the start; the others would duplicate it, so they start as non-candidates.
    score = jnp.full((batch, k), _NEG, jnp.float32).at[:, 0].set(0.0)
    init = (
        0,
        _start((batch, k), max_len, bos, pad),
        score,
        jnp.zeros((batch, k), bool),
        jnp.zeros((batch, k), jnp.int32),
    )
    _, tokens, score, _, length = jax.lax.while_loop(cond, body, init)
    ranked = _rank(score, length, length_penalty)
    order = jnp.argsort(-ranked, axis=1)
    return jnp.take_along_axis(tokens, order[..., None], axis=1), jnp.take_along_axis(ranked, order, axis=1)


def generate(logprob_fn, *, batch, beam_size, max_len, bos, eos, pad, length_penalty=0.0):
    """Best sequence per example [batch, max_len] and its ranked score: greedy for beam_size 1, else beam search
    (logprob_fn then sees batch * beam_size rows, see beam_search)."""
    common = dict(batch=batch, max_len=max_len, bos=bos, eos=eos, pad=pad)
    if beam_size == 1:
        return greedy(logprob_fn, **common)
    tokens, scores = beam_search(logprob_fn, beam_size=beam_size, length_penalty=length_penalty, **common)
    return tokens[:, 0], scores[:, 0]


def caption(model, images, *, beam_size, max_len, bos, eos, pad, length_penalty=0.0):
    """A captioning model (CoCa: `caption_memory`, `next_token_logprobs`) -> (tokens [B, max_len], scores [B]).

    The image is encoded once; its pooled tokens are repeated per beam, and the decoder is re-run per position.
    """
    memory = model.caption_memory(images)
    if beam_size > 1:
        memory = jnp.repeat(memory, beam_size, axis=0)

    def logprob_fn(tokens, t):
        return model.next_token_logprobs(memory, tokens, t)

    return generate(
        logprob_fn,
        batch=images.shape[0],
        beam_size=beam_size,
        max_len=max_len,
        bos=bos,
        eos=eos,
        pad=pad,
        length_penalty=length_penalty,
    )
