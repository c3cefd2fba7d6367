"""Training data: loading through `datasets`, checks that name the bad file or column, caption choice, stable
sample ids (row order) and the names the reports give them."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import datasets
import torch
from datasets.features.features import require_decoding
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image
from tqdm.auto import tqdm

from ..offline import offline_note

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # what datasets' imagefolder reads
NAMED_FILES = 5  # unlisted image files named in the error; the rest are counted


def load_train_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: str = "image",
    label_column: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    dataset_config_name: Optional[str] = None,
    extra_columns: Sequence[str] = (),
) -> datasets.Dataset:
    """The training split, checked: columns exist, not empty, no image file left out. Row i has stable sample id i."""
    source = train_data_dir or dataset_name
    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"train_data_dir {train_data_dir!r} is not a directory")
        if not any(p.is_file() for p in Path(train_data_dir).rglob("*")):
            raise ValueError(f"train_data_dir {train_data_dir!r} is empty")
    saved = dataset_name is not None and _is_saved_to_disk(Path(dataset_name))
    # A dataset_name folder that save_to_disk did not write is read by datasets as data files, like train_data_dir.
    data_files_dir = dataset_name is not None and os.path.isdir(dataset_name) and not saved
    try:
        if train_data_dir is not None:
            ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split="train")
        elif saved:
            ds = datasets.load_from_disk(dataset_name)
        else:
            ds = datasets.load_dataset(dataset_name, dataset_config_name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        # A generation error's own message says nothing; its cause says what datasets could not read.
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        reason = str(cause).splitlines()[0]
        if data_files_dir and not isinstance(exc, ValueError):  # no data files, or files that are not data
            raise ValueError(_not_a_dataset(dataset_name, f"datasets cannot read its files as data ({reason})")) from exc
        raise ValueError(f"cannot load dataset {source!r} (missing, empty or not a dataset?): {reason}"
                         f"{offline_note(source)}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset {dataset_name!r} has no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if data_files_dir and image_column not in ds.column_names and not _image_columns(ds):
        raise ValueError(_not_a_dataset(dataset_name, f"datasets read its files as {ds.info.builder_name} data "
                                                      f"with columns {ds.column_names} and no images"))
    for role, col in [("image_column", image_column), ("label_column", label_column),
                      *[("column", c) for c in extra_columns]]:
        if col is not None and col not in ds.column_names:
            raise ValueError(f"{role} {col!r} not in dataset columns {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} is empty")
    if train_data_dir is not None or data_files_dir:
        _check_metadata_lists_every_image(ds, Path(source), "train_data_dir" if train_data_dir else "dataset_name")
    if max_train_samples is not None:
        ds = ds.select(range(min(max_train_samples, len(ds))))
    return ds


def _not_a_dataset(dataset_name: str, why: str) -> str:
    return (f"dataset_name {dataset_name!r} is not a dataset: Dataset.save_to_disk did not write it, and {why}; "
            f"for a folder of images pass --train_data_dir {dataset_name}")


def _image_columns(ds: datasets.Dataset) -> list[str]:
    """Columns holding images (or lists of images), whatever their names."""
    return [name for name, feature in ds.features.items() if require_decoding(feature)]


def _check_metadata_lists_every_image(ds: datasets.Dataset, folder: Path, role: str) -> None:
    """datasets silently leaves out the image files a folder's metadata file does not list: refuse them by name."""
    loaded = {os.path.realpath(p) for p in _image_paths(ds)}
    listings = {os.path.realpath(m.parent): m.name for name in METADATA_FILES for m in folder.rglob(name)}
    # Only the metadata this split was read from: a test/ split's metadata lists files this one never holds.
    listings = {d: m for d, m in listings.items() if any(p.startswith(d + os.sep) for p in loaded)}
    unlisted = sorted(p for d in listings for p in _image_files(Path(d)) if p not in loaded)
    if unlisted:
        shown = ", ".join(os.path.relpath(p, os.path.realpath(folder)) for p in unlisted[:NAMED_FILES])
        more = f" and {len(unlisted) - NAMED_FILES} more" if len(unlisted) > NAMED_FILES else ""
        raise ValueError(f"{role} {str(folder)!r}: {len(unlisted)} image file(s) not listed in "
                         f"{' or '.join(sorted(set(listings.values())))}, which datasets would leave out of training: "
                         f"{shown}{more}; list them there (file_name) or move them out of the folder")


def _image_paths(ds: datasets.Dataset) -> list[str]:
    """The file path of every image the dataset holds, in every image column; read without decoding."""
    paths: list[str] = []

    def collect(value) -> None:
        if isinstance(value, dict):
            paths.extend([value["path"]] if value.get("path") else [])
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for name in _image_columns(ds):
        collect(ds.data.column(name).to_pylist())
    return paths


def _image_files(folder: Path) -> list[str]:
    """Image files under a folder as datasets' imagefolder finds them: by extension, hidden ones skipped."""
    return [os.path.realpath(p) for p in folder.rglob("*")
            if p.suffix.lower() in ImageFolder.EXTENSIONS and p.is_file()
            and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)]


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def source_names(ds: datasets.Dataset, image_column: str) -> list[str]:
    """Where each sample came from: its file path when known, else 'index i'."""
    raw = ds.cast_column(image_column, datasets.Image(decode=False))[image_column]
    return [(r or {}).get("path") or f"index {i}" for i, r in enumerate(raw)]


def check_captions(ds: datasets.Dataset, caption_column: Optional[str], image_column: str) -> None:
    """Every sample needs a caption (a non-empty string, or a non-empty list of them): an image
    without one would silently train on the empty prompt. Names the first bad sample."""
    if caption_column is None:
        return
    bad = [(i, problem) for i, value in enumerate(ds[caption_column]) if (problem := _caption_problem(value))]
    if not bad:
        return
    i, problem = bad[0]
    name = source_names(ds.select([i]), image_column)[0]
    where = f"sample {i}" + (f" ({name})" if not name.startswith("index ") else "")
    others = f" ({len(bad) - 1} more of the {len(ds)} samples have the same problem)" if len(bad) > 1 else ""
    raise ValueError(f"caption_column {caption_column!r}: {where} has {problem}{others}; every image needs a "
                     "non-empty caption, a string or a list of strings")


def _caption_problem(value) -> Optional[str]:
    """What is wrong with one caption-column value, or None if it is a usable caption."""
    if isinstance(value, (list, tuple)):
        if not value:
            return "an empty list of captions"
        problem = next((p for p in map(_caption_string_problem, value) if p), None)
        return problem and f"a list of captions holding {problem}"
    return _caption_string_problem(value)


def _caption_string_problem(value) -> Optional[str]:
    if value is None:
        return "no caption (None)"
    if not isinstance(value, str):
        return f"{value!r} of type {type(value).__name__}"
    return None if value.strip() else f"an empty caption {value!r}"


def iter_images(ds: datasets.Dataset, image_column: str, desc: str = "reading images",
                show_progress: bool = True, rows: Optional[range] = None) -> Iterator[Image.Image]:
    """Every image (or those of `rows`), decoded, in order; an unreadable file raises ValueError naming it."""
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    rows = range(len(raw)) if rows is None else rows
    for i in tqdm(rows, desc=desc, disable=not show_progress, leave=False):
        item = raw[i][image_column]
        name = (item or {}).get("path") or f"index {i}"
        try:
            if item is None:
                raise ValueError("missing image")
            with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
                img.load()
                yield img
        except Exception as exc:  # PIL raises many types for corrupt files
            raise ValueError(f"cannot read image {name} (sample {i}) in column {image_column!r}: {exc}") from exc


def check_images(ds: datasets.Dataset, image_column: str, show_progress: bool = True) -> None:
    """Decode every image once, so an unreadable file fails before training, by name."""
    for _ in iter_images(ds, image_column, "checking images", show_progress):
        pass


def caption_counts(values: Sequence, column: str) -> Counter:
    """How often each caption occurs in a caption column (a list-valued row counts each of its captions)."""
    return Counter(pick_caption(caption, "first", column) for value in values
                   for caption in (value if isinstance(value, (list, tuple)) else [value]))


def pick_caption(value, choice: Union[torch.Generator, Literal["first"]], column: str) -> str:
    """The caption of one row's caption-column value: a string as is; of a list, one drawn from the generator
    `choice` (one torch.randint), or its first for "first". None, "" and [] are the empty prompt."""
    if isinstance(value, (list, tuple)):
        if not value:
            value = None
        elif choice == "first":
            value = value[0]
        else:
            value = value[int(torch.randint(len(value), (), generator=choice))]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"caption_column {column!r} holds {value!r} of type {type(value).__name__}; "
                         "expected a string or a list of strings")
    return value or ""
