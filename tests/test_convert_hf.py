"""HF transformers CLIP/SigLIP import and export, checked against transformers' own torch models.

The reference is independent code: small random-initialised CLIPModel / SiglipModel built from configs (nothing
is downloaded), saved with save_pretrained, converted, and run on the same images and token ids. Every parameter
is perturbed first, so a LayerNorm scale/bias or q/k swap cannot hide behind HF's ones/zeros initialisation.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub name would fail instead of downloading
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flax import nnx  # noqa: E402

from clip_jax.convert import files, hf, hf_config  # noqa: E402
from clip_jax.input import ops  # noqa: E402
from clip_jax.models import two_tower  # noqa: E402

VOCAB, MAX_LEN, IMAGE, PATCH = 99, 16, 32, 8
TOL = 1e-4
TOWER = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _clip(eos_token_id, act="quick_gelu", image=IMAGE, patch=PATCH):
    text = {"vocab_size": VOCAB, "hidden_size": 32, "max_position_embeddings": MAX_LEN, "hidden_act": act, **TOWER}
    text.update(eos_token_id=eos_token_id, bos_token_id=VOCAB - 2, pad_token_id=1)
    vision = {"hidden_size": 48, "image_size": image, "patch_size": patch, "hidden_act": act, **TOWER}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(0)
    return _perturb(transformers.CLIPModel(config), 1)


def _siglip(image=IMAGE, patch=PATCH):
    text = {"vocab_size": VOCAB, "hidden_size": 32, "max_position_embeddings": MAX_LEN, "projection_size": 48}
    text.update(eos_token_id=1, pad_token_id=1, bos_token_id=None, **TOWER)
    vision = {"hidden_size": 48, "image_size": image, "patch_size": patch, **TOWER}
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    return _perturb(transformers.SiglipModel(config), 2)


MODELS = {"clip_argmax": lambda: _clip(2), "clip_eos": lambda: _clip(VOCAB - 1, "gelu"), "siglip": _siglip}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """(name, HF model, its directory)."""
    model = MODELS[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def _inputs(name, n=4):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)
    tokens = rng.integers(3, VOCAB - 1, size=(n, MAX_LEN)).astype(np.int32)
    if name.startswith("clip"):
        # End token at different places, then padding (0 and 1, as CLIP tokenizers differ); one row full length.
        for row, end in enumerate((4, 9, MAX_LEN - 1, 6)):
            tokens[row, end] = VOCAB - 1
            tokens[row, end + 1 :] = row % 2
    else:
        # SigLIP: padded to max_len with the pad (= end) id and no attention mask; pooled at the last position.
        for row, end in enumerate((4, 9, MAX_LEN - 1, 6)):
            tokens[row, end:] = 1
    return images, tokens


def _ours(cfg, params):
    graphdef, _ = nnx.split(two_tower.abstract(cfg.model))
    return nnx.merge(graphdef, params)


def _hf_outputs(model, images, tokens):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
        )
    return {k: getattr(out, k).numpy() for k in ("image_embeds", "text_embeds", "logits_per_image")}


def test_import_matches_transformers(saved):
    name, model, path = saved
    cfg, params = files.import_model(path)
    images, tokens = _inputs(name)
    ref = _hf_outputs(model, images, tokens)
    out = _ours(cfg, params)(images, tokens)
    logits = np.exp(out["log_t"]) * np.asarray(out["img"]) @ np.asarray(out["txt"]).T + out["bias"]
    diffs = {
        "image": np.abs(np.asarray(out["img"]) - ref["image_embeds"]).max(),
        "text": np.abs(np.asarray(out["txt"]) - ref["text_embeds"]).max(),
        "logits": np.abs(logits - ref["logits_per_image"]).max(),
    }
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    # The pooled position matters: the rows' embeddings differ (no accidental pooling of one shared position).
    assert np.abs(np.asarray(out["txt"])[0] - np.asarray(out["txt"])[1]).max() > 1e-2


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("image,patch", [(30, 4), (31, 8)])  # 7x7 patches of 30 px (2 unseen), 3x3 of 31 (7 unseen)
def test_image_size_not_a_multiple_of_the_patch_matches_transformers(family, image, patch, tmp_path):
    """As SigLIP so400m-patch14-384 (27 patches of 14 = 378 of 384 pixels): the reference's stride-p convolution
    leaves the last rows and columns unseen; the import runs at the same size and sees exactly what it sees."""
    model = _clip(2, image=image, patch=patch) if family == "clip" else _siglip(image=image, patch=patch)
    model.save_pretrained(tmp_path)
    cfg, params = files.import_model(str(tmp_path))
    assert cfg.model.image.image_size == image and cfg.model.image.patch_size == patch
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, image, image, 3)).astype(np.float32)
    _, tokens = _inputs(family)
    ref = _hf_outputs(model, images, tokens[:3])["image_embeds"]
    ours = _ours(cfg, params)
    got = np.asarray(ours.encode_image(images))
    assert np.abs(got - ref).max() <= 1e-5, np.abs(got - ref).max()
    # The unseen pixels change nothing, for both (a model that resized or padded would see them).
    seen = image // patch * patch
    changed = images.copy()
    changed[:, seen:], changed[:, :, seen:] = 7.0, -7.0
    np.testing.assert_array_equal(np.asarray(ours.encode_image(changed)), got)
    np.testing.assert_allclose(_hf_outputs(model, changed, tokens[:3])["image_embeds"], ref, rtol=0, atol=1e-6)


def test_import_config(saved):
    name, _, path = saved
    cfg, _ = files.import_model(path)
    m = cfg.model
    if name.startswith("clip"):
        assert (m.image.pool, m.image.pre_ln, m.image.proj_bias, m.image.patch_bias) == ("cls", True, False, False)
        assert m.text.pool == ("argmax" if name == "clip_argmax" else "eos")
        assert m.text.act == ("quick_gelu" if name == "clip_argmax" else "gelu") and m.text.ln_eps == 1e-5
        assert cfg.loss.kind == "softmax" and cfg.data.eval_crop == "centre"
        np.testing.assert_allclose(cfg.data.image_mean, (0.4815, 0.4578, 0.4082), atol=1e-4)
        np.testing.assert_allclose(cfg.data.image_std, (0.2686, 0.2613, 0.2758), atol=1e-4)
    else:
        assert (m.image.pool, m.image.proj, m.text.pool, m.text.mask_padding) == ("map", False, "last", False)
        assert (m.text.act, m.embed_dim, cfg.loss.kind) == ("gelu_tanh", 48, "sigmoid")
        assert cfg.data.image_mean == (0.5, 0.5, 0.5) and cfg.data.eval_crop == "resize"


def test_round_trip_reproduces_the_state_dict(saved, tmp_path):
    """HF -> clip_jax checkpoint -> HF: every tensor equal, and transformers loads it with nothing missing."""
    name, model, path = saved
    cfg, params = files.import_model(path)
    files.write_checkpoint(cfg, params, str(tmp_path / "work"))
    cfg2, params2 = files.read_checkpoint(str(tmp_path / "work"))
    assert cfg2.to_dict() == cfg.to_dict()
    files.export_model(cfg2, params2, str(tmp_path / "out"))
    exported = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    original = model.state_dict()
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].shape == tensor.shape and torch.equal(exported[key], tensor), key
    loaded, info = type(model).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info
    images, tokens = _inputs(name)
    a, b = _hf_outputs(model, images, tokens), _hf_outputs(loaded.eval(), images, tokens)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_unsupported_models_are_clear_errors(tmp_path):
    path = tmp_path / "vision_only"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=32, **TOWER)).save_pretrained(path)
    with pytest.raises(hf.ConversionError, match="model_type 'clip_vision_model' is not supported"):
        files.import_model(str(path))
    config = transformers.SiglipConfig(vision_config={"vision_use_head": False, "hidden_size": 32, **TOWER})
    with pytest.raises(hf.ConversionError, match="vision_use_head=False"):
        hf_config.config_from_hf(config.to_dict())
    with pytest.raises(hf.ConversionError, match="no config.json"):
        files.import_model(str(tmp_path))


def test_export_refuses_configs_hf_cannot_represent():
    from clip_jax import config as config_lib

    cfg = config_lib.base()  # our default two-tower: patch/projection biases, no ln_pre
    with pytest.raises(hf.ConversionError, match="model.image.proj_bias=True: HF clip needs False"):
        hf_config.config_to_hf(cfg)
    cfg.model.image.pool = "gap"
    with pytest.raises(hf.ConversionError, match="pool='gap'"):
        hf_config.config_to_hf(cfg)


def test_weights_missing_a_layer_name_the_key(saved, tmp_path):
    name, model, path = saved
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.fc2.bias" not in k}
    hf_cfg = files.read_hf_config(path)
    cfg = hf_config.config_from_hf(hf_cfg)
    abstract = files._pure(two_tower.abstract(cfg.model))
    with pytest.raises(hf.ConversionError, match=r"lack .*layers\.1\.mlp\.fc2\.bias"):
        hf.params_from_hf({k: v.numpy() for k, v in state.items()}, hf_cfg["model_type"], abstract)


def test_preprocessing_matches_the_hf_image_processors():
    """Our eval views with the imported constants equal transformers' (PIL) image processors' pixel values."""
    rng = np.random.default_rng(3)
    # tests/test_image_fidelity.py covers ~20 other sizes, odd and smaller than the crop.
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    for family, processor in (
        ("clip", transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)),
        ("siglip", transformers.SiglipImageProcessor(size={"height": 32, "width": 32})),
    ):
        mean, std, crop, _ = hf.PREPROCESS[family]
        ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = ops.eval_view(image, 32, crop, mean, std)
        assert ours.shape == ref.shape
        diff = np.abs(ours - ref).max()
        print(family, f"max pixel diff {diff:.2e}")
        assert diff <= 1e-4, (family, diff)


def test_imported_checkpoint_evaluates_zero_shot(tmp_path):
    """configs/imported.py:<workdir> rebuilds the config, and the standard evaluator runs on the checkpoint."""
    import importlib.util

    from clip_jax.evaluate.suite import evaluate_checkpoint

    _clip(2).save_pretrained(tmp_path / "hf")
    cfg, params = files.import_model(str(tmp_path / "hf"))
    work = str(tmp_path / "work")
    files.write_checkpoint(cfg, params, work)
    spec = importlib.util.spec_from_file_location("imported_cfg", os.path.join("configs", "imported.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg2 = module.get_config(work)
    assert cfg2.to_dict() == cfg.to_dict()
    cfg2.data.data_dir, cfg2.evals.zeroshot.dataset = str(tmp_path / "tfds"), "clip_shapes/small"
    cfg2.evals.zeroshot.templates = "plain"
    cfg2.evals.zeroshot.max_examples, cfg2.evals.zeroshot.batch_size = 64, 64
    result = evaluate_checkpoint(cfg2, work)
    assert result["step"] == 0 and result["sections"]["zeroshot"]["examples"] == 64


@pytest.mark.slow
def test_cli_import_then_eval_and_export(tmp_path):
    """The commands the README shows: convert --from hf, eval on the embedded set, convert --to hf."""
    model = _clip(2)
    model.save_pretrained(tmp_path / "hf")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = lambda *a: subprocess.run([sys.executable, "-m", "clip_jax.main", *a], capture_output=True, text=True,
                                    env=env, timeout=600)  # fmt: skip
    work = str(tmp_path / "work")
    r = run("convert", "--from=hf", f"--model-dir={tmp_path / 'hf'}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(os.path.join(work, "config.json")))["model"]["text"]["pool"] == "argmax"
    data = ["--config.data.data_dir=" + str(tmp_path / "tfds"), "--config.evals.zeroshot.dataset=clip_shapes/small"]
    data += ["--config.evals.zeroshot.max_examples=64", "--config.evals.zeroshot.batch_size=64"]
    r = run("eval", f"--config=configs/imported.py:{work}", f"--workdir={work}", *data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint at step 0" in r.stdout and "top-1" in r.stdout, r.stdout
    r = run("convert", "--to=hf", f"--workdir={work}", f"--model-dir={tmp_path / 'back'}")
    assert r.returncode == 0, r.stderr[-2000:]
    back = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    r = run("convert", "--from=hf", f"--model-dir={tmp_path}", f"--workdir={tmp_path / 'w2'}")
    assert r.returncode == 2 and "error: " in r.stderr and "no config.json" in r.stderr


def test_new_model_options_are_validated():
    from clip_jax import config as config_lib
    from clip_jax import config_checks

    cfg = config_lib.base()
    cfg.model.text.act = "relu"
    with pytest.raises(config_lib.ConfigError, match="model.text.act"):
        config_checks.validate(cfg, 8)
    cfg = config_lib.base()
    cfg.data.image_std = (0.5, 0.0, 0.5)
    with pytest.raises(config_lib.ConfigError, match="data.image_std"):
        config_checks.validate(cfg, 8)


def _preprocessor_dir(tmp_path, **settings):
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, **settings}, f)
    return str(tmp_path)


def test_import_reads_the_processors_resample_filter(tmp_path):
    """Pillow's filter numbers (transformers' `resample`) become data.resample; the family default is bicubic."""
    expected = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
    for number, name in expected.items():
        assert files.read_preprocess(_preprocessor_dir(tmp_path, resample=number))[3] == name
    assert files.read_preprocess(_preprocessor_dir(tmp_path))[3] == "bicubic"
    with pytest.raises(hf.ConversionError, match="resample=7"):
        files.read_preprocess(_preprocessor_dir(tmp_path, resample=7))


def test_import_notes_what_the_eval_view_does_not_reproduce(tmp_path):
    clip_like = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True}
    assert files.preprocess_notes(_preprocessor_dir(tmp_path, **clip_like), 224) == []
    notes = files.preprocess_notes(_preprocessor_dir(tmp_path, **{**clip_like, "size": {"shortest_edge": 256}}), 224)
    assert len(notes) == 1 and "shortest_edge" in notes[0] and notes[0].startswith("note: ")
    odd = {"size": {"height": 224, "width": 224}, "rescale_factor": 1 / 127.5, "do_normalize": False}
    assert len(files.preprocess_notes(_preprocessor_dir(tmp_path, **odd), 224)) == 2


def test_damaged_model_files_are_one_line_errors(saved, tmp_path):
    """What a user trial hit: each of these used to end in a traceback."""
    import shutil

    name, _, path = saved
    if name != "clip_eos":
        pytest.skip("one model is enough for the file handling")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = (bad / "model.safetensors").read_bytes()
    for data in (weights[: len(weights) // 2], weights[:50]):  # cut mid-tensor; cut inside the header
        (bad / "model.safetensors").write_bytes(data)
        with pytest.raises(hf.ConversionError, match="cannot read the weights in .* damaged or incomplete"):
            files.import_model(str(bad))
    (bad / "model.safetensors").unlink()
    torch.save([1, 2, 3], bad / "pytorch_model.bin")
    with pytest.raises(hf.ConversionError, match="pytorch_model.bin holds a list, not a state dict"):
        files.import_model(str(bad))
    (bad / "pytorch_model.bin").write_text("not a pickle")
    with pytest.raises(hf.ConversionError, match="cannot read the weights"):
        files.import_model(str(bad))
    (bad / "config.json").write_text("{model_type: clip")
    with pytest.raises(hf.ConversionError, match="config.json is not a JSON object"):
        files.import_model(str(bad))
    wider = tmp_path / "wider"
    shutil.copytree(path, wider)
    config = json.loads((wider / "config.json").read_text())
    config["vision_config"]["hidden_size"] *= 2  # weights that do not fit their config.json
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ConversionError, match="does not fit .* the weights do not match config.json"):
        files.import_model(str(wider))


def test_export_never_overwrites_a_model_directory(saved, tmp_path):
    name, _, path = saved
    if name != "siglip":
        pytest.skip("one model is enough for the file handling")
    cfg, params = files.import_model(path)
    with pytest.raises(hf.ConversionError, match="already exists and is not an empty directory"):
        files.export_model(cfg, params, path)
    (tmp_path / "empty").mkdir()
    files.export_model(cfg, params, str(tmp_path / "empty"))  # an empty directory is fine
    assert (tmp_path / "empty" / "model.safetensors").exists()
