"""Pixels against the references users trust: EXIF orientation (Pillow's ImageOps.exif_transpose, transformers'
load_image), transparency over white (Pillow's alpha_composite, transformers' convert_to_rgb, float64 numpy) and
eval views (transformers' CLIP and SigLIP image processors, PIL backend), through every decode path: training,
the zero-shot / probe batches, retrieval, captioning and the caption CLI, and public tfds sets."""

import io
import os
import sys
import warnings

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import ExifTags, Image, ImageOps

from clip_jax import config as config_lib
from clip_jax import optim, sharding, train
from clip_jax import state as run_state
from clip_jax.evaluate import captioning, common, linear_probe, retrieval, suite
from clip_jax.input import decode, eval_data, ops, pipeline

transformers = pytest.importorskip("transformers")
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny_cpu

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
ROTATED, BAD_EXIF, ALPHA = decode.BIT["rotated_image"], decode.BIT["bad_exif"], decode.BIT["alpha_image"]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int, **tags) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    for tag, value in tags.items():
        exif[ExifTags.Base[tag]] = value
    return exif.tobytes()


def _photo(h=24, w=40, seed=0) -> Image.Image:
    """Smooth colours (JPEG keeps them) with a distinct corner, so every flip and turn looks different."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1).astype(np.uint8)
    arr[:4, :6] = (255, 0, 0)
    return Image.fromarray(arr)


def _pillow_upright(data: bytes, draft=None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft("RGB", draft)
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _hf_processor(family: str, size: int, resample: int = 3):
    if family == "clip":
        return transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=resample,
            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        )  # fmt: skip
    return transformers.SiglipImageProcessorPil(
        size={"height": size, "width": size}, resample=resample, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
    )


def _hf_view(processor, image) -> np.ndarray:
    """pixel_values [S, S, 3] of one image (a PIL image, or uint8 [H, W, 3] said to be channels-last)."""
    kw = {} if isinstance(image, Image.Image) else {"input_data_format": "channels_last"}
    return processor(images=image, return_tensors="np", **kw)["pixel_values"][0].transpose(1, 2, 0)


# --- EXIF orientation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(fmt, orientation):
    data = _encode(_photo(), fmt, exif=_exif(orientation))
    got, bits = decode.image(data, 32, 1)
    want = _pillow_upright(data)
    assert want.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))  # 5..8 swap the sides
    np.testing.assert_array_equal(got, want)
    assert bits == (ROTATED if orientation > 1 else 0)


def test_exif_orientation_after_jpeg_draft_mode():
    """A large sideways JPEG is decoded at reduced scale and then turned: Pillow's draft + exif_transpose."""
    data = _encode(_photo(300, 600), "JPEG", exif=_exif(6))
    got, bits = decode.image(data, 32, 1)
    np.testing.assert_array_equal(got, _pillow_upright(data, draft=(128, 128)))
    assert got.shape == (300, 150, 3) and bits == decode.BIT["large_image"] | ROTATED


def test_broken_exif_never_costs_the_image(monkeypatch):
    good = _exif(6, ImageDescription="x" * 200)
    truncated = _encode(_photo(), "JPEG", exif=good[: len(good) - 150])  # the description runs past the end
    garbage = _encode(_photo(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01")
    odd_value = _encode(_photo(), "JPEG", exif=_exif(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's EXIF warnings are counted, never printed per file
        for data in (truncated, garbage, odd_value):
            got, bits = decode.image(data, 32, 1)
            assert not bits & decode.SKIP_MASK
            np.testing.assert_array_equal(got, _pillow_upright(data))
        assert decode.image(truncated, 32, 1)[1] == ROTATED | BAD_EXIF  # the tag that was readable still applies
        assert decode.image(odd_value, 32, 1)[1] == 0  # not an orientation: pixels as stored

    def broken(*args, **kwargs):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    got, bits = decode.image(odd_value, 32, 1)
    assert bits == BAD_EXIF and got.shape == (24, 40, 3)


# --- transparency -------------------------------------------------------------------------------------------------


def _transparent_cases():
    """name -> (file bytes, expected mode bit, float64 numpy reference of the RGB over white or None)."""
    rng = np.random.default_rng(1)
    rgb = (rng.integers(0, 4, (10, 14, 3)) * 80).astype(np.uint8)
    grey = (rng.integers(0, 4, (10, 14)) * 80).astype(np.uint8)
    wide = (rng.integers(0, 4, (10, 14)) * 20000).astype(np.uint16)
    alpha = rng.integers(0, 256, (10, 14)).astype(np.float64)
    key = np.all(rgb == (80, 160, 0), -1)

    def over_white(colour, a):
        return np.round(colour * a[..., None] / 255 + 255 * (1 - a[..., None] / 255))

    grey3 = np.repeat(grey[..., None], 3, -1).astype(np.float64)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    partial = bytes(rng.integers(0, 256, 16).astype(np.uint8))  # a per-entry alpha (PNG tRNS of a palette)
    return {
        "RGB+tRNS": (
            _encode(Image.fromarray(rgb), "PNG", transparency=(80, 160, 0)), 0,
            np.where(key[..., None], 255, rgb),
        ),
        "L+tRNS": (_encode(Image.fromarray(grey), "PNG", transparency=80), "grayscale_image",
                   np.where(grey3 == 80, 255, grey3)),
        "1+tRNS": (_encode(Image.fromarray(grey > 80), "PNG", transparency=0), "grayscale_image",
                   np.full(grey3.shape, 255.0)),  # white pixels stay white, transparent black ones turn white
        "I;16+tRNS": (
            _encode(Image.fromarray(wide), "PNG", transparency=20000), "other_mode_image",
            np.repeat(np.where(wide == 20000, 255, np.round(wide.astype(np.float64) * 255 / 65535))[..., None], 3, -1),
        ),
        "P+index": (_encode(palette, "PNG", transparency=0), "palette_image", None),
        "P+alpha": (_encode(palette, "PNG", transparency=partial), "palette_image", None),
        "GIF": (_encode(palette, "GIF", transparency=3), "palette_image", None),
        "LA": (_encode(Image.fromarray(np.dstack([grey, alpha.astype(np.uint8)])), "PNG"), "grayscale_image",
               over_white(grey3, alpha)),
        "RGBA": (_encode(Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)])), "PNG"), 0,
                 over_white(rgb.astype(np.float64), alpha)),
        "RGBA-WEBP": (_encode(Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)])), "WEBP", lossless=True),
                      0, over_white(rgb.astype(np.float64), alpha)),
    }  # fmt: skip


TRANSPARENT = _transparent_cases()


@pytest.mark.parametrize("name", sorted(TRANSPARENT))
def test_any_transparency_is_composited_over_white_and_counted(name):
    data, mode_kind, numpy_ref = TRANSPARENT[name]
    got, bits = decode.image(data, 32, 1)
    assert bits == ALPHA | (decode.BIT[mode_kind] if mode_kind else 0), decode.issue_names(bits)
    if numpy_ref is not None:  # float64 definition; Pillow's integer compositing may round the other way
        assert np.abs(got.astype(np.float64) - numpy_ref).max() <= 1, name
    if name != "I;16+tRNS":  # Pillow and transformers clip 16-bit grey and ignore its tRNS: numpy is the reference
        img = Image.open(io.BytesIO(data))
        np.testing.assert_array_equal(got, convert_to_rgb(img, return_numpy=True))  # transformers' processors
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        np.testing.assert_array_equal(got, np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))


def test_opaque_images_are_not_counted_as_transparent():
    for img, mode_bits in ((_photo(), 0), (_photo().convert("L"), decode.BIT["grayscale_image"])):
        got, bits = decode.image(_encode(img, "PNG"), 32, 1)
        assert bits == mode_bits
        np.testing.assert_array_equal(got, np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("channels", [2, 4])
def test_decoded_arrays_with_alpha_match_the_encoded_path(channels):
    arr = np.random.default_rng(channels).integers(0, 256, (12, 9, channels), dtype=np.uint8)
    from_array, bits_array = decode.image(arr, 32, 1)
    from_file, bits_file = decode.image(_encode(Image.fromarray(arr), "PNG"), 32, 1)
    np.testing.assert_array_equal(from_array, from_file)
    assert bits_array == bits_file and bits_array & ALPHA


# --- eval views against transformers' image processors -----------------------------------------------------------

# (height, width): landscape, portrait, square, odd, smaller than the crop (upscaled), 1-pixel images, and sides
# where int(224 * long / short) truncates a fraction >= 0.5 (rounding gave one more pixel: 640x480 -> 299).
SIZES = [(480, 640), (640, 480), (224, 224), (225, 225), (300, 301), (301, 300), (333, 500), (500, 333),
         (227, 229), (7, 5), (100, 150), (1, 1), (1, 7), (50, 60), (97, 129), (223, 224), (224, 223), (17, 31),
         (640, 427), (1000, 750)]  # fmt: skip


@pytest.mark.parametrize("family,crop,mean,std", [
    ("clip", "centre", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), ("siglip", "resize", SIGLIP_MEAN, SIGLIP_STD),
])  # fmt: skip
def test_eval_view_matches_the_hf_image_processors(family, crop, mean, std):
    processor, rng, worst = _hf_processor(family, 224), np.random.default_rng(0), 0.0
    assert type(processor).__name__.endswith("Pil")  # the slow processors, which define the published numbers
    for h, w in SIZES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours, ref = ops.eval_view(image, 224, crop, mean, std), _hf_view(processor, image)
        assert ours.shape == ref.shape == (224, 224, 3) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert worst <= 1e-6, (family, h, w, worst)
    print(family, f"max abs difference over {len(SIZES)} sizes: {worst:.2e}")


@pytest.mark.parametrize("family,crop", [("clip", "centre"), ("siglip", "resize")])
def test_eval_view_with_each_resample_filter(family, crop):
    """data.resample: every Pillow filter an imported preprocessor_config.json can name (SigLIP 2's is bilinear)."""
    rng = np.random.default_rng(1)
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    for name, number in ops.RESAMPLE.items():
        processor = _hf_processor(family, 32, resample=int(number))
        for h, w in ((48, 64), (61, 37), (20, 20)):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ours = ops.eval_view(image, 32, crop, mean, std, resample=name)
            assert np.abs(ours - _hf_view(processor, image)).max() <= 1e-6, (family, name, h, w)


def test_eval_view_names_an_unknown_crop():
    with pytest.raises(ValueError, match="eval crop 'center' is not one of"):
        ops.eval_view(np.zeros((8, 8, 3), np.uint8), 8, "center")


# --- every decode path: a public-style tfds set, the evaluators, the caption CLI and training -------------------


# The stored files of a public-style set: photos with each EXIF orientation (JPEG and PNG, landscape and
# portrait), then an RGB PNG with a transparent colour.
STORED = tuple(
    _encode(_photo(24 + 12 * (o % 2), 40 - 16 * (o % 2)), ("JPEG", "PNG")[o % 2], exif=_exif(o))
    for o in range(1, 9)
) + (TRANSPARENT["RGB+tRNS"][0],)


class FidelityPhotos(tfds.core.GeneratorBasedBuilder):
    """A tfds set that is none of clip_jax's builders (as coco_captions or imagenet2012 would be), holding STORED."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(), "caption": tfds.features.Text()}
        features["label"] = tfds.features.ClassLabel(names=["photo", "other"])
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, data in enumerate(STORED):
            yield i, {"image": data, "caption": f"photo number {i}", "label": 0}


@pytest.fixture(scope="module")
def public_set(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    FidelityPhotos(data_dir=data_dir, file_format="array_record").download_and_prepare()
    cfg = tiny_cpu.get_config()  # 32x32 images
    cfg.data.data_dir, cfg.data.eval_crop = data_dir, "centre"
    cfg.data.image_mean, cfg.data.image_std = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    photos = {"dataset": "fidelity_photos", "split": "test", "batch_size": 16}
    cfg.evals.zeroshot = config_lib.evaluator("zeroshot", templates="plain", class_names="label", **photos)
    cfg.evals.retrieval = config_lib.evaluator("retrieval", text_key="caption", **photos)
    cfg.evals.probe = config_lib.evaluator("probe", train_split="test", **photos)
    processor = _hf_processor("clip", 32)
    want = [_hf_view(processor, ImageOps.exif_transpose(Image.open(io.BytesIO(f)))) for f in STORED]
    return cfg, np.stack(want)


def _close(got, want):
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6


def test_public_tfds_images_reach_decode_as_stored_files(public_set):
    cfg, _ = public_set
    record = pipeline.open_source("fidelity_photos", "test", cfg.data.data_dir)[0]
    assert record["image"] == STORED[0]  # not tfds' decoding, which ignores EXIF and tRNS


def test_zero_shot_and_probe_batches(public_set):
    cfg, want = public_set
    (batch,) = eval_data.eval_batches(cfg, cfg.evals.zeroshot, num_devices=8)
    _close(batch["image"][: len(want)], want)


def test_retrieval_images(public_set):
    cfg, want = public_set
    mesh = sharding.make_mesh(cfg)
    (embs, _, oks), captions, _ = retrieval.encode_images(cfg, cfg.evals.retrieval, mesh, lambda images: images)
    _close(jax.device_get(embs[0])[jax.device_get(oks[0])], want)  # the "encoder" returns the images it is given
    assert len(captions) == len(want)


def test_captioning_eval_images(public_set):
    cfg, want = public_set
    images, refs = captioning.load_examples(cfg, "fidelity_photos", "test", -1)
    _close(images, want)
    assert len(refs) == len(want)


class _Recording:
    """The model's encoders, keeping every image batch they encode with its embeddings (host copies)."""

    def __init__(self, graphdef):
        self.model, self.seen = common.ModelEncoders(graphdef), []

    def image(self, params, images):
        out = self.model.image(params, images)
        self.seen.append((common.to_host(images), common.to_host(out)))
        return out

    def text(self, params, tokens):
        return self.model.text(params, tokens)

    def by_image(self, want) -> dict:
        """Index of a stored photo (its HF view in `want`) -> the embedding this evaluator got for it."""
        out = {}
        for images, embs in self.seen:
            for image, emb in zip(images, embs, strict=True):
                hit = [i for i, w in enumerate(want) if np.abs(image - w).max() <= 1e-6]
                if hit:
                    out[hit[0]] = emb
        return out


def test_every_evaluator_gets_the_same_embedding_of_an_image(public_set):
    """An imported-CLIP setup (OpenAI mean/std, centre crop): zero-shot, retrieval, the probe and captioning encode
    the same pixels for a stored photo (HF's CLIPImageProcessor's, as the tests above check) and the same model
    gives each the same embedding."""
    cfg, want = public_set
    mesh = sharding.make_mesh(cfg)
    graphdef, state, _ = run_state.init_state(cfg, mesh, optim.make(cfg))
    params, got = state["params"], {}
    for name in ("zeroshot", "retrieval"):
        recording = _Recording(graphdef)
        suite.Suite(cfg, mesh, encoders=recording).run(params, graphdef, [name])
        got[name] = recording.by_image(want)
    recording = _Recording(graphdef)
    linear_probe.embed_split(cfg, cfg.evals.probe, "test", mesh, lambda x: recording.image(params, x))
    got["probe"] = recording.by_image(want)
    images, _ = captioning.load_examples(cfg, "fidelity_photos", "test", -1)  # what the captioning evaluator reads
    recording = _Recording(graphdef)
    recording.image(params, sharding.put_batch({"x": common.pad_rows(images, 8)}, mesh)["x"])
    got["captioning"] = recording.by_image(want)
    for name, embs in got.items():
        assert sorted(embs) == list(range(len(want))), name  # every photo reached every evaluator
        for i, emb in embs.items():
            np.testing.assert_allclose(emb, got["zeroshot"][i], rtol=0, atol=1e-6, err_msg=f"{name}, photo {i}")


def test_caption_cli_matches_transformers_load_image(public_set, tmp_path):
    cfg, _ = public_set
    paths = []
    for i, data in enumerate(STORED[:-1]):  # transformers' load_image turns, then drops any alpha
        paths.append(str(tmp_path / f"{i}.img"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    processor = _hf_processor("clip", 32)
    _close(
        np.stack(captioning.read_images(cfg, paths)), np.stack([_hf_view(processor, load_image(p)) for p in paths])
    )


def test_training_view(public_set):
    """The train pipeline's 'resize' view of a sideways photo, normalised as the train step does on the devices,
    is SigLIP's processor applied to the upright one."""
    cfg, _ = public_set
    cfg = cfg.copy_and_resolve_references()
    cfg.data.train_crop, cfg.data.flip = "resize", False
    cfg.data.image_mean, cfg.data.image_std, cfg.data.min_image_size = SIGLIP_MEAN, SIGLIP_STD, 1
    prep = pipeline._Preprocess(cfg)
    processor = _hf_processor("siglip", 32)
    for data in STORED:
        out = prep.map_with_index(0, {"image": data, "caption": b"a photo"})
        assert out["image"].dtype == np.uint8
        on_device = np.asarray(train.normalise_images({"image": jax.numpy.asarray(out["image"])}, cfg)["image"])
        _close(on_device, _hf_view(processor, ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
