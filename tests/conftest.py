"""Test setup: 8 simulated CPU devices, set before anything imports jax."""

import os
import socket

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)

# Tests compile the same train step several times (fresh run, resumed run): a persistent compilation cache makes
# the repeats free. Kept per user under /tmp so it never lands in the repo.
jax.config.update("jax_compilation_cache_dir", os.path.join("/tmp", f"clip_jax_jit_cache_{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def no_network():
    """Any connection attempt during a module that uses this fails loudly (tfds must never reach the network)."""
    original = socket.socket.connect

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    socket.socket.connect = refuse
    yield
    socket.socket.connect = original


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A tfds data_dir with the small splits of clip_shapes and clip_shapes_captions, prepared once per session."""
    from clip_jax import datasets

    path = str(tmp_path_factory.mktemp("shapes_tfds"))
    datasets.prepare("clip_shapes", path, "small")
    datasets.prepare("clip_shapes_captions", path, "small")
    return path
