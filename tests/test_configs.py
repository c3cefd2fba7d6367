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
