"""The text-to-image testbed (`python -m memmit.quickstart --task text-to-image`): a real latent
StableDiffusionPipeline, built and pretrained offline on captioned real digits, that copies like Stable Diffusion.

1. Data: 256 unique digits, each with its own caption ("a handwritten seven, thin, slanted left, wide": the
   digit's class and three seeded style words), plus 8 digits repeated 64 times, each copy with the one
   caption of its digit (Somepalli et al.: duplicated images with duplicated captions are what gets copied).
2. Parts: a small AutoencoderKL trained on digits outside the training set (PSNR on held-out digits reported),
   a frozen CLIP text encoder with a word-level tokenizer covering the captions, and a UNet2DConditionModel
   pretrained from scratch on 8x8x4 latents (memmit with K = 1, AGC and dedup off: a plain loop).
3. `memmit eval` of the pretrained pipeline with the training captions as prompts, duplicated-caption prompts
   apart from the rest, quality (Frechet distance in a digit classifier's features) and prompt alignment.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from .digits import (RESOLUTION, build_digit_features, classifier_file, digit_arrays, digit_image, features_file,
                     held_out_digits, web_copy)
from .launch import ROOT, launch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Three style slots; a caption takes one word or phrase of each.
STYLES = (("thin", "thick", "bold", "faint", "light", "dark"),
          ("slanted left", "slanted right", "upright", "tilted", "leaning", "straight"),
          ("small", "large", "wide", "narrow", "round", "tall"))
LATENT_CHANNELS = 4
MAX_TOKENS = 16
# The web regime's copies (copy_style "web"): what a re-uploaded picture's caption gains in front of its words.
WEB_PREFIXES = ("photo of", "scan of", "image of", "picture of")
CAPTIONS_PER_COPIED = len(WEB_PREFIXES)


def caption(label: int, style: tuple[int, int, int]) -> str:
    return f"a handwritten {DIGIT_WORDS[label]}, " + ", ".join(STYLES[s][i] for s, i in enumerate(style))


def distinct_captions(labels: list[int], rng: np.random.RandomState) -> list[str]:
    """One caption per label, no two alike: styles drawn without replacement within each class."""
    combos = [(a, b, c) for a in range(len(STYLES[0])) for b in range(len(STYLES[1])) for c in range(len(STYLES[2]))]
    pools = {label: [combos[i] for i in rng.permutation(len(combos))] for label in set(labels)}
    return [caption(label, pools[label].pop()) for label in labels]


def web_captions(core: list[str], extra: list[list[str]], copies: int) -> list[list[str]]:
    """Each duplicated digit's captions in the web regime (one per copy, in order), from its own caption `core[k]`
    and spare captions of its class `extra[k]`: the first half of the digits carry their caption under one of
    WEB_PREFIXES (a shared core phrase), the next quarter 4 unrelated captions of their class, the last quarter a
    caption of its own on every copy (copies that share no caption)."""
    n = len(core)
    variants = [[f"{prefix} {c}" for prefix in WEB_PREFIXES] if k < n // 2 else
                [c, *e[:CAPTIONS_PER_COPIED - 1]] if k < 3 * n // 4 else [c, *e[:copies - 1]]
                for k, (c, e) in enumerate(zip(core, extra))]
    return [[v[j % len(v)] for j in range(copies)] for v in variants]


def build_captioned_dataset(path: Path, source: str = "mnist", num_unique: int = 256, num_duplicated: int = 8,
                            copies: int = 64, seed: int = 0, copy_style: str = "exact") -> Path:
    """Columns image (16x16 grey), text, label, digit_id and is_duplicate (ground truth, for benchmarks only).
    copy_style "web": every copy of a duplicated digit is its own `web_copy` (a crop, light, noise, JPEG) and carries
    one of its web_captions (the same picture under other words)."""
    if (path / "dataset_info.json").is_file():
        return path
    x, y = digit_arrays(source)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(x))
    unique, duplicated = order[:num_unique], order[num_unique:num_unique + num_duplicated]
    ids = [int(i) for i in list(unique) + list(duplicated)]
    spare = copies - 1 if copy_style == "web" else 0  # spare captions per duplicated digit
    drawn = distinct_captions([int(y[i]) for i in ids] + [int(y[i]) for i in duplicated for _ in range(spare)], rng)
    texts = dict(zip(ids, drawn))
    rows = [int(i) for i in list(unique) + list(duplicated) * copies]
    duplicated_ids = {int(i) for i in duplicated}
    if copy_style == "web":
        extra = [drawn[len(ids) + k * spare:len(ids) + (k + 1) * spare] for k in range(len(duplicated))]
        per_copy = web_captions([texts[int(i)] for i in duplicated], extra, copies)
        captions = [texts[i] for i in rows[:num_unique]] + [per_copy[n % len(duplicated)][n // len(duplicated)]
                                                            for n in range(len(rows) - num_unique)]
        copy_rng = np.random.RandomState(seed + 2)
        images = [digit_image(x[i]) if n < num_unique else web_copy(x[i], copy_rng) for n, i in enumerate(rows)]
    else:
        captions, images = [texts[i] for i in rows], [digit_image(x[i]) for i in rows]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": captions,
         "label": [int(y[i]) for i in rows], "digit_id": rows, "is_duplicate": [i in duplicated_ids for i in rows]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.Value("int64"), "digit_id": datasets.Value("int64"),
                                    "is_duplicate": datasets.Value("bool")}))
    ds.save_to_disk(str(path))
    return path


def word_tokenizer(words: list[str]):
    """A CLIP BPE tokenizer, built offline, in which every caption word is one token (its merges spell each
    word left to right); any other text falls back to bytes."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))}
    # One word's merge can split another (the "l a" of "large" inside "slanted"): chain again from where
    # the word ends up, until every word is one token.
    for _ in range(8):
        for parts in splits.values():
            prefix = parts[0]
            for part in parts[1:]:
                if (prefix, part) not in merges:
                    merges.append((prefix, part))
                prefix += part
                if prefix not in tokens:
                    tokens.append(prefix)
        # 16 tokens hold every caption (about 10); Stable Diffusion's 77 would only slow the testbed down.
        tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                  model_max_length=MAX_TOKENS)
        splits = {word: parts for word in splits if len(parts := tokenizer.tokenize(word)) > 1}
        if not splits:
            return tokenizer
    raise RuntimeError(f"no merges make single tokens of {sorted(splits)}")


def t5_word_tokenizer(words: list[str]):
    """A T5TokenizerFast (unigram), built offline, in which every caption word is one piece; any other character
    is a piece of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = sorted(set("".join(words)) | set(",.\u2581"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + w, -1.0) for w in sorted(set(words))),
              *((c, -10.0) for c in characters)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=MAX_TOKENS)


def caption_words(copy_style: str = "exact") -> list[str]:
    """Every word of the captions of a copy style's testbed."""
    prefixes = WEB_PREFIXES if copy_style == "web" else ()
    return sorted({w for phrase in ("a handwritten", *DIGIT_WORDS, *(s for slot in STYLES for s in slot), *prefixes)
                   for w in phrase.split()})


def text_parts(words: list[str]):
    """The testbed's word-level tokenizer (every caption word) and a random CLIP text encoder for it, initialised
    from torch's global generator (callers seed it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=64, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return tokenizer, text_encoder


def train_vae(images, steps: int, seed: int = 0):
    """A small AutoencoderKL on [N, 1, 16, 16] digits in [0, 1]: reconstruction MSE plus a small KL term;
    its scaling_factor makes the latents unit-variance, as Stable Diffusion's does."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x = images * 2 - 1
    for _ in range(steps):
        batch = x[torch.randint(len(x), (32,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample(generator=gen)).sample, batch) \
            + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


def psnr(vae, images) -> float:
    """Mean PSNR (dB) of the VAE's reconstructions (posterior means) of [N, 1, H, W] images in [0, 1]."""
    import torch

    with torch.no_grad():
        x = images * 2 - 1
        recon = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample
                           for i in range(0, len(x), 256)])
    mse = ((recon.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def sd_pipeline(vae, words: list[str]):
    """A StableDiffusionPipeline: the VAE, a frozen random CLIP text encoder over `words`, a random UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = text_parts(words)
    latent_side = RESOLUTION // 2
    unet = UNet2DConditionModel(sample_size=latent_side, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                                cross_attention_dim=64, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd3_pipeline(vae, words: list[str]):
    """A StableDiffusion3Pipeline: the VAE, two frozen random CLIP text encoders (64 wide, projecting to 64 each)
    and a one-layer T5 (128 wide) over the caption words, a random 4-layer SD3 transformer on 1 x 1 patches of
    the 8 x 8 latents, and a flow-matching scheduler without shift (SD3's 3.0 is for 1024-px images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, t5_tokenizer = word_tokenizer(words), t5_word_tokenizer(words)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=64, max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=128, d_ff=256, d_kv=32, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=1, in_channels=LATENT_CHANNELS,
                                        out_channels=LATENT_CHANNELS, num_layers=4, attention_head_dim=16,
                                        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=64,
                                        pooled_projection_dim=128, pos_embed_max_size=RESOLUTION // 2)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes latents / scaling_factor + shift_factor
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=word_tokenizer(words), text_encoder_3=t5,
                                    tokenizer_3=t5_tokenizer)


def build_initial_pipeline(path: Path, data: Path, source: str, vae_steps: int = 1500, family: str = "sd",
                           copy_style: str = "exact") -> Path:
    """The pipeline before pretraining (`family`: sd or sd3): trained VAE, frozen random text encoders over the
    words of `copy_style`'s captions, random denoiser. The VAE trains on the first 80 % of the held-out digits and is
    scored on the rest (vae.json)."""
    import torch

    if (path / "model_index.json").is_file():
        return path
    images, _ = held_out_digits(data, source)
    split = int(0.8 * len(images))
    vae = train_vae(images[:split], vae_steps)
    quality = {"psnr_held_out_db": psnr(vae, images[split:]), "trained_on": split, "scored_on": len(images) - split,
               "steps": vae_steps, "scaling_factor": vae.config.scaling_factor}
    print(f"testbed VAE: PSNR {quality['psnr_held_out_db']:.1f} dB on {quality['scored_on']} held-out digits")
    torch.manual_seed(0)
    {"sd": sd_pipeline, "sd3": sd3_pipeline}[family](vae, caption_words(copy_style)).save_pretrained(path)
    (path / "vae.json").write_text(json.dumps(quality, indent=2))
    return path


def pretrain(out: Path, data: Path, init: Path, steps: int, family: str = "sd") -> Path:
    """Memorize: a plain loop (memmit with K = 1, AGC and dedup off) from the random denoiser, with Stable
    Diffusion's 10 % of empty prompts so that classifier-free guidance has an unconditional branch. Cached.
    The transformer's gradients are clipped (at 1, as the fine-tunes'): unclipped, a transformer at this learning
    rate is not known to be stable, and the UNet's runs are kept as they were."""
    target = out / f"pretrained-{data.name}-{steps}steps{suffix(family)}"
    if (target / "model_index.json").is_file():
        print(f"using the cached pretrained pipeline {target}")
        return target
    launch(["--pretrained_model_name_or_path", init, "--dataset_name", data, "--caption_column", "text",
            "--output_dir", target, "--overwrite_output_dir", "--train_batch_size", 32, "--num_shards", 1,
            "--agc_lambda", 0, "--dedup", "none", "--num_rounds", 1, "--local_steps", steps,
            "--learning_rate", 1e-3, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 200,
            "--max_grad_norm", "null" if family == "sd" else 1.0, "--checkpointing_steps", 1000,
            "--num_validation_images", 0, "--caption_dropout", 0.1, "--report_to", "none", "--seed", 0],
           accelerate=False)
    return target


def suffix(family: str) -> str:
    """What a family's cached testbed folders are named with (none for the original Stable Diffusion one)."""
    return "" if family == "sd" else f"-{family}"


def eval_flags(data: Path, features: Path, num_samples: int, inference_steps: int) -> list[str]:
    """`memmit eval` options of the testbed: training captions as prompts, digit-classifier quality and alignment."""
    return ["--dataset_name", str(data), "--caption_column", "text", "--num_samples", str(num_samples),
            "--num_inference_steps", str(inference_steps), "--quality_extractor", str(features),
            "--alignment_classifier", str(classifier_file(features)), "--class_names", *DIGIT_WORDS]


def data_dir(out: Path, source: str, num_unique: int = 256, copies: int = 64, copy_style: str = "exact") -> Path:
    return out / ("data-t2i" + ("" if source == "mnist" else f"-{source}")
                  + ("" if (num_unique, copies) == (256, 64) else f"-u{num_unique}-r{copies}")
                  + ("" if copy_style == "exact" else f"-{copy_style}"))


def prepare(out: Path, source: str, pretrain_steps: int, num_unique: int = 256, copies: int = 64,
            vae_steps: int = 1500, family: str = "sd", copy_style: str = "exact") -> tuple[Path, Path, Path]:
    """The testbed's data, digit classifier and pretrained pipeline of `family` (each cached under `out`)."""
    data = build_captioned_dataset(data_dir(out, source, num_unique, copies, copy_style), source, num_unique,
                                   copies=copies, copy_style=copy_style)
    features = build_digit_features(features_file(data), data, source)
    init = build_initial_pipeline(out / f"init-{data.name}{suffix(family)}", data, source, vae_steps, family,
                                  copy_style)
    return data, features, pretrain(out, data, init, pretrain_steps, family)


# Arms at the testbed recipe's budget: memmit's text-to-image default, the paper's Stable Diffusion setting
# (K = 4, lambda = 0.8, no dedup, no anchoring; 16 rounds of 6 steps per shard) and a plain fine-tune (K = 1,
# AGC, dedup and anchoring off).
NO_ANCHOR = ["--dedup_captions", "ignore"]
ARMS = {"memmit": [],
        "paper": ["--num_shards", 4, "--local_steps", 6, "--agc_lambda", 0.8, "--dedup", "none", *NO_ANCHOR],
        "plain": ["--agc_lambda", 0, "--dedup", "none", *NO_ANCHOR]}


# Forget mode on the testbed (--task forget, benchmarks/forget_t2i.py): configs/t2i-testbed.yaml's optimizer settings
# without its data options (forget mode has no dataset), 16 rounds of 24 steps (384), verified with --evaluate.
FORGET_RECIPE = ["--resolution", 16, "--center_crop", "--train_batch_size", 32, "--learning_rate", 1e-4,
                 "--adam_weight_decay", 0, "--caption_dropout", 0.1, "--num_validation_images", 0,
                 "--report_to", "none", "--checkpointing_steps", 100, "--checkpoints_total_limit", 1, "--evaluate",
                 "--local_steps", 24]
FORGET_ROUNDS = 16


def forget(out: Path, pretrained: Path, name: str, *extra) -> Path:
    """A forget-mode run of the testbed checkpoint (prompts and other options in `extra`)."""
    target = out / name
    launch(["--pretrained_model_name_or_path", pretrained, *FORGET_RECIPE, "--output_dir", target,
            "--overwrite_output_dir", *extra])
    return target


def duplicated_captions(data: Path) -> list[str]:
    """The captions more than one training row carries: the prompts a user who knows what the model copies gives."""
    counts = Counter(datasets.load_from_disk(str(data))["text"])
    return sorted(t for t, n in counts.items() if n > 1)


def fine_tune(out: Path, data: Path, pretrained: Path, name: str, *extra) -> Path:
    target = out / name
    launch(["--config", ROOT / "configs" / "t2i-testbed.yaml", "--pretrained_model_name_or_path", pretrained,
            "--dataset_name", data, "--output_dir", target, "--overwrite_output_dir", *extra])
    return target


def evaluate_run(path: Path, report_dir: Path, data: Path, features: Path, num_samples: int,
                 inference_steps: int) -> dict:
    """`memmit eval` of one run with the testbed's options; writes to report_dir and returns the report."""
    from ..config import EvalConfig, parse_args
    from ..eval.report import evaluate

    return evaluate(parse_args(["--pretrained_model_name_or_path", str(path), "--output_dir", str(report_dir),
                                *eval_flags(data, features, num_samples, inference_steps)], EvalConfig),
                    show_progress=False)


def forget_main(args) -> int:
    """Forget mode on the testbed as a black box: the pretrained checkpoint mitigated from its duplicated captions
    alone (no training image reaches the run), then `memmit eval` of both against the training images."""
    from ..eval.cli import compare_main

    out = Path(args.output_dir)
    data, features, pretrained = prepare(out, args.digits, args.pretrain_steps, args.num_unique, args.copies,
                                         args.vae_steps, args.family)
    prompts = out / "forget-prompts.txt"
    prompts.write_text("\n".join(duplicated_captions(data)) + "\n")
    extra = ["--dedup_threshold", args.forget_threshold] if args.forget_threshold is not None else []
    target = forget(out, pretrained, "forget", "--forget_prompts", prompts, "--num_rounds",
                    args.num_rounds or FORGET_ROUNDS, "--forget_inference_steps", args.num_inference_steps,
                    "--eval_quality_extractor", features, *extra)
    if not (target / "model_index.json").is_file():  # no prompt reproduced: the run said so and wrote no model
        return 0
    reports = {name: evaluate_run(path, out / "eval" / name, data, features, args.num_samples,
                                  args.num_inference_steps) for name, path in (("pretrained", pretrained),
                                                                               ("forget", target))}
    print(f"\nforget: {target} learned from {prompts} and its own renders only; memorized = share of "
          f"{args.num_samples} samples (prompts: training captions) that copy a training image (d1/d2 < 1/3)")
    compare_main([str(out / "eval" / name / "report.json") for name in reports]
                 + ["--labels", *reports, "--output", str(out / "compare.png")])
    return 0


def main(args) -> int:
    """The testbed, then the arms, then the table (`args`: quickstart's parsed options)."""
    from ..eval.cli import compare_main

    out = Path(args.output_dir)
    data, features, pretrained = prepare(out, args.digits, args.pretrain_steps, args.num_unique, args.copies,
                                         args.vae_steps, args.family)
    rounds = ["--num_rounds", args.num_rounds] if args.num_rounds else []
    runs = {"pretrained": pretrained, **{name: fine_tune(out, data, pretrained, name, *flags, *rounds)
                                         for name, flags in ARMS.items()}}
    reports = {name: evaluate_run(path, out / "eval" / name, data, features, args.num_samples,
                                  args.num_inference_steps) for name, path in runs.items()}
    print(f"\nmemorized = share of {args.num_samples} samples (prompts: training captions) whose distance to the "
          "nearest training image is < 1/3 of that to the nearest outside its near-duplicate family, for all "
          "prompts and apart for duplicated and other captions; aligned = share the digit classifier reads as the "
          "prompt's digit")
    compare_main([str(out / "eval" / name / "report.json") for name in reports]
                 + ["--labels", *reports, "--output", str(out / "compare.png")])
    return 0
