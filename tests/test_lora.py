"""LoRA shards: exact aggregation of B·A products, the SVD export, and LoRA runs end to end."""

import pytest
import torch

from memmit.train.ensemble import FlatAverage, shard_weights
from memmit.train.lora import add_lora, add_merged, is_lora_key, lora_layers, svd_lora


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = torch.nn.Linear(5, 4)
        self.other = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.other(self.to_q(x))


def base_tensors(model):
    return [t for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point() and not is_lora_key(n)]


def test_aggregation_is_the_mean_of_the_products_not_of_the_factors():
    model = Attn()
    w0 = model.to_q.weight.detach().clone()
    add_lora(model, rank=2, alpha=4, dropout=0.0, target_modules=["to_q"])  # scale = alpha / rank = 2
    layer = lora_layers(model)[0]
    base = base_tensors(model)
    avg = FlatAverage(base)
    weights = shard_weights([1, 3])
    factors = []
    gen = torch.Generator().manual_seed(1)
    for w in weights:
        a, b = torch.randn(2, 5, generator=gen), torch.randn(4, 2, generator=gen)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        add_merged(avg, model, base, w)
        # Unmerged again: the live base weight is back to θ̄ (up to float rounding).
        torch.testing.assert_close(layer.base_layer.weight, w0)
        factors.append((a, b))
    avg.finish_round()
    avg.load_into(base)

    exact = w0 + sum(w * 2 * (b @ a) for w, (a, b) in zip(weights, factors))
    torch.testing.assert_close(layer.base_layer.weight, exact, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.other.weight, Attn().other.weight)  # untargeted layers keep θ̄

    mean_a = sum(w * a for w, (a, _) in zip(weights, factors))
    mean_b = sum(w * b for w, (_, b) in zip(weights, factors))
    separate = w0 + 2 * (mean_b @ mean_a)
    assert (separate - exact).abs().max() > 0.1  # averaging A and B separately is a different model


def test_svd_lora_is_exact_at_full_rank_and_reports_truncation_error():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 3, generator=gen) @ torch.randn(3, 8, generator=gen)  # rank 3
    state, error = svd_lora({"blk.to_q.weight": delta}, rank=3)
    b, a = state["blk.to_q.lora_B.weight"], state["blk.to_q.lora_A.weight"]
    assert a.shape == (3, 8) and b.shape == (6, 3)
    torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-5)
    assert error < 1e-6
    conv = delta.reshape(6, 2, 2, 2)  # a 2x2 convolution's change, rank 3 as [out, in x kh x kw]
    state, error = svd_lora({"blk.conv.weight": conv}, rank=3)
    b, a = state["blk.conv.lora_B.weight"], state["blk.conv.lora_A.weight"]
    assert a.shape == (3, 2, 2, 2) and b.shape == (6, 3, 1, 1) and error < 1e-6
    x = torch.randn(1, 2, 5, 5, generator=gen)
    torch.testing.assert_close(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a), b),
                               torch.nn.functional.conv2d(x, conv), rtol=1e-4, atol=1e-5)
    _, error1 = svd_lora({"blk.to_q.weight": delta}, rank=1)
    s = torch.linalg.svdvals(delta.double())
    assert error1 == pytest.approx(float((s[1:].pow(2).sum() / s.pow(2).sum()).sqrt()), rel=1e-6)


def test_bad_target_modules():
    with pytest.raises(ValueError, match="match no module"):
        add_lora(Attn(), 2, None, 0.0, ["to_x"])


# The recipes' UNet adapters: attention only (sd3/flux), and sd15-lora's and sdxl-lora's (1x1 convolutions among them:
# Stable Diffusion 1.x's proj_in and proj_out).
UNET_TARGETS = [[], ["--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                     "proj_in", "proj_out", "time_emb_proj"]]


@pytest.mark.parametrize("targets", UNET_TARGETS, ids=["attention", "wide"])
def test_stable_diffusion_lora_shards_and_lora_export(targets, tiny_sd_pipeline, captioned_digits_dir, tmp_path):
    """LoRA training on a tiny SD pipeline; the exported LoRA, loaded into the original pipeline with
    load_lora_weights, gives the merged export's UNet (exact when the export rank is full)."""
    import json

    from accelerate.state import AcceleratorState
    from diffusers import StableDiffusionPipeline

    from memmit.config import parse_args
    from memmit.cli import run

    def train(out, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)
        run(parse_args(["--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", captioned_digits_dir,
                            "--caption_column", "text", "--output_dir", str(out), "--num_shards", "2",
                            "--num_rounds", "2", "--train_batch_size", "4", "--lora_rank", "4",
                            "--learning_rate", "1e-2", "--report_to", "none", *targets, *extra]))

    train(tmp_path / "full")
    train(tmp_path / "lora", "--export", "lora", "--export_lora_rank", "64")
    summary = json.loads((tmp_path / "lora" / "memmit" / "lora_export.json").read_text())
    assert summary["relative_svd_error"] < 1e-5 and summary["change_outside_targets"] < 1e-5

    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "full").unet
    original = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    base_unet = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline).unet
    original.load_lora_weights(tmp_path / "lora")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 77, merged.config.cross_attention_dim, generator=gen)
    t = torch.tensor([3, 40])
    with torch.no_grad():
        want, got = merged(x, t, text).sample, original.unet(x, t, text).sample
        untouched = base_unet(x, t, text).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - untouched).abs().max() > 1e-3  # the LoRA does change the model
