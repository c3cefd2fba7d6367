"""Near-duplicate detectors on real digits, and an eval that sees copies of one member of a family of variants."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from memmit.cli import main
from memmit.data.transform import ImageTransform
from memmit.data.detectors import DEFAULT_THRESHOLDS, load_detector
from memmit.eval.scores import score_samples
from memmit.testbeds.digits import digit_arrays, digit_image

from conftest import mnist_images

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def shifted(img: Image.Image, dx: int, dy: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(img), (dy, dx), axis=(0, 1)))


def reencoded(img: Image.Image, quality: int) -> Image.Image:
    import io

    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


@pytest.fixture(scope="module")
def family_set():
    """20 distinct MNIST digits (16 px) and a family of 10 variants of a 21st: moved by a pixel, re-lit,
    re-encoded, and combinations. Returns (images, family ids, a held-out digit)."""
    x, _ = digit_arrays("mnist")
    distinct = [digit_image(a) for a in x[:20]]
    source = digit_image(x[20])
    brighter, flatter = ImageEnhance.Brightness(source).enhance(1.15), ImageEnhance.Contrast(source).enhance(0.85)
    variants = [source, shifted(source, 1, 0), shifted(source, 0, -1), shifted(source, -1, 1), brighter, flatter,
                reencoded(source, 60), reencoded(source, 90), reencoded(shifted(brighter, 1, 1), 75),
                shifted(reencoded(flatter, 50), 0, 1)]
    return distinct + variants, list(range(20, 30)), digit_image(x[4000])


def as_tensor(images) -> torch.Tensor:
    transform = ImageTransform(16, 1, center_crop=True)
    return torch.stack([transform(img) for img in images])


def test_pixel_detector_is_blind_to_brightness_contrast_and_one_pixel_moves():
    images, _ = mnist_images(2)
    a, other = digit_image(np.asarray(images[0])), digit_image(np.asarray(images[1]))
    detector = load_detector("pixels", None, 16, 1)
    feats = detector.features([a, shifted(a, 1, -1), ImageEnhance.Brightness(a).enhance(1.2),
                               ImageEnhance.Contrast(a).enhance(0.8), other])
    d = detector.distance(feats[:1].expand(4, -1), feats[1:])
    assert d[0] < 1e-6  # a one-pixel move: aligned exactly (rolled pixels wrap, cropped out at the overlap)
    assert d[1] < 0.05 and d[2] < 0.05  # brightness and contrast: normalised away (up to 8-bit clipping)
    assert d[3] > DEFAULT_THRESHOLDS["eval"]["pixels"]


def test_phash_sees_a_reencoded_copy_and_not_another_digit():
    images, _ = mnist_images(2)
    detector = load_detector("phash", None, 16, 1)
    feats = detector.features([images[0], reencoded(images[0], 50), images[0].resize((56, 56)), images[1]])
    d = detector.distance(feats[:1].expand(3, -1), feats[1:])
    assert d[0] <= 4 and d[1] <= 4 and d[2] >= 8


def test_the_default_detector_finds_a_family_of_variants_as_one_cluster(family_set):
    images, family, _ = family_set
    clusters = load_detector("pixels", None, 16, 1, use="eval").clusters(images)
    found = max(clusters, key=lambda c: len(set(c) & set(family)))
    assert set(found) == set(family), clusters


def test_a_copy_of_one_member_of_a_family_is_memorized_and_a_fresh_digit_is_not(family_set):
    """Samples that are new variants of the family's digit: the byte-identical criterion is blind to them, as
    their second neighbour is a sibling variant. With the family as one cluster, it is another digit."""
    images, family, held_out = family_set
    train = as_tensor(images)
    clusters = load_detector("pixels", None, 16, 1, use="eval").clusters(images)
    source = images[family[0]]
    new_variants = [reencoded(source, 40), ImageEnhance.Brightness(reencoded(source, 70)).enhance(1.05)]
    samples = torch.cat([as_tensor(new_variants + [held_out]), train[3:4]])
    pixel = score_samples(samples, train, [f"#{i}" for i in range(len(images))], k=5, clusters=clusters,
                          detector={"features": "pixels"})["pixel"]
    assert pixel["per_sample"]["memorized"] == [True, True, False, True]
    assert all(i in family for i in pixel["per_sample"]["nearest_index"][:2])
    assert pixel["byte_identical"]["fraction_memorized_ratio"] == 0.25  # only the exact copy of a lone digit
    top = pixel["most_copied_clusters"][0]
    assert top == {"count": 2, "size": len(family), "ids": family[:8], "members": [f"#{i}" for i in family[:8]]}


def test_an_embedding_model_as_detector(tmp_path):
    class Tiny(torch.nn.Module):  # 2x2 means, centred: cosine is their correlation
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
            return pooled - pooled.mean(1, keepdim=True)

    path = tmp_path / "embed.pt"
    torch.jit.script(Tiny()).save(str(path))
    images, _ = mnist_images(6)
    detector = load_detector(str(path), None, 16, 1)
    assert detector.describe() == {"features": str(path), "kind": "embedding", "threshold": DEFAULT_THRESHOLDS["dedup"]["embedding"]}
    assert detector.clusters(images + [images[2].copy(), images[4].copy()]) == [[2, 6], [4, 7]]


@pytest.mark.parametrize("flags, message", [
    (["--dedup_features", "no/such-model"], "dedup_features: cannot load 'no/such-model'"),
    (["--dedup_features", "/nonexistent/sscd.pt"], "dedup_features: '/nonexistent/sscd.pt' does not exist"),
    (["--dedup_features", "phash", "--dedup_threshold", "65"], "dedup_threshold 65.0 is outside [0, 64]"),
    (["--dedup_threshold", "3"], "dedup_threshold 3.0 is outside [0, 2]"),
])
def test_bad_detector_options_fail_before_sampling_with_no_report(tiny_pipeline, digits_dir, tmp_path, capsys, flags,
                                                                   message):
    out = tmp_path / "out"
    assert main(["eval", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir,
                 "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("memmit: error:") == 1 and message in err, err
    assert not out.exists()


def test_a_detector_input_size_that_does_not_fit_fails_naming_the_option(tmp_path):
    class Wants32(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], 32 * 32)

    path = tmp_path / "wants32.pt"
    torch.jit.script(Wants32()).save(str(path))
    with pytest.raises(ValueError, match="dedup_features .* failed on images of shape"):
        load_detector(str(path), None, 16, 1)


def test_eval_and_training_use_the_same_detector_and_the_report_lists_families(tiny_pipeline, family_set, tmp_path,
                                                                                capsys):
    images, family, _ = family_set
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(data))
    out = tmp_path / "eval"
    assert main(["eval", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", str(data),
                 "--output_dir", str(out), "--num_samples", "4", "--num_inference_steps", "2", "--k", "5"]) == 0
    default = json.loads((out / "report.json").read_text())["pixel"]["clusters"]["detector"]
    assert main(["eval", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", str(data),
                 "--output_dir", str(out), "--num_samples", "4", "--num_inference_steps", "2", "--k", "5",
                 "--dedup_threshold", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "counting only byte-identical copies as one" in printed and "near-duplicate clusters (pixels < 0.2)" in printed
    # The eval's default merges whole families of variants; training's, only what is surely one image.
    assert default == {"features": "pixels", "kind": "pixels", "threshold": 0.3}
    clusters = json.loads((out / "report.json").read_text())["pixel"]["clusters"]
    assert clusters["detector"] == {"features": "pixels", "kind": "pixels", "threshold": 0.2}

    from memmit.config import parse_args
    from memmit.data.split import build_split
    from memmit.data.detectors import load_detector as load

    from accelerate import PartialState

    PartialState()  # the split logs through accelerate, as in training
    cfg = parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", str(data),
                      "--dedup_threshold", "0.2"])
    split = build_split(datasets.load_from_disk(str(data)), cfg, load(cfg.dedup_features, cfg.dedup_threshold, 16, 1),
                        show_progress=False)
    assert [c["ids"] for c in split.duplicates["clusters"]] == clusters["groups"]


def test_merge_overlapping_unites_groups_that_share_a_member():
    from memmit.data.dedup import merge_overlapping

    assert merge_overlapping([[1, 2], [5, 6], [2, 3], [7, 8, 9], [3, 5]]) == [[1, 2, 3, 5, 6], [7, 8, 9]]
    assert merge_overlapping([]) == []


def test_training_merges_large_families_at_the_looser_threshold_and_not_look_alike_pairs():
    """Web-style copies of one digit are farther apart than training's strict threshold allows; at the eval's
    looser one they form a family, as do a few look-alike distinct digits. Only the large family is merged."""
    from memmit.testbeds.digits import web_copy

    x, _ = digit_arrays("mnist")
    distinct = [digit_image(a) for a in x[:20]]
    rng = np.random.RandomState(0)
    copies = [web_copy(x[20], rng) for _ in range(12)]
    images = distinct + copies
    detector = load_detector("pixels", None, 16, 1)
    loose = load_detector("pixels", DEFAULT_THRESHOLDS["eval"]["pixels"], 16, 1).clusters(images)
    strict = detector.clusters(images)
    assert not any(set(c) >= set(range(20, 32)) for c in strict)  # strict alone splits the family
    assert any(len(c) < 8 and max(c) < 20 for c in loose)  # look-alike distinct digits pair up when loose
    merged = detector.clusters(images, family_size=8, family_threshold=DEFAULT_THRESHOLDS["eval"]["pixels"])
    family = [c for c in merged if set(c) & set(range(20, 32))]
    assert len(family) == 1 and len(set(family[0]) & set(range(20, 32))) >= 8
    assert all(max(c) >= 20 for c in merged)  # no group of distinct digits alone


def test_the_training_split_merges_large_families_only_when_asked(tmp_path):
    """--dedup_family_size reaches the split: 8 trains once on the family of web copies, 0 keeps most of them."""
    from accelerate import PartialState

    from memmit.config import parse_args
    from memmit.testbeds.digits import web_copy
    from memmit.data.split import build_split

    x, _ = digit_arrays("mnist")
    rng = np.random.RandomState(0)
    images = [digit_image(a) for a in x[:20]] + [web_copy(x[20], rng) for _ in range(12)]
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"image": images}).save_to_disk(str(data))
    ds = datasets.load_from_disk(str(data))
    PartialState()  # the split logs through accelerate, as in training
    trained = {}
    for size in (0, 8):
        cfg = parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", str(data),
                          "--dedup_family_size", str(size)])
        split = build_split(ds, cfg, load_detector(cfg.dedup_features, cfg.dedup_threshold, 16, 1),
                            show_progress=False)
        trained[size] = {i for shard in split.shards for i in shard}
        assert split.duplicates["detector"]["family_size"] == size
    copies = set(range(20, 32))
    # Strict pairs alone link 2 of the 12 copies; the family (9 of them at 0.3) trains once, 3 copies stay apart.
    assert len(trained[0] & copies) == 11 and len(trained[8] & copies) == 4
    assert trained[0] >= set(range(20)) and trained[8] >= set(range(20))  # no distinct digit dropped
