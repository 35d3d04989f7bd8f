"""CoCa model: decoder masks (no look-ahead, padding ignored), the in-model caption loss against a dense numpy
reference, the output contract, sharding names, and beam 1 == greedy on the real decoder."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from model_utils import EOS, PAD, VOCAB, images, make_cfg

from clip_jax.models import coca, generate, layers

BOS = 1


def coca_cfg(**coca_overrides):
    cfg = make_cfg()
    cfg.coca = ml_collections.ConfigDict(
        dict(decoder_depth=1, num_queries=5, pooler_heads=-1, tie_embedding=True, caption_chunk=4)
    )
    cfg.coca.update(coca_overrides)
    return cfg


@functools.cache
def _model(cfg_json):
    cfg = ml_collections.ConfigDict(__import__("json").loads(cfg_json))
    model = coca.CoCa(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    # Methods run under jit (as in training); the state is an argument so the test can perturb nothing by mistake.
    call = jax.jit(lambda s, method, *a: getattr(nnx.merge(graphdef, s), method)(*a), static_argnums=1)
    return functools.partial(call, state), state


def model_for(cfg):
    return _model(cfg.to_json())


def captions(lengths, total_len=12, seed=0):
    """[BOS, words..., EOS, PAD...] rows with `lengths` words each."""
    rng = np.random.default_rng(seed)
    out = np.full((len(lengths), total_len), PAD, np.int32)
    for row, n in enumerate(lengths):
        out[row, 0] = BOS
        out[row, 1 : 1 + n] = rng.integers(3, EOS, n)
        out[row, 1 + n] = EOS
    return jnp.asarray(out)


def test_outputs_follow_the_trainer_contract():
    run, _ = model_for(coca_cfg())
    imgs, toks = images(3), captions([2, 5, 9])
    out = run("__call__", imgs, toks)
    assert set(out) == {"img", "txt", "log_t", "bias", "caption_nll", "caption_tokens"}
    for key in ("img", "txt"):
        assert out[key].shape == (3, 16) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    # encode_image / encode_text (zero-shot evaluation) give the same embeddings as the training call.
    np.testing.assert_allclose(run("encode_image", imgs), out["img"], atol=1e-6)
    np.testing.assert_allclose(run("encode_text", toks), out["txt"], atol=1e-6)
    assert float(out["caption_tokens"]) == (2 + 1) + (5 + 1) + (9 + 1)  # words + EOS; BOS and padding never


def test_no_look_ahead():
    run, _ = model_for(coca_cfg())
    imgs, toks = images(2), captions([8, 8])
    memory = run("caption_memory", imgs)
    base = np.asarray(run("logits", memory, toks))
    for j in (3, 7):
        changed = toks.at[:, j].set((toks[:, j] + 5) % (VOCAB - 3) + 3)
        logits = np.asarray(run("logits", memory, changed))
        # Position t predicts token t+1 from tokens <= t: changing token j leaves positions < j untouched.
        np.testing.assert_array_equal(logits[:, :j], base[:, :j])
        assert np.abs(logits[:, j:] - base[:, j:]).max() > 1e-4  # ... and does change what follows
    # The text embedding is read at the end token: a change after it changes nothing either.
    np.testing.assert_array_equal(run("encode_text", toks.at[:, 11].set(5)), run("encode_text", toks))


def test_padding_is_ignored():
    run, _ = model_for(coca_cfg())
    imgs, toks = images(2), captions([3, 6])
    noisy = np.array(toks)
    noisy[0, 5:] = 7  # everything after row 0's EOS (at 4) becomes a real-looking word
    noisy[1, 8:] = EOS  # extra end tokens after row 1's first one
    a, b = run("__call__", imgs, toks), run("__call__", imgs, jnp.asarray(noisy))
    for key in ("caption_nll", "caption_tokens", "txt", "img"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"tie_embedding": False, "caption_chunk": 3}, {"caption_chunk": 64}])
def test_caption_nll_equals_dense_numpy_reference(overrides):
    run, _ = model_for(coca_cfg(**overrides))
    imgs, lengths = images(3), [2, 5, 10]
    toks = captions(lengths)
    out = run("__call__", imgs, toks)
    logits = np.float64(run("logits", run("caption_memory", imgs), toks))  # [B, L, V], dense
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll, count = 0.0, 0
    for row, n in enumerate(lengths):
        for t in range(n + 1):  # positions 0..n predict tokens 1..n+1 (the words, then EOS)
            nll -= logp[row, t, int(toks[row, t + 1])]
            count += 1
    np.testing.assert_allclose(float(out["caption_nll"]), nll, rtol=1e-5)
    assert float(out["caption_tokens"]) == count


def test_untied_head_has_its_own_matrix():
    _, tied = model_for(coca_cfg())
    _, untied = model_for(coca_cfg(tie_embedding=False))
    assert "head_kernel" not in nnx.to_pure_dict(tied)
    assert nnx.to_pure_dict(untied)["head_kernel"].shape == (VOCAB, 32)


def test_every_parameter_has_logical_axis_names():
    model = coca.abstract(coca_cfg())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    flat_specs = dict(
        jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec, name = flat_specs[path], path[-1].key
        assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
        assert all(n in layers.AXIS_NAMES for n in spec), (path, spec)
        if name.endswith(("kernel", "_embedding", "queries")):  # every weight matrix is FSDP-shardable
            assert "embed" in spec, (path, spec)


def test_beam_one_equals_greedy_on_the_decoder():
    cfg = coca_cfg()
    model = coca.CoCa(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    search = dict(max_len=10, bos=BOS, eos=EOS, pad=PAD)

    @functools.partial(jax.jit, static_argnums=(2,))
    def run(state, imgs, beam):
        m = nnx.merge(graphdef, state)
        return generate.caption(m, imgs, beam_size=beam, length_penalty=0.6, **search)

    imgs = images(4)
    g_tokens, _ = run(state, imgs, 1)
    memory = jax.jit(lambda s, x: nnx.merge(graphdef, s).caption_memory(x))(state, imgs)
    fn = lambda toks, t: nnx.merge(graphdef, state).next_token_logprobs(memory, toks, t)  # noqa: E731
    b_tokens, _ = jax.jit(lambda: generate.beam_search(fn, batch=4, beam_size=1, length_penalty=0.6, **search))()
    np.testing.assert_array_equal(np.asarray(b_tokens[:, 0]), np.asarray(g_tokens))
    # Greedy really is step-by-step argmax: re-derive the first generated token from teacher-forced logits.
    start = jnp.full((4, 10), PAD, jnp.int32).at[:, 0].set(BOS)
    first = jnp.argmax(jax.jit(fn, static_argnums=1)(start, 0), axis=-1)
    np.testing.assert_array_equal(np.asarray(g_tokens[:, 1]), np.asarray(first))
