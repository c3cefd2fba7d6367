"""Shard split, image conversion and dataset loading on real files."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from memmit.data.dataset import check_images, load_train_dataset, pick_caption, source_names
from memmit.data.split import split_shards
from memmit.data.transform import ImageTransform, convert_mode


@pytest.mark.parametrize("strategy", ["random", "contiguous"])
def test_split_disjoint_covering_stable(strategy):
    shards = split_shards(103, 4, strategy, seed=3)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(103))
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    assert split_shards(103, 4, strategy, seed=3) == shards


def test_split_random_depends_on_seed_contiguous_does_not():
    assert split_shards(50, 2, "random", seed=0) != split_shards(50, 2, "random", seed=1)
    assert split_shards(10, 3, "contiguous") == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_stratified_spreads_each_label():
    labels = [0] * 12 + [1] * 8 + [2] * 4
    shards = split_shards(24, 4, "stratified", seed=0, labels=labels)
    assert sorted(i for s in shards for i in s) == list(range(24))
    for s in shards:
        counts = np.bincount([labels[i] for i in s], minlength=3)
        assert counts.tolist() == [3, 2, 1]


def test_split_fewer_samples_than_shards():
    with pytest.raises(ValueError, match="num_shards=5"):
        split_shards(3, 5)


def _img(mode, size=(6, 4)):
    if mode == "I;16":
        arr = np.full(size[::-1], 65535, dtype=np.uint16)
        arr[0, 0] = 0
        return Image.fromarray(arr)  # mode I;16
    img = Image.new(mode, size)
    if mode == "P":
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.putpixel((1, 1), 1)
    return img


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_convert_mode_any_input(mode, channels):
    out = convert_mode(_img(mode), channels)
    assert out.mode == {1: "L", 3: "RGB"}[channels]


def test_sixteen_bit_is_rescaled_not_clipped():
    out = np.asarray(convert_mode(_img("I;16"), 1))
    assert out[0, 0] == 0 and out[1, 1] == 255


def test_palette_colour_survives():
    assert convert_mode(_img("P"), 3).getpixel((1, 1)) == (255, 0, 0)


def test_transform_shape_range_and_center_crop():
    img = Image.fromarray(np.arange(20 * 10, dtype=np.uint8).reshape(10, 20) , "L")
    x = ImageTransform(8, 1, center_crop=True)(img)
    assert x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    ref = np.asarray(img.resize((16, 8), Image.BILINEAR), dtype=np.float32)[:, 4:12] / 127.5 - 1
    assert torch.allclose(x[0], torch.from_numpy(ref))


def test_random_crop_and_flip_follow_the_generator():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (12, 30), dtype=np.uint8), "L")
    t = ImageTransform(8, 3, random_flip=True)
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    outs = {tuple(t(img, torch.Generator().manual_seed(s)).flatten()[:5].tolist()) for s in range(10)}
    assert len(outs) > 1


def test_load_from_disk_and_imagefolder(tmp_path, digits_dir):
    ds = load_train_dataset(dataset_name=digits_dir, label_column="label", max_train_samples=10)
    assert len(ds) == 10 and set(ds.column_names) == {"image", "label"}
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (5, 5), (i, 0, 0)).save(folder / f"img{i}.png")
    ds = load_train_dataset(train_data_dir=str(folder))
    assert len(ds) == 3
    assert sorted(n.rsplit("/", 1)[-1] for n in source_names(ds, "image")) == ["img0.png", "img1.png", "img2.png"]


def test_bad_columns_and_empty(tmp_path, digits_dir):
    with pytest.raises(ValueError, match=r"image_column 'img' not in dataset columns \['image', 'label'\]"):
        load_train_dataset(dataset_name=digits_dir, image_column="img")
    with pytest.raises(ValueError, match="label_column 'digit'"):
        load_train_dataset(dataset_name=digits_dir, label_column="digit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train_data_dir .* is empty"):
        load_train_dataset(train_data_dir=str(tmp_path / "empty"))
    # A dataset with columns but no rows: datasets refuses it, and the message names it.
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    datasets.Dataset.from_dict({"image": [], "label": []}).to_parquet(str(no_rows / "train.parquet"))
    with pytest.raises(ValueError, match="cannot load dataset .*no_rows.*empty"):
        load_train_dataset(dataset_name=str(no_rows))

def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("L", (5, 5)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = load_train_dataset(train_data_dir=str(folder))
    with pytest.raises(ValueError, match="broken.png"):
        check_images(ds, "image", show_progress=False)


def test_pick_caption_draws_once_from_a_list_and_names_a_bad_value():
    gen, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    options = ["a", "b", "c", "d"]
    picks = [pick_caption(options, gen, "text") for _ in range(8)]
    assert picks == [options[int(torch.randint(4, (), generator=twin))] for _ in range(8)]
    assert len(set(picks)) > 1
    state = gen.get_state()
    assert [pick_caption(v, gen, "text") for v in ("x", None, "", [])] == ["x", "", "", ""]
    assert torch.equal(gen.get_state(), state), "a string or an empty list draws nothing"
    assert pick_caption(options, "first", "text") == "a"
    with pytest.raises(ValueError, match="caption_column 'text' holds 7 of type int"):
        pick_caption([7], "first", "text")
