"""Caption-side mitigations (Somepalli et al. 2023): each rule, its rate, and its options."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from memmit.data.captions import CaptionNoise, caption_vocabulary
from memmit.cli import run, train_main
from memmit.config import parse_args

from test_text_to_image import make_task, rows, seeded
from test_train import args

CAPTION = "a handwritten seven thin stroke"
VOCABULARY = ["alpha", "beta", "gamma", "delta"]
DRAWS = 2000


def many(noise: CaptionNoise, caption: str = CAPTION) -> list[list[str]]:
    generator = seeded(5)
    return [noise(caption, generator).split() for _ in range(DRAWS)]


def test_vocabulary_is_every_word_of_every_caption_sorted():
    assert caption_vocabulary(["b a", ["c a", "d"], "", None], "text") == ["a", "b", "c", "d"]


def test_rules_that_are_off_draw_nothing_and_change_nothing():
    generator = seeded(3)
    state = generator.get_state()
    assert CaptionNoise(vocabulary=VOCABULARY)(CAPTION, generator) == CAPTION
    assert torch.equal(generator.get_state(), state)
    # The empty prompt (caption dropout) trains the unconditional branch: no rule touches it.
    assert CaptionNoise(1.0, 1.0, 1.0, VOCABULARY)("", generator) == ""


def test_replacement_keeps_the_word_count_with_vocabulary_words_at_its_rate():
    outputs = many(CaptionNoise(replace_prob=0.3, vocabulary=VOCABULARY))
    replaced = [words for words in outputs if words != CAPTION.split()]
    assert all(len(words) == 5 and set(words) <= set(VOCABULARY) for words in replaced)
    assert len(replaced) / DRAWS == pytest.approx(0.3, abs=0.04)
    # Every vocabulary word in every position, about equally often.
    assert len(Counter(w for words in replaced for w in words)) == len(VOCABULARY)


def test_insertion_adds_one_vocabulary_word_anywhere_at_its_rate():
    original = CAPTION.split()
    outputs = many(CaptionNoise(insert_prob=0.2, vocabulary=VOCABULARY))
    changed = [words for words in outputs if words != original]
    positions = set()
    for words in changed:
        assert len(words) == len(original) + 1
        extra = next(i for i, w in enumerate(words) if w in VOCABULARY)
        assert words[:extra] + words[extra + 1:] == original
        positions.add(extra)
    assert positions == set(range(len(original) + 1))
    assert len(changed) / DRAWS == pytest.approx(0.2, abs=0.04)


def test_repetition_inserts_one_of_the_captions_own_words_at_its_rate():
    original = CAPTION.split()
    outputs = many(CaptionNoise(repeat_prob=0.4))
    changed = [words for words in outputs if len(words) != len(original)]
    repeated = Counter()
    for words in changed:
        extra = Counter(words) - Counter(original)
        assert sum(extra.values()) == 1 and sorted(words) == sorted(original + list(extra))
        repeated.update(extra)
    assert set(repeated) == set(original)
    assert len(changed) / DRAWS == pytest.approx(0.4, abs=0.04)


def test_the_task_applies_the_rules_to_the_picked_caption(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--caption_replace_prob", 1)
    data = rows(captioned_digits_dir)
    task.use_training_captions(data["text"])
    vocabulary = set(caption_vocabulary(data["text"], "text"))
    generator = seeded(0)
    prompts = [task.inputs.prompt(value, generator) for value in data["text"]]
    for prompt, caption in zip(prompts, data["text"]):
        assert len(prompt.split()) == len(caption.split()) and set(prompt.split()) <= vocabulary
    assert prompts != data["text"]


def test_caption_options_are_the_rules_the_trainer_applies(tiny_sd_pipeline, captioned_digits_dir, tmp_path):
    """The flags reach the trainer's inputs as the rules tested above: the prompts its inputs draw for a batch are
    the ones CaptionNoise with those probabilities and the training captions' words draws from the same generators,
    and the embedding noise is the task's (its arithmetic: test_text_to_image)."""
    from memmit.data.dataset import pick_caption
    from memmit.train.setup import build_trainer

    trainer = build_trainer(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "out", "--caption_column",
                                            "text", "--num_shards", 1, "--caption_insert_prob", 0.5,
                                            "--caption_repeat_prob", 0.5, "--text_embedding_noise", 0.1)))
    batch = trainer.dataset[:12]
    prompts, _ = trainer.task.inputs.text_inputs(batch, [seeded(i) for i in range(12)])
    rules = CaptionNoise(0.0, 0.5, 0.5, caption_vocabulary(trainer.dataset["text"], "text"))
    expected = []
    for i, value in enumerate(batch["text"]):
        generator = seeded(i)
        expected.append(rules(pick_caption(value, generator, "text"), generator))
    assert prompts == expected and prompts != batch["text"]
    assert trainer.task.text_embedding_noise == 0.1


@pytest.mark.parametrize("flags, message", [
    (["--caption_replace_prob", 1.5], "caption_replace_prob must be in [0, 1], got 1.5"),
    (["--text_embedding_noise", -1], "text_embedding_noise must be >= 0"),
])
def test_bad_caption_option_values_are_named(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys, flags, message):
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text", *flags)) == 2
    assert message in capsys.readouterr().err


def test_caption_options_on_an_unconditional_pipeline_are_refused(tiny_pipeline, digits_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(args(tiny_pipeline, digits_dir, out, "--caption_repeat_prob", 0.1,
                           "--text_embedding_noise", 0.1)) == 2
    err = capsys.readouterr().err
    assert "caption_repeat_prob, text_embedding_noise: text-to-image options" in err and "DDPMPipeline" in err
    assert not (out / "checkpoints").exists()


def test_cluster_captions_are_every_distinct_caption_of_the_cluster_for_its_kept_id():
    from memmit.data.captions import cluster_captions

    values = ["a", ["b", "a"], "c", "a", "d", "d"]
    assert cluster_captions(values, [[3, 0, 1], [4, 5], [2]]) == {0: ["a", "b"]}  # [4, 5] share one caption
    # dedup_captions=empty: a cluster sharing one caption trains its kept copy on the empty prompt.
    assert cluster_captions(values, [[3, 0, 1], [4, 5]], shared_empty=True) == {0: ["a", "b"], 4: [""]}


def test_dedup_captions_merge_trains_the_kept_copy_with_its_clusters_captions(tiny_sd_pipeline, tmp_path):
    import datasets
    from conftest import mnist_images

    images, labels = mnist_images(8)
    # Image 0 three times more, each copy with a caption of its own; image 1 twice more with its own caption.
    ds = datasets.Dataset.from_dict({"image": images + [images[0]] * 3 + [images[1]] * 2,
                                     "text": [f"digit {y}" for y in labels] + ["copy one", "copy two", "copy one"]
                                     + [f"digit {labels[1]}"] * 2})
    data = str(tmp_path / "data")
    ds.save_to_disk(data)
    out = tmp_path / "out"
    trainer = run(parse_args(args(tiny_sd_pipeline, data, out, "--caption_column", "text", "--dedup_captions", "merge",
                                  "--num_shards", 1, "--num_rounds", 1, "--local_steps", 1)))
    assert trainer.split.captions == {0: [f"digit {labels[0]}", "copy one", "copy two"]}
    assert sorted(i for shard in trainer.split.shards for i in shard) == list(range(8))
    picked = trainer.split.rows(trainer.dataset, [0, 1], "text")["text"]
    assert picked == [[f"digit {labels[0]}", "copy one", "copy two"], f"digit {labels[1]}"]
    assert '"kept_copies_with_merged_captions": 1' in (out / "memmit" / "duplicates.json").read_text()


def test_dedup_captions_merge_needs_keep_one_and_captions(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys):
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text",
                           "--dedup_captions", "merge", "--dedup", "none")) == 2
    assert "dedup_captions=merge acts on the captions of the copies dedup=keep_one drops" in capsys.readouterr().err
