"""Every shipped recipe parses and validates (a typo in configs/ fails CI, not a user's run)."""

from pathlib import Path

import pytest

from memmit.config import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_valid(path):
    cfg = parse_args(["--config", str(path), "--pretrained_model_name_or_path", "p", "--dataset_name", "d"])
    assert cfg.num_shards >= 1


def test_paper_text_to_image_settings():
    for name in ("sd15-laion", "sd15-lora"):
        cfg = parse_args(["--config", str(CONFIGS[0].parent / f"{name}.yaml")])
        assert (cfg.resolution, cfg.num_shards, cfg.train_batch_size, cfg.agc_lambda) == (256, 4, 8, 0.8)
        assert cfg.lr_scheduler == "constant_with_warmup"
    assert parse_args(["--config", str(CONFIGS[0].parent / "sd15-laion.yaml")]).learning_rate == 2.5e-6


def test_quickstart_recipes_differ_only_in_the_method_and_share_the_budget():
    """memmit's default and the paper's method on the quickstart: the same 384 x 32 samples, the same
    optimisation; only the shards, their steps and duplicate handling differ (EFFICACY.md's premise)."""
    memmit, paper = (parse_args(["--config", str(CONFIGS[0].parent / f"{name}.yaml"),
                                 "--pretrained_model_name_or_path", "p", "--dataset_name", "d"]).to_dict()
                     for name in ("quickstart", "paper-quickstart"))
    def budget(c):
        return c["num_rounds"] * c["num_shards"] * c["local_steps"] * c["train_batch_size"]
    assert budget(memmit) == budget(paper) == 384 * 32
    differing = {k for k in memmit if memmit[k] != paper[k]}
    assert differing == {"num_shards", "local_steps", "dedup"}
    assert (memmit["num_shards"], memmit["dedup"], paper["num_shards"], paper["dedup"]) == (1, "keep_one", 4, "none")
    assert memmit["agc_lambda"] == paper["agc_lambda"] == 0.5
