"""open_clip format import and export, checked against open-clip-torch's own CLIP classes.

The reference is open_clip's unmodified model code (tests/reference_libs.py: open_clip_model_module): tiny
random CLIP / CustomTextCLIP models built from several model configs, every parameter perturbed (so a LayerNorm
or bias cannot hide behind its ones/zeros init), saved as open_clip saves them (a hub-style directory, or a
training checkpoint {"state_dict": {"module.<key>": ...}} plus a model config), converted, and run on the same
images and on token ids from open_clip's own tokenizer.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flax import nnx  # noqa: E402
from reference_libs import open_clip_model_module, open_clip_module  # noqa: E402

from clip_jax.convert import files, hf, open_clip, open_clip_config  # noqa: E402
from clip_jax.input import tokenizer as tokenizer_lib  # noqa: E402
from clip_jax.models import two_tower  # noqa: E402

CONTEXT, TOL = 16, 1e-5
CAPTIONS = ["a photo of a goldfish.", "Two DOGS & a cat!", "", "an extremely long caption " * 4 + "that is cut"]
VISION = {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8}
TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
MODELS = {
    # OpenAI / LAION CLIP layout: QuickGELU, causal text pooled at the largest id (the end token).
    "quickgelu": {"quick_gelu": True},
    # gelu (erf), text pooled at eos_id through a biased projection, no ln_pre, LayerNorm eps 1e-6, and an image
    # size that is not a multiple of the patch (36 px: 4 x 4 patches of 8, 4 pixels unseen).
    "gelu_proj_bias": {
        "vision_cfg": {"image_size": 36, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"proj_bias": True, "pool_type": "eos", "eos_id": 49407, "norm_kwargs": {"eps": 1e-6}},
    },
    # SigLIP-style in open_clip's format: CustomTextCLIP layout ('text.' keys), logit bias, [1]-shaped scale and
    # bias, bidirectional text pooled at the last position, tanh gelu, mlp_ratio 3.5, final_ln_after_pool.
    "sigmoid_custom_text": {
        "custom_text": True,
        "init_logit_bias": -10.0,
        "nonscalar_logit_scale": True,
        "vision_cfg": {"act_kwargs": {"approximate": "tanh"}, "final_ln_after_pool": True},
        "text_cfg": {
            "no_causal_mask": True,
            "pool_type": "last",
            "mlp_ratio": 3.5,
            "act_kwargs": {"approximate": "tanh"},
        },
    },
    # No text projection (text width = embed_dim), bidirectional, pooled at the first token; 4 px patches.
    "first_no_proj": {
        "embed_dim": 32,
        "vision_cfg": {"patch_size": 4, "head_width": 16},
        "text_cfg": {"proj_type": "none", "pool_type": "first", "no_causal_mask": True},
    },
}
PREPROCESS = {
    "quickgelu": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear"},
    "gelu_proj_bias": {"resize_mode": "squash", "interpolation": "bicubic"},
}


def model_cfg(name):
    overrides = MODELS[name]
    cfg = {"embed_dim": 24, **{k: v for k, v in overrides.items() if not k.endswith("_cfg")}}
    cfg["vision_cfg"] = {**VISION, **overrides.get("vision_cfg", {})}
    cfg["text_cfg"] = {**TEXT, **overrides.get("text_cfg", {})}
    return cfg


def build(cfg, seed=0):
    """open_clip's CLIP (or CustomTextCLIP), every parameter perturbed, in eval mode."""
    model_module = open_clip_model_module()
    cls = model_module.CustomTextCLIP if cfg.get("custom_text") else model_module.CLIP
    torch.manual_seed(seed)
    model = cls(**{k: v for k, v in cfg.items() if k != "custom_text"})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """(name, model_cfg, open_clip model, its hub-style directory, its training checkpoint file, config json)."""
    name, cfg = request.param, model_cfg(request.param)
    model, root = build(cfg), tmp_path_factory.mktemp(request.param)
    state = model.state_dict()
    directory = root / "hub"
    directory.mkdir()
    with open(directory / open_clip.CONFIG_NAME, "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": PREPROCESS.get(name, {})}, f)
    if name in ("quickgelu", "sigmoid_custom_text"):
        safetensors_torch.save_file(state, str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(state, directory / "open_clip_pytorch_model.bin")
    # As open_clip's training loop saves: DistributedDataParallel's 'module.' prefix, optimizer state beside it.
    checkpoint = {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                  "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}  # fmt: skip
    torch.save(checkpoint, root / "epoch_2.pt")
    with open(root / "model.json", "w") as f:
        json.dump(cfg, f)
    return name, cfg, model, str(directory), str(root / "epoch_2.pt"), str(root / "model.json")


def _inputs(cfg, n=4):
    size = cfg["vision_cfg"]["image_size"]
    images = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
    tokens = open_clip_module("tokenizer").SimpleTokenizer(context_length=CONTEXT)(CAPTIONS[:n]).numpy()
    return images, tokens.astype(np.int32)


def _ours(cfg, params):
    graphdef, _ = nnx.split(two_tower.abstract(cfg.model))
    return nnx.merge(graphdef, params)


def _reference(model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(torch.tensor(images.transpose(0, 3, 1, 2)), normalize=True).numpy()
        txt = model.encode_text(torch.tensor(tokens, dtype=torch.long), normalize=True).numpy()
    return img, txt


@pytest.mark.parametrize("source", ["directory", "checkpoint"])
def test_import_matches_open_clip(saved, source):
    name, cfg, model, directory, checkpoint, config_json = saved
    ours_cfg, params, _ = (
        open_clip.import_model(directory)
        if source == "directory"
        else open_clip.import_model(checkpoint, config_json)
    )
    images, tokens = _inputs(cfg)
    # Our tokenizer, as the import configures it, gives open_clip's ids (the text tower then sees the same input).
    np.testing.assert_array_equal(tokenizer_lib.make(ours_cfg)(CAPTIONS), tokens)
    ref_img, ref_txt = _reference(model, images, tokens)
    out = _ours(ours_cfg, params)(images, tokens)
    diffs = {"image": np.abs(np.asarray(out["img"]) - ref_img).max()}
    diffs["text"] = np.abs(np.asarray(out["txt"]) - ref_txt).max()
    print(name, source, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    assert float(out["log_t"]) == model.logit_scale.item()
    assert float(out["bias"]) == (model.logit_bias.item() if model.logit_bias is not None else 0.0)
    # The pooled position matters: different captions give different embeddings.
    assert np.abs(np.asarray(out["txt"])[0] - np.asarray(out["txt"])[1]).max() > 1e-2


# name -> (activation, text pool, text causal, image pre_ln, loss): what each MODELS entry must import as.
EXPECTED = {
    "quickgelu": ("quick_gelu", "argmax", True, True, "softmax"),
    "gelu_proj_bias": ("gelu", "eos", True, False, "softmax"),
    "sigmoid_custom_text": ("gelu_tanh", "last", False, True, "sigmoid"),
    "first_no_proj": ("gelu", "first", False, True, "softmax"),
}


def test_import_config(saved):
    name, _, _, directory, checkpoint, config_json = saved
    ours, _, notes = open_clip.import_model(directory)
    m = ours.model
    assert notes == [] and ours.tokenizer.kind == "clip_bpe" and m.text.max_len == CONTEXT
    assert (m.image.pool, m.image.proj, m.image.proj_bias, m.image.patch_bias) == ("cls", True, False, False)
    act, pool, causal, pre_ln, loss = EXPECTED[name]
    assert (m.image.act, m.text.act, m.text.pool, m.text.causal, m.image.pre_ln) == (
        act,
        act,
        pool,
        causal,
        pre_ln,
    )
    assert ours.loss.kind == loss and m.text.mask_padding is False
    pp = PREPROCESS.get(name, {})
    np.testing.assert_allclose(ours.data.image_mean, pp.get("mean", open_clip_config.OPENAI_MEAN))
    np.testing.assert_allclose(ours.data.image_std, pp.get("std", open_clip_config.OPENAI_STD))
    assert ours.data.resample == pp.get("interpolation", "bicubic")
    assert ours.data.eval_crop == ("resize" if pp.get("resize_mode") == "squash" else "centre")
    # A training checkpoint has no preprocess_cfg: open_clip's defaults (OpenAI statistics, bicubic, centre crop).
    from_checkpoint = open_clip.import_model(checkpoint, config_json)[0]
    assert from_checkpoint.model.to_dict() == ours.model.to_dict()
    d = from_checkpoint.data
    assert (d.image_mean, d.image_std, d.eval_crop) == (
        open_clip_config.OPENAI_MEAN,
        open_clip_config.OPENAI_STD,
        "centre",
    )


def _load_export(directory):
    """open_clip's CLIP built from the exported open_clip_config.json, the weights loaded with strict=True."""
    with open(os.path.join(directory, open_clip.CONFIG_NAME)) as f:
        config = json.load(f)
    model = build(config["model_cfg"])
    model.load_state_dict(
        safetensors_torch.load_file(os.path.join(directory, open_clip.EXPORT_WEIGHTS)), strict=True
    )
    return model.eval(), config


def test_export_round_trip(saved, tmp_path):
    """open_clip -> clip_jax (through a written checkpoint for one model) -> open_clip: every tensor equal, and
    open_clip's CLIP built from the exported config loads them strictly and gives the same embeddings."""
    name, cfg, model, directory, _, _ = saved
    ours, params, _ = open_clip.import_model(directory)
    if name == "quickgelu":
        files.write_checkpoint(ours, params, str(tmp_path / "work"))
        ours, params = files.read_checkpoint(str(tmp_path / "work"))
    open_clip.export_model(ours, params, str(tmp_path / "out"))
    loaded, config = _load_export(str(tmp_path / "out"))
    original = {k.removeprefix("text."): v for k, v in model.state_dict().items()}  # CLIP layout on export
    exported = loaded.state_dict()
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key].reshape(tensor.shape), tensor), key
    images, tokens = _inputs(cfg)
    for a, b in zip(_reference(model, images, tokens), _reference(loaded, images, tokens)):
        np.testing.assert_array_equal(a, b)
    assert config["preprocess_cfg"]["mean"] == list(ours.data.image_mean)


def _clip_jax_model(act, ln_eps, loss):
    """A clip_jax two-tower model in open_clip's layout, random parameters (all perturbed)."""
    from clip_jax import config as config_lib

    cfg = config_lib.base()
    m = cfg.model
    m.embed_dim, m.bias_init, cfg.loss.kind, cfg.tokenizer.kind = 24, -5.0, loss, "clip_bpe"
    m.image.update(variant="mu/8", width=48, depth=2, mlp_dim=80, num_heads=4, image_size=32, proj_bias=False,
                   patch_bias=False, pre_ln=True, act=act, ln_eps=ln_eps)  # fmt: skip
    # 56 * (244 / 56) is just under 244 in floats: the exported mlp_ratio must round up for int(width * ratio).
    m.text.update(variant="mu", width=56, depth=2, mlp_dim=244, num_heads=4, max_len=CONTEXT, proj_bias=True,
                  act=act, ln_eps=ln_eps, pool="eos")  # fmt: skip
    params = nnx.to_pure_dict(nnx.state(two_tower.TwoTower(m, rngs=nnx.Rngs(params=3)), nnx.Param))
    rng = np.random.default_rng(4)
    return cfg, jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32), params)


@pytest.mark.parametrize("act,ln_eps,loss", [("gelu_tanh", 1e-6, "sigmoid"), ("quick_gelu", 1e-5, "softmax")])
def test_export_of_a_clip_jax_model_loads_in_open_clip(act, ln_eps, loss, tmp_path):
    cfg, params = _clip_jax_model(act, ln_eps, loss)
    open_clip.export_model(cfg, params, str(tmp_path))
    loaded, config = _load_export(str(tmp_path))
    images, tokens = _inputs({"vision_cfg": {"image_size": 32}})
    ours = _ours(cfg, params)(images, tokens)
    ref_img, ref_txt = _reference(loaded, images, tokens)
    assert np.abs(np.asarray(ours["img"]) - ref_img).max() <= TOL
    assert np.abs(np.asarray(ours["txt"]) - ref_txt).max() <= TOL
    assert loaded.logit_scale.item() == float(ours["log_t"])
    assert (loaded.logit_bias is not None) == (loss == "sigmoid")
    if loss == "sigmoid":
        assert loaded.logit_bias.item() == float(ours["bias"])
    # The exported config imports back to the same model.
    back, _ = open_clip_config.config_from_open_clip(config["model_cfg"], config["preprocess_cfg"])
    for tower in ("image", "text"):
        for key in ("width", "depth", "mlp_dim", "num_heads", "act", "ln_eps", "pool", "causal", "proj_bias"):
            if key in back.model[tower]:
                assert back.model[tower][key] == cfg.model[tower][key], (tower, key)


def _with(name, section, **changes):
    cfg = model_cfg(name)
    (cfg[section] if section else cfg).update(changes)
    return cfg


@pytest.mark.parametrize(
    "cfg,match",
    [
        (_with("quickgelu", "vision_cfg", attentional_pool=True), "attentional_pool=True.*attentional pooler"),
        (_with("quickgelu", "vision_cfg", ls_init_value=1e-4), "ls_init_value=0.0001.*LayerScale"),
        (_with("quickgelu", "vision_cfg", pool_type="avg"), "pool_type='avg'"),
        (_with("quickgelu", "vision_cfg", pos_embed_type="sin_cos_2d"), "pos_embed_type='sin_cos_2d'"),
        (_with("quickgelu", "vision_cfg", timm_model_name="vit_base_patch16_224"), "timm image towers"),
        (_with("quickgelu", "vision_cfg", layers=[3, 4, 6, 3]), "ModifiedResNet"),
        (_with("quickgelu", "vision_cfg", qk_norm=True), "qk_norm=True"),
        (_with("quickgelu", "vision_cfg", image_size=[32, 48]), "square"),
        (_with("quickgelu", "vision_cfg", head_width=10), "not a multiple of head_width=10"),
        ({"vision_cfg": VISION, "text_cfg": TEXT}, "lacks embed_dim"),
        (_with("quickgelu", "text_cfg", hf_tokenizer_name="bert-base-uncased"), "HF tokenizers"),
        (_with("quickgelu", "text_cfg", hf_model_name="roberta-base"), "HF text towers"),
        (_with("quickgelu", "text_cfg", embed_cls=True), "embed_cls=True"),
        (_with("quickgelu", "text_cfg", tokenizer_kwargs={"clean": "canonicalize"}), "tokenizer_kwargs"),
        (_with("quickgelu", "text_cfg", proj_type="mlp"), "proj_type='mlp'"),
        (_with("quickgelu", "text_cfg", a_new_option=1), "text_cfg.a_new_option is an option"),
        (_with("quickgelu", "", multimodal_cfg={"width": 32}), "multimodal_cfg"),
        (_with("quickgelu", "vision_cfg", act_kwargs={"approximate": "tanh"}), "with quick_gelu"),
    ],
)
def test_unsupported_options_are_one_line_errors(cfg, match):
    with pytest.raises(hf.ConversionError, match=match) as info:
        open_clip_config.config_from_open_clip(cfg)
    assert "\n" not in str(info.value)


def test_installed_model_configs_map_or_refuse_clearly():
    """Every config open-clip-torch ships either maps or raises ConversionError (never another error); the native
    ViT CLIPs map and their dimensions agree with open_clip's own model built from the same config (meta device:
    no memory), by parameter count, heads and MLP width."""
    folder = os.path.dirname(open_clip._installed_config("ViT-B-32"))
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
    mapped = {}
    for name in names:
        try:
            mapped[name] = open_clip_config.config_from_open_clip(*open_clip.read_model_config(name))[0]
        except hf.ConversionError:
            pass
    print(f"{len(mapped)} of {len(names)} installed open_clip configs map")
    for name in ("ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14", "ViT-e-14"):
        assert name in mapped, name
    for name in ("RN50", "coca_ViT-B-32", "ViT-B-16-SigLIP", "ViT-M-16-alt", "ViT-L-14-CLIPA", "EVA02-B-16"):
        assert name not in mapped, name
    for name in ("ViT-B-32", "ViT-H-14", "ViT-bigG-14"):  # head_width 64, 80, 104; mlp_ratio 4 and 4.9231
        cfg, _ = open_clip.read_model_config(name)
        with torch.device("meta"):
            ref = open_clip_model_module().CLIP(**cfg)
        ours = two_tower.param_counts(two_tower.abstract(mapped[name].model))
        assert ours["total"] - 1 == sum(p.numel() for p in ref.parameters()), name  # our unused logit bias
        block = ref.visual.transformer.resblocks[0]
        assert (block.attn.num_heads, block.mlp.c_fc.out_features) == (
            mapped[name].model.image.num_heads,
            mapped[name].model.image.mlp_dim,
        )


def test_weights_that_do_not_fit_name_the_key(saved, tmp_path):
    _, cfg, model, *_ = saved
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    ours, _ = open_clip_config.config_from_open_clip(cfg)
    abstract = nnx.to_pure_dict(nnx.state(two_tower.abstract(ours.model), nnx.Param))
    prefix = "text." if cfg.get("custom_text") else ""
    missing = {k: v for k, v in state.items() if k != f"{prefix}transformer.resblocks.1.mlp.c_proj.bias"}
    with pytest.raises(hf.ConversionError, match=r"lack .*resblocks\.1\.mlp\.c_proj\.bias"):
        open_clip.params_from_open_clip(missing, cfg, abstract)
    with pytest.raises(hf.ConversionError, match="visual.extra"):
        open_clip.params_from_open_clip({**state, "visual.extra": np.zeros(3)}, cfg, abstract)
    wrong = {**state, "visual.proj": np.zeros((5, 5), np.float32)}
    with pytest.raises(hf.ConversionError, match="visual.proj has shape"):
        open_clip.params_from_open_clip(wrong, cfg, abstract)


def test_files_that_are_not_open_clip_models_are_clear_errors(saved, tmp_path):
    *_, checkpoint, config_json = saved
    with pytest.raises(hf.ConversionError, match="none of open_clip_model.safetensors"):
        open_clip.read(str(tmp_path))
    with pytest.raises(hf.ConversionError, match="--model-config"):
        open_clip.read(checkpoint)
    with pytest.raises(hf.ConversionError, match="neither a file nor an open_clip model config"):
        open_clip.read(checkpoint, "ViT-Nope-99")
    with pytest.raises(hf.ConversionError, match="neither an open_clip model directory"):
        open_clip.read(str(tmp_path / "missing"))
    torch.save({"epoch": 1}, tmp_path / "no_state.pt")
    with pytest.raises(hf.ConversionError, match="holds no state dict"):
        open_clip.read(str(tmp_path / "no_state.pt"), config_json)


def test_installed_model_name_reads_its_config():
    cfg, preprocess = open_clip.read_model_config("ViT-B-32")
    with open(open_clip._installed_config("ViT-B-32")) as f:
        assert cfg == json.load(f) and preprocess == {}


def test_preprocessing_that_the_eval_view_lacks_is_noted():
    cfg = model_cfg("quickgelu")
    _, notes = open_clip_config.config_from_open_clip(cfg, {"resize_mode": "longest", "size": 48})
    assert len(notes) == 2 and "resize_mode='longest'" in notes[0] and "size=48" in notes[1]
    ours, notes = open_clip_config.config_from_open_clip(cfg, {"interpolation": "random"})
    assert notes == [] and ours.data.resample == "bicubic"  # open_clip evaluates 'random' as bicubic
    ours, notes = open_clip_config.config_from_open_clip(_with("quickgelu", "text_cfg", vocab_size=1000))
    assert ours.tokenizer.kind == "hashed_words" and "no tokenizer" in notes[0]


def test_export_refuses_models_open_clip_cannot_represent():
    from clip_jax import config as config_lib

    cfg = config_lib.base()  # our default two-tower: patch/projection biases, hashed words
    with pytest.raises(hf.ConversionError, match="model.image.proj_bias=True"):
        open_clip_config.config_to_open_clip(cfg)
    cfg, _ = _clip_jax_model("gelu", 1e-5, "softmax")
    cfg.model.text.act = "quick_gelu"
    with pytest.raises(hf.ConversionError, match="quick_gelu sets both towers"):
        open_clip_config.config_to_open_clip(cfg)
    cfg.model.text.act, cfg.tokenizer.kind = "gelu", "hashed_words"
    with pytest.raises(hf.ConversionError, match="tokenizer.kind='hashed_words'"):
        open_clip_config.config_to_open_clip(cfg)


@pytest.mark.slow
def test_cli_import_eval_and_export(saved, tmp_path):
    """The commands for the README: convert --from open_clip (a training checkpoint + --model-config), eval with
    configs/imported.py on the embedded set, convert --to open_clip."""
    name, _, model, _, checkpoint, config_json = saved
    if name != "gelu_proj_bias":
        pytest.skip("one model is enough for the command line")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = lambda *a: subprocess.run([sys.executable, "-m", "clip_jax.main", *a], capture_output=True, text=True,
                                    env=env, timeout=600)  # fmt: skip
    work = str(tmp_path / "work")
    r = run("convert", "--from=open_clip", f"--model-dir={checkpoint}", f"--model-config={config_json}",
            f"--workdir={work}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported" in r.stdout
    data = [
        "--config.data.data_dir=" + str(tmp_path / "tfds"),
        "--config.evals.zeroshot.dataset=clip_shapes/small",
    ]
    data += ["--config.evals.zeroshot.max_examples=64", "--config.evals.zeroshot.batch_size=64"]
    r = run("eval", f"--config=configs/imported.py:{work}", f"--workdir={work}", *data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint at step 0" in r.stdout and "top-1" in r.stdout, r.stdout
    r = run("convert", "--to=open_clip", f"--workdir={work}", f"--model-dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, _ = _load_export(str(tmp_path / "out"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    r = run("convert", "--from=open_clip", f"--model-dir={checkpoint}", f"--workdir={tmp_path / 'w2'}")
    assert r.returncode == 2 and "error: " in r.stderr and "--model-config" in r.stderr


def test_damaged_weights_and_an_existing_export_dir_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    from clip_jax import config as config_lib

    path = str(tmp_path / "w.safetensors")
    save_file({"logit_scale": np.zeros((), np.float32), "x": np.ones((64, 64), np.float32)}, path)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    with pytest.raises(hf.ConversionError, match="cannot read .* damaged or incomplete"):
        open_clip.read_weights(path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("a user's file")
    with pytest.raises(hf.ConversionError, match="already exists and is not an empty directory"):
        open_clip.export_model(config_lib.base(), {}, str(tmp_path / "model"))
