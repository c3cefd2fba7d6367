"""Every shipped recipe parses and validates (a typo in configs/ fails CI, not a user's run)."""

from pathlib import Path

import pytest

from memmit.config import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_valid(path):
    cfg = parse_args(["--config", str(path), "--pretrained_model_name_or_path", "p", "--dataset_name", "d"])
    assert cfg.num_shards >= 1


def test_text_to_image_recipes_are_the_measured_default_at_the_papers_budget():
    """configs/paper-sd15.yaml is the paper's Stable Diffusion setting; sd15-laion and sd15-lora run memmit's
    text-to-image default (EFFICACY.md) for the same number of samples."""
    def load(name):
        return parse_args(["--config", str(CONFIGS[0].parent / f"{name}.yaml")]).to_dict()

    def budget(c):
        return c["num_rounds"] * c["num_shards"] * c["local_steps"] * c["train_batch_size"]

    paper = load("paper-sd15")
    assert (paper["resolution"], paper["num_shards"], paper["train_batch_size"]) == (256, 4, 8)
    assert paper["agc_lambda"] == 0.8
    assert (paper["dedup"], paper["dedup_captions"], paper["learning_rate"]) == ("none", "ignore", 2.5e-6)
    for name in ("sd15-laion", "sd15-lora"):
        cfg = load(name)
        assert (cfg["num_shards"], cfg["dedup"], cfg["dedup_captions"]) == (1, "keep_one", "anchor")
        assert cfg["agc_lambda"] == 0.8
        assert budget(cfg) == budget(paper) and cfg["lr_scheduler"] == paper["lr_scheduler"]
    for name in ("sdxl-lora", "sd3-lora", "flux-lora"):  # the same default and samples, in each family's memory
        cfg = load(name)
        assert (cfg["num_shards"], cfg["dedup"], cfg["dedup_captions"], cfg["agc_lambda"]) == (1, "keep_one", "anchor",
                                                                                               0.8)
        assert budget(cfg) * cfg["gradient_accumulation_steps"] == budget(paper) and cfg["export"] == "lora"
    assert load("sdxl-lora")["pretrained_vae_model_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"
    # Each flow-matching family's diffusers example's timesteps.
    assert (load("sd3-lora")["weighting_scheme"], load("flux-lora")["weighting_scheme"]) == ("logit_normal", "none")
    full = load("sd15-laion")
    assert {k for k in full if full[k] != paper[k]} == {"num_shards", "local_steps", "dedup", "dedup_captions",
                                                       "output_dir"}


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
