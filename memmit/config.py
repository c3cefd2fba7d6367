"""Every memmit option: one dataclass field with its default, its help and its validation.

`MemmitConfig` holds `memmit train`'s options and `EvalConfig` `memmit eval`'s; both start with the
pipeline and training set of `ModelDataConfig`. A YAML file given with `--config` supplies defaults,
command-line flags override it; flag names follow diffusers' training examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml

SHARD_STRATEGIES = ("random", "contiguous", "stratified")
DEDUP_SEARCHES = ("auto", "exact", "ivf", "hnsw")
AGGREGATIONS = ("size", "uniform")
BANK_INITS = ("first", "zero")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# Flow matching's timestep densities and loss weightings, as diffusers' training_utils names them
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
SECRET_OPTIONS = ("hub_token",)
# Every tracker accelerate supports, "all" of those installed, or "none" (as diffusers' examples).
TRACKERS = ("tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "aim", "all", "none")
# Options that mean something only for a pipeline conditioned on text (min-SNR weighting: memmit implements it for
# the latent text-to-image families only): an unconditional pipeline refuses each one given, by name.
TEXT_TO_IMAGE_OPTIONS = (
    "caption_column", "caption_dropout", "snr_gamma", "validation_prompts", "caption_replace_prob",
    "caption_insert_prob", "caption_repeat_prob", "text_embedding_noise", "dedup_captions", "dedup_anchors",
    "dedup_anchor_weight", "dedup_anchor_noisiest", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    "guidance_scale", "max_sequence_length", "alignment_classifier", "class_names", "detect_prompts", "prompts_file",
)
# Forget mode's options (only --forget_prompts reads them), and the options it refuses: they describe training images.
FORGET_OPTIONS = ("forget_top", "forget_min_score", "forget_samples", "forget_share", "forget_inference_steps",
                  "anchor_prompts", "retain_prompts", "retain_samples", "retain_neighbours",
                  "retain_recombined", "retain_detected", "forget_anchor_weight", "retain_distill",
                  "verify_retained")
NEEDS_TRAINING_IMAGES = ("dataset_name", "dataset_config_name", "train_data_dir", "label_column", "max_train_samples",
                         "cache_latents", "cache_text_limit_gb", "dedup", "dedup_captions", "dedup_anchors",
                         "dedup_family_size")
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
)


def opt(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field carrying its one-line help; `choices=` and `required=True` are checked on construction.
    `resume="free"` marks an option that does not change the run's arithmetic, so it may differ when resuming;
    every other option must equal the checkpoint's."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelDataConfig:
    """The pretrained pipeline and its training set: the options `memmit train` and `memmit eval` share."""

    # Model
    pretrained_model_name_or_path: Optional[str] = opt(None, "Hub id or local directory of a diffusers pipeline with a unet or a transformer.", required=True)
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the pretrained pipeline.")
    variant: Optional[str] = opt(None, "Weight variant to load, e.g. 'fp16'.")
    pretrained_vae_model_name_or_path: Optional[str] = opt(None, "Hub id or local directory of an AutoencoderKL that replaces the pipeline's VAE, in training and in the saved pipeline (e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in fp16, so memmit runs it in fp32 under --mixed_precision fp16).")

    # Data
    dataset_name: Optional[str] = opt(None, "Hub dataset name or local directory written by `Dataset.save_to_disk`.")
    dataset_config_name: Optional[str] = opt(None, "Configuration of a Hub dataset.")
    train_data_dir: Optional[str] = opt(None, "Folder of images (datasets' imagefolder layout).")
    image_column: str = opt("image", "Dataset column holding the images.")

    # Near duplicates: one detector for training-time dedup and for the eval's clusters
    dedup_features: str = opt("pixels", "Near-duplicate detector: pixels (blurred, normalised, best of +-1 px shifts) | phash (perceptual hash) | a TorchScript file, transformers model directory or Hub id (embeddings, cosine).")
    dedup_search: str = opt("auto", "How near-duplicate candidates are searched: exact (work quadratic in the images), ivf or hnsw (a faiss index: about linear, approximate; benchmarks/scale.py measures the recall), auto (exact up to 100,000 distinct images, ivf beyond).", choices=DEDUP_SEARCHES)
    dedup_features_dir: Optional[str] = opt(None, "Folder where the detector's features of the training images are written as they are computed (split across the main machine's processes, in chunks: a killed run resumes at the chunks it had not finished). Default: a folder under memmit's cache ($MEMMIT_CACHE/features), keyed by the images and the detector. A folder holding another dataset's or detector's features is refused.")
    dedup_threshold: Optional[float] = opt(None, "Near duplicates are closer than this, in the detector's units: pixels RMS in [0, 2], phash Hamming bits of 64, embeddings 1 - cosine; default: the detector's measured threshold, stricter for training (pixels 0.15, phash 4, embeddings 0.05) than for the eval's families (0.3, 10, 0.1).")

    def __post_init__(self) -> None:
        self.validate()

    def needs_dataset(self) -> bool:
        return True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            need(not f.metadata.get("required") or value is not None, f"{f.name} is required")
            need(choices is None or value in choices, f"{f.name}={value!r} is not one of {list(choices or [])}")
        if self.needs_dataset():
            need((self.dataset_name is None) != (self.train_data_dir is None),
                 "give exactly one of dataset_name or train_data_dir")
        else:
            need(self.dataset_name is None or self.train_data_dir is None,
                 "give at most one of dataset_name or train_data_dir")


@dataclass
class EvalConfig(ModelDataConfig):
    """Options of `memmit eval`: measure how much a diffusers pipeline copies its training images (and,
    optionally, sample quality)."""

    # Data
    caption_column: Optional[str] = opt(None, "Text-to-image pipelines: dataset column of captions; each sample's prompt is a training caption drawn with seed (saved in prompts.json).")
    max_train_samples: Optional[int] = opt(None, "Compare against the first N training images only.")
    resolution: Optional[int] = opt(None, "Sampling and comparison resolution; defaults to the denoiser's sample_size (times the VAE's downsampling for latent pipelines).")

    # Sampling
    num_samples: int = opt(256, "Images to sample.")
    num_inference_steps: int = opt(50, "Sampling steps: DDIM for DDPM-trained pipelines, the pipeline's own sampler for flow matching (SD3, Flux).")
    batch_size: int = opt(64, "Sampling and embedding batch size.")
    seed: int = opt(0, "Seed of the sampling noise and of the prompts' draw.")

    # Metrics
    feature_extractor: Optional[str] = opt(None, "TorchScript file or transformers model dir: also report cosine similarity of embeddings.")
    quality_extractor: Optional[str] = opt(None, "TorchScript file or transformers model dir for the Frechet distance; unset: torchmetrics' Inception FID, if it loads.")
    alignment_classifier: Optional[str] = opt(None, "Text-to-image: a TorchScript image classifier (class logits); prompt alignment = share of samples it assigns to the class their prompt names (see class_names).")
    class_names: Optional[list[str]] = opt(None, "The alignment classifier's classes, in output order; a prompt names class c when c's name is one of its words (prompts naming none or several are not counted).")
    threshold: float = opt(1 / 3, "A sample is memorized when d1/d2 < threshold (1/3: Yoon et al.).")
    k: int = opt(50, "Neighbours for the neighbourhood-normalised score.")

    # Memorized-prompt detection (Wen et al. 2024): no sampling, no training images needed
    detect_prompts: bool = opt(False, "Text-to-image: instead of sampling, score prompts by how far their noise (flow matching: velocity) prediction departs from the unconditional one in the first steps of the pipeline's sampler (Wen et al., ICLR 2024); writes detect_prompts.json, ranked.")
    prompts_file: Optional[str] = opt(None, "--detect_prompts: a text file of prompts, one per line (then no dataset is needed); default: the distinct training captions, with the ROC AUC against those duplicated in the data.")
    detect_steps: int = opt(1, "--detect_prompts: first sampling steps averaged (of num_inference_steps); on the text-to-image testbed the first step singles duplicated captions out best (EFFICACY.md).")
    detect_seeds: int = opt(4, "--detect_prompts: starting noises averaged per prompt.")

    # Output
    output_dir: Optional[str] = opt(None, "Where report.json, samples.npy and most_copied.png go.", required=True)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        super().validate()
        need(self.seed >= 0, f"seed must be >= 0 (it keys every sample's generator), got {self.seed}")
        need(self.num_samples >= 2, f"num_samples must be >= 2 (a Frechet distance needs two), got {self.num_samples}")
        need(self.num_inference_steps >= 1, f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.k >= 2, f"k must be >= 2 (the d1/d2 criterion needs two neighbours), got {self.k}")
        need(0 < self.threshold <= 1, f"threshold must be in (0, 1] (d1/d2 is at most 1), got {self.threshold}")
        need(self.max_train_samples is None or self.max_train_samples >= 2,
             f"max_train_samples must be >= 2, got {self.max_train_samples}")
        need(self.resolution is None or self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}")
        need(self.detect_steps >= 1 and (not self.detect_prompts or self.detect_steps <= self.num_inference_steps),
             f"detect_steps must be between 1 and num_inference_steps={self.num_inference_steps}, got {self.detect_steps}")
        need(self.detect_seeds >= 1, f"detect_seeds must be >= 1, got {self.detect_seeds}")
        need((self.alignment_classifier is None) == (self.class_names is None),
             "alignment_classifier and class_names go together: the classifier's outputs are the named classes")
        need(self.alignment_classifier is None or self.caption_column is not None,
             "alignment_classifier scores prompts, so it needs a caption_column (a text-to-image evaluation)")
        need(self.prompts_file is None or self.detect_prompts, "prompts_file is read by --detect_prompts only")

    def needs_dataset(self) -> bool:
        """--detect_prompts on a prompts file audits the model alone."""
        return not (self.detect_prompts and self.prompts_file)


# The EvalConfig options `--evaluate` exposes as eval_<name>; the rest come from the training options.
EVAL_OPTIONS = ("num_samples", "num_inference_steps", "batch_size", "feature_extractor", "quality_extractor",
                "threshold", "k")


def eval_opt(name: str) -> Any:
    """The training option eval_<name>: EvalConfig's own default and help, free to change on resume."""
    f = EvalConfig.__dataclass_fields__[name]
    return opt(f.default, f"--evaluate: {f.metadata['help']}", resume="free")


@dataclass
class MemmitConfig(ModelDataConfig):
    """Options of `memmit train`: fine-tune a diffusers pipeline with IET + AGC to mitigate its memorization."""

    # Data
    caption_column: Optional[str] = opt(None, "Dataset column of captions (a non-empty string or list of them per image) for text-to-image pipelines.")
    label_column: Optional[str] = opt(None, "Dataset column of labels, used by shard_strategy=stratified.")
    max_train_samples: Optional[int] = opt(None, "Keep only the first N samples (for debugging or quick runs).")
    resolution: Optional[int] = opt(None, "Training resolution; defaults to the denoiser's sample_size (times the VAE's downsampling for latent pipelines).")
    center_crop: bool = opt(False, "Center-crop to the resolution (otherwise random crop).")
    random_flip: bool = opt(False, "Randomly flip images horizontally.")
    cache_latents: bool = opt(False, "Text-to-image: encode every training image with the VAE (and its mirror image, with --random_flip) and every training caption with the text encoder once, store them under $MEMMIT_CACHE/latents (default ~/.cache/memmit), and train from them; later runs with the same model, data and settings reuse them. Needs --center_crop.")
    cache_text_limit_gb: float = opt(20.0, "--cache_latents caches the text encoders' outputs only while they take at most this many GB on disk (SD3's and Flux's T5 output takes 2.7-4.2 MB a caption: 20 GB hold about 5,000-7,000 captions); above it each step encodes its captions, as without the cache, and the log says so.")
    dataloader_num_workers: int = opt(0, "Processes that decode and transform training images ahead of the loop (0: the main process does it). The result is the same for any number.", resume="free")

    # Forget mode: a checkpoint's memorized prompts, no training image (memmit/forget/)
    forget_prompts: Optional[str] = opt(None, "Mitigate the pipeline from the prompts it reproduces, with no training data: a file of prompts, one a line, or the detect_prompts.json `memmit eval --detect_prompts` writes (ranked). Each prompt is rendered from forget_samples seeds; the renders that collapse onto one image are its reproductions, and they train towards the prompt's anchor (its words without the trigger words); the anchors, the prompts that do not reproduce, retain_prompts and the forget prompts' neighbours and recombined words train on their own renders. Replaces dataset_name and train_data_dir.")
    forget_top: Optional[int] = opt(None, "forget_prompts: take only its first N prompts (of a detect_prompts.json: the N highest scores).")
    forget_min_score: Optional[float] = opt(None, "forget_prompts of a detect_prompts.json: take only the prompts scoring at least this.")
    forget_samples: int = opt(16, "forget_prompts: renders of each prompt, from distinct seeds, that decide whether it reproduces an image.")
    forget_share: float = opt(0.5, "forget_prompts: a prompt reproduces an image when one near-duplicate cluster (dedup_features, at the eval's threshold) holds at least this share of its renders.")
    forget_inference_steps: int = opt(50, "forget_prompts: sampling steps of the renders (the pipeline's sampler; DDIM for DDPM-trained pipelines).")
    anchor_prompts: Optional[str] = opt(None, "forget_prompts: a file of anchors, line i the anchor of forget prompt i (default: each prompt without its trigger words, found by Wen et al.'s memorization score).")
    retain_prompts: Optional[str] = opt(None, "forget_prompts: a file of prompts (one a line) whose renders train as they are, beside the anchors and the prompts that do not reproduce: what the model should keep making.")
    retain_samples: int = opt(4, "forget_prompts: renders of each retained prompt.")
    retain_neighbours: int = opt(8, "forget_prompts: neighbours of each reproducing prompt retained (one word swapped for another of the forget prompts' words; those whose renders reproduce a copy are left out): the prompts near the forgotten ones that should render as before.")
    retain_recombined: int = opt(32, "forget_prompts: prompts retained per reproducing prompt made of the forget prompts' words recombined by position (word j of a prompt drawn for each position; those whose renders reproduce a copy are left out): the words the copies share, in combinations the model should keep rendering.")
    retain_detected: int = opt(64, "forget_prompts of a detect_prompts.json: prompts retained from its lowest-ranked (those not taken as forget prompts, lowest score first; those whose renders reproduce a copy are left out): prompts of the user's own list the model renders without memorizing, so the run keeps what the forget prompts' words do not cover.")
    forget_anchor_weight: float = opt(2.0, "forget_prompts: the loss weight of a reproduction's anchored samples (1 = as a retained render's). Each reproducing prompt has as many anchored rows as collapsed renders, so it needs less than dedup_anchor_weight's boost: with the retained renders distilled and anchors that draw a copy replaced (the defaults), 2 took the testbed checkpoint that copies hard from 98.5 to 0.4 percent of duplicated-caption samples copying in 384 steps (two seeds), other-prompt alignment from 81.4 to 74.2, and 3 to 0.0 and 71.2 (4, before ties went to the anchor furthest from the copy: 0.0 and 72.9); before distillation, weight 1 left 12 of 100 new-seed renders copying and 16 lost more alignment than 4 (EFFICACY.md, forget mode).")
    retain_distill: bool = opt(True, "forget_prompts: the retained renders train towards the input model's prediction at their noised latents (a frozen copy of its denoiser, in memory beside the trained one) instead of towards the noise drawn: distillation holds what the model draws for them at every noise level, where training on its own renders drifts (EFFICACY.md, forget mode). --no-retain_distill saves the copy's memory.")
    verify_retained: int = opt(64, "forget_prompts with --evaluate: how many of the retained prompts the verification renders, forget_samples times each by both pipelines (evenly spaced over their list; 0: all). A detection's top 64 retains thousands, hours of rendering.", resume="free")

    # Method: Iterative Ensemble Training
    num_shards: int = opt(1, "K: number of disjoint data shards, one model copy trained per shard and averaged every round (the paper's IET: K >= 2; with fewer shards than processes, P/K processes train each shard data-parallel). memmit's default, 1, fine-tunes one copy with AGC: at a fixed sample budget shards slow training down and keep more memorization (EFFICACY.md).")
    shard_strategy: str = opt("random", "How samples are split into shards: random | contiguous | stratified.", choices=SHARD_STRATEGIES)
    dedup: str = opt("keep_one", "Near-duplicate training images: keep_one (train on one copy; see EFFICACY.md) | same_shard (all copies in one shard) | none (the paper).", choices=("none", "keep_one", "same_shard"))
    dedup_captions: Optional[str] = opt(None, "Text-to-image with dedup keep_one; default: anchor for text-to-image pipelines with dedup keep_one (memmit's measured text-to-image default, EFFICACY.md), else ignore. ignore (the kept copy keeps its own caption) | merge (it trains with every distinct caption of its cluster, one drawn per step: the copies' captions are not lost) | empty (a cluster whose copies share one caption trains its kept copy on the empty prompt: that caption no longer points at the image; merge for the other clusters) | anchor (unlearn each copied caption, a caption >= 2 copies of a cluster carry: one copy carrying it trains the model's prediction for that caption towards its own, gradient-stopped prediction for one of the dedup_anchors training captions nearest to it in the text encoder's output, outside every cluster, after Kumari et al. 2023's concept ablation; AGC neither banks nor skips it; the cluster's captions one copy carries train merged on one more copy, so a cluster sharing no caption merges).", choices=(None, "ignore", "merge", "empty", "anchor"))
    dedup_anchors: int = opt(4, "dedup_captions=anchor: how many of the nearest other training captions a copied caption is pulled towards; each step draws one.")
    dedup_anchor_noisiest: float = opt(1.0, "dedup_captions=anchor: anchored samples draw their timesteps from this noisiest fraction of the schedule (1 = the whole schedule, as any sample): a copy is decided in the first, noisiest sampling steps.")
    dedup_anchor_weight: float = opt(16.0, "dedup_captions=anchor: the loss weight of an anchored copy's samples (1 = as any sample): how fast its copied caption unlearns the image. 16 removed all duplicated-caption copying of a checkpoint that already copies hard, where 8 left more than half of it (EFFICACY.md, 2026-12-06).")
    dedup_family_size: int = opt(8, "Training also merges every near-duplicate family of at least this many images found at the eval's looser threshold (dedup_threshold or the eval default): many variants of one image are copies, two look-alike images are not; 0 turns it off.")
    aggregation: str = opt("size", "Shard weights when averaging: size (n_k/N) | uniform (1/K).", choices=AGGREGATIONS)
    num_rounds: int = opt(2, "Number of rounds; each ends by averaging the shard models.")
    local_epochs: int = opt(1, "Epochs over its own shard that each shard trains per round.")
    local_steps: Optional[int] = opt(None, "Optimizer steps per shard per round; when set, replaces local_epochs.")

    # Method: Anti-Gradient Control
    agc_lambda: Optional[float] = opt(None, "Skip a sample when its loss < agc_lambda * loss_bank[t]; 0 turns AGC off. Default: 0.5 for pixel-space unconditional pipelines, 0.8 for text-to-image.")
    agc_bank_decay: float = opt(0.8, "Decay beta of the per-timestep loss bank: b <- beta*b + (1-beta)*loss.")
    agc_bank_init: str = opt("first", "Loss bank start: first (first observed loss) | zero (as the reference code).", choices=BANK_INITS)
    agc_bank_bins: Optional[int] = opt(None, "Share one loss-bank entry among consecutive timesteps: this many entries (e.g. 50) instead of one per timestep; default: one per timestep (the paper) for DDPM-trained pipelines, 50 for flow matching (SD3, Flux; EFFICACY.md).")
    agc_exclusion: Optional[float] = opt(None, "At each round's end, leave out of all later rounds every sample AGC skipped in at least this share of its visits so far (e.g. 0.5); off by default.")
    agc_exclusion_min_visits: int = opt(4, "Visits a sample needs before agc_exclusion judges it.")

    # Text-to-image
    caption_dropout: float = opt(0.0, "Probability of training on the empty prompt (for classifier-free guidance).")
    snr_gamma: Optional[float] = opt(None, "Min-SNR loss weighting gamma (e.g. 5.0); AGC still reads the unweighted loss.")
    validation_prompts: Optional[list[str]] = opt(None, "Prompts rendered into the logs at each round's end (default: a few training captions).", resume="free")
    # Flow matching (SD3, Flux), named as in diffusers' SD3 and Flux training examples
    weighting_scheme: Optional[str] = opt(None, "SD3/Flux: how training timesteps are drawn (logit_normal, mode; none: uniformly) or the loss weighted (sigma_sqrt, cosmap; uniform timesteps), as diffusers' compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3 do; default: the family's diffusers example's (SD3 logit_normal, Flux none). AGC still reads the unweighted loss.", choices=(None, *WEIGHTING_SCHEMES))
    logit_mean: float = opt(0.0, "SD3/Flux, weighting_scheme=logit_normal: mean of the normal whose sigmoid is the timestep.")
    logit_std: float = opt(1.0, "SD3/Flux, weighting_scheme=logit_normal: its standard deviation.")
    mode_scale: float = opt(1.29, "SD3/Flux, weighting_scheme=mode: the scale of the mode density.")
    guidance_scale: float = opt(3.5, "Flux with a guidance embedding (FLUX.1 dev): the guidance the transformer is trained at.")
    max_sequence_length: Optional[int] = opt(None, "SD3/Flux: T5 tokens per prompt, in training and in the rendered samples (default: the pipeline's, SD3 256, Flux 512, or its T5 tokenizer's model_max_length if shorter).")
    # Caption-side mitigations (Somepalli et al. 2023), per sample; see memmit/data/captions.py and EFFICACY.md
    caption_replace_prob: float = opt(0.0, "Random caption replacement: probability that a training caption becomes as many random words of the training captions' vocabulary.")
    caption_insert_prob: float = opt(0.0, "Random word insertion: probability of inserting one random vocabulary word at a random position of a training caption.")
    caption_repeat_prob: float = opt(0.0, "Caption word repetition: probability of repeating one of a training caption's words at a random position.")
    text_embedding_noise: float = opt(0.0, "Gaussian noise injection: standard deviation of noise added to the text encoder's output in training.")

    # LoRA
    lora_rank: Optional[int] = opt(None, "Train a LoRA adapter of this rank per shard instead of the whole denoiser (UNet or transformer).")
    lora_alpha: Optional[float] = opt(None, "LoRA alpha (default: the rank, i.e. scale 1).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "Denoiser modules that get LoRA adapters.")

    # Export
    export: str = opt("full", "What output_dir holds: full (the merged pipeline) | lora (one LoRA of the whole change).", choices=("full", "lora"), resume="free")
    export_lora_rank: int = opt(64, "Rank of the truncated-SVD LoRA written by --export lora.", resume="free")

    # EMA
    use_ema: bool = opt(False, "Keep an EMA of each shard's weights; the averaged EMA is the result.")
    ema_decay: float = opt(0.9999, "Maximum EMA decay (diffusers' EMAModel warm-up applies).")

    # Optimisation
    train_batch_size: int = opt(16, "Batch size per optimizer micro-step, on each process (a shard trained by a group of G processes takes G x this).")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    lr_scheduler: str = opt("constant", "diffusers get_scheduler name.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(0, "Warm-up optimizer steps of each shard's LR scheduler.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: Optional[float] = opt(1.0, "Clip gradients to this norm; null disables clipping.")
    seed: int = opt(0, "Seed of the shard split, data order, noise and timesteps.")
    mixed_precision: str = opt("no", "Autocast precision: no | fp16 (CUDA only) | bf16 (the trained denoiser stays fp32).", choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in the denoiser.", resume="free")
    use_8bit_adam: bool = opt(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU).")

    # Output, logging and checkpoints
    output_dir: str = opt("memmit-output", "Where the merged pipeline, checkpoints and logs go.", resume="free")
    overwrite_output_dir: bool = opt(False, "Allow writing into an output_dir that holds another run.", resume="free")
    checkpointing_steps: Optional[int] = opt(500, "Checkpoint every N loop steps (one optimizer step of each shard training at the time, on every process together); rounds' ends are always checkpointed.", resume="free")
    checkpoints_total_limit: Optional[int] = opt(3, "Keep at most this many checkpoints (null: all). Each holds the optimizer state of every shard: about (2 + 2K) x the model's size.", resume="free")
    resume_from_checkpoint: Optional[str] = opt(None, "'latest' or a checkpoint directory to resume from.", resume="free")
    push_to_hub: bool = opt(False, "Create the Hub repo before training and upload the result after it.", resume="free")
    hub_model_id: Optional[str] = opt(None, "Hub repo for --push_to_hub (default: the output_dir's name).", resume="free")
    hub_token: Optional[str] = opt(None, "Hub token with write access (default: HF_TOKEN or the saved login); never saved.", resume="free")
    hub_private_repo: bool = opt(False, "Create the Hub repo private.", resume="free")
    report_to: str = opt("tensorboard", "Tracker for logs (every process's shards): tensorboard | wandb | trackio | comet_ml | mlflow | clearml | dvclive | swanlab | aim | all | none.", choices=TRACKERS, resume="free")
    num_validation_images: int = opt(16, "Images sampled into the logs at each round's end; 0 disables.", resume="free")
    validation_inference_steps: int = opt(50, "Sampling steps of the round-end sample grid (DDIM, or the flow-matching pipeline's own sampler).", resume="free")

    # Memorization before and after (memmit eval's options, named eval_<name>)
    evaluate: bool = opt(False, "Run `memmit eval` on the input pipeline before training (cached) and on the result after export; the model card and the run's last lines compare them. With forget_prompts: both pipelines render each reproducing prompt from new seeds and in four variants (a word added or removed, a typo, a template), and the retained prompts, against the forget references, and the retained renders' Frechet distance to the input's (memmit/forget/verify.json).", resume="free")
    eval_num_samples: int = eval_opt("num_samples")
    eval_num_inference_steps: int = eval_opt("num_inference_steps")
    eval_batch_size: int = eval_opt("batch_size")
    eval_feature_extractor: Optional[str] = eval_opt("feature_extractor")
    eval_quality_extractor: Optional[str] = eval_opt("quality_extractor")
    eval_threshold: float = eval_opt("threshold")
    eval_k: int = eval_opt("k")

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        super().validate()
        self.validate_forget()
        need(self.seed >= 0, f"seed must be >= 0 (it keys every sample's generator), got {self.seed}")
        need(self.num_shards >= 1, f"num_shards must be >= 1, got {self.num_shards}")
        need(self.num_rounds >= 1, f"num_rounds must be >= 1, got {self.num_rounds}")
        need(self.local_epochs >= 1, f"local_epochs must be >= 1, got {self.local_epochs}")
        need(self.local_steps is None or self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        need(self.agc_lambda is None or self.agc_lambda >= 0, f"agc_lambda must be >= 0, got {self.agc_lambda}")
        for name in ("caption_dropout", "caption_replace_prob", "caption_insert_prob", "caption_repeat_prob"):
            need(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        need(self.text_embedding_noise >= 0, f"text_embedding_noise must be >= 0, got {self.text_embedding_noise}")
        need(self.snr_gamma is None or self.snr_gamma > 0, f"snr_gamma must be > 0, got {self.snr_gamma}")
        need(self.logit_std > 0, f"logit_std must be > 0, got {self.logit_std}")
        need(self.max_sequence_length is None or self.max_sequence_length >= 1,
             f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        need(self.lora_rank is None or self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.lora_rank is None or not self.use_ema, "use_ema is not supported with lora_rank (adapters restart every turn)")
        need(self.export_lora_rank >= 1, f"export_lora_rank must be >= 1, got {self.export_lora_rank}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.agc_exclusion is None or 0 < self.agc_exclusion <= 1,
             f"agc_exclusion must be in (0, 1], got {self.agc_exclusion}")
        need(self.agc_exclusion_min_visits >= 1, f"agc_exclusion_min_visits must be >= 1, got {self.agc_exclusion_min_visits}")
        need(0 <= self.agc_bank_decay < 1, f"agc_bank_decay must be in [0, 1), got {self.agc_bank_decay}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.cache_text_limit_gb >= 0, f"cache_text_limit_gb must be >= 0, got {self.cache_text_limit_gb}")
        need(not self.cache_latents or self.center_crop,
             "--cache_latents needs --center_crop: a random crop differs at every step, and the cache holds one crop "
             "per image (flips are cached both ways)")
        need(self.dataloader_num_workers >= 0, f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        need(self.train_batch_size >= 1, f"train_batch_size must be >= 1, got {self.train_batch_size}")
        need(self.gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.max_train_samples is None or self.max_train_samples >= 1, f"max_train_samples must be >= 1, got {self.max_train_samples}")
        need(self.resolution is None or self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}")
        need(self.checkpointing_steps is None or self.checkpointing_steps >= 1, f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, f"checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")
        need(self.num_validation_images >= 0, f"num_validation_images must be >= 0, got {self.num_validation_images}")
        need(self.dedup_captions in (None, "ignore") or self.caption_column is not None,
             f"dedup_captions={self.dedup_captions} acts on captions, and no --caption_column is given")
        need(self.dedup_captions in (None, "ignore") or self.dedup == "keep_one",
             f"dedup_captions={self.dedup_captions} acts on the captions of the copies dedup=keep_one drops, so it "
             f"needs --dedup keep_one (got {self.dedup})")
        need(self.dedup_anchors >= 1, f"dedup_anchors must be >= 1, got {self.dedup_anchors}")
        need(0 < self.dedup_anchor_noisiest <= 1, f"dedup_anchor_noisiest must be in (0, 1], got {self.dedup_anchor_noisiest}")
        need(self.dedup_anchor_weight > 0, f"dedup_anchor_weight must be > 0, got {self.dedup_anchor_weight}")
        need(self.dedup_family_size == 0 or self.dedup_family_size >= 2,
             f"dedup_family_size must be 0 (off) or >= 2, got {self.dedup_family_size}")
        need(self.dedup != "same_shard" or self.shard_strategy == "random",
             f"dedup=same_shard needs shard_strategy=random, got {self.shard_strategy!r}")
        need(self.shard_strategy != "stratified" or self.label_column is not None,
             "shard_strategy=stratified needs label_column")
        if self.evaluate:  # forget mode verifies with its own renders (forget/verify.py): no eval config
            need(self.export == "full", "--evaluate needs --export full: memmit eval samples a whole pipeline, "
                                        "and --export lora writes only the adapter")
            try:
                if self.forget_prompts is None:
                    self.eval_config(self.output_dir, before=True)
            except ValueError as exc:  # name the training option the user sets, not EvalConfig's field
                raise ValueError(re.sub(rf"\b({'|'.join(EVAL_OPTIONS)})\b", r"eval_\1", str(exc))) from exc

    def needs_dataset(self) -> bool:
        """Forget mode trains on the pipeline's own renders."""
        return self.forget_prompts is None

    def validate_forget(self) -> None:
        if self.forget_prompts is None:
            given = options_given(self, FORGET_OPTIONS)
            need(not given, f"{', '.join(given)}: options of --forget_prompts, which is not given")
            return
        given = options_given(self, NEEDS_TRAINING_IMAGES)
        need(not given, f"{', '.join(given)}: options of training images, and --forget_prompts trains on the "
                        "pipeline's own renders (no dataset)")
        need(self.forget_top is None or self.forget_top >= 1, f"forget_top must be >= 1, got {self.forget_top}")
        need(self.forget_samples >= 2, f"forget_samples must be >= 2 (a copy is renders that collapse), got {self.forget_samples}")
        need(0 < self.forget_share <= 1, f"forget_share must be in (0, 1], got {self.forget_share}")
        need(self.forget_inference_steps >= 1, f"forget_inference_steps must be >= 1, got {self.forget_inference_steps}")
        need(self.retain_samples >= 1, f"retain_samples must be >= 1, got {self.retain_samples}")
        need(self.retain_neighbours >= 0, f"retain_neighbours must be >= 0, got {self.retain_neighbours}")
        need(self.retain_recombined >= 0, f"retain_recombined must be >= 0, got {self.retain_recombined}")
        need(self.retain_detected >= 0, f"retain_detected must be >= 0, got {self.retain_detected}")
        need(self.forget_anchor_weight > 0, f"forget_anchor_weight must be > 0, got {self.forget_anchor_weight}")
        need(self.verify_retained >= 0, f"verify_retained must be >= 0, got {self.verify_retained}")
        need(not (self.retain_distill and self.agc_lambda), "agc_lambda > 0 with retain_distill: the retained "
             "renders' losses are distances to the input model's predictions (0 at the start), which AGC would skip; "
             "give --no-retain_distill or leave agc_lambda unset")
        need(not options_given(self, ("dedup_anchor_weight",)), "dedup_anchor_weight weighs anchored training "
             "captions; forget mode's reproductions take --forget_anchor_weight")

    def eval_config(self, output_dir: str | Path, before: bool) -> EvalConfig:
        """`memmit eval`'s settings for the input pipeline (`before`) or the exported one in output_dir: the
        same data, seed and prompts as training, the eval_* options for the rest."""
        ours = {f.name for f in dataclasses.fields(self)}
        values = {name: getattr(self, f"eval_{name}" if f"eval_{name}" in ours else name)
                  for name in (f.name for f in dataclasses.fields(EvalConfig)) if f"eval_{name}" in ours or name in ours}
        if not before:  # export writes a full pipeline (with the replacement VAE), no revision or variant
            values.update(pretrained_model_name_or_path=self.output_dir, revision=None, variant=None,
                          pretrained_vae_model_name_or_path=None)
        return EvalConfig(**{**values, "output_dir": str(output_dir)})

    def arithmetic_options(self) -> list[str]:
        """The options a resumed run must share with its checkpoint."""
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("resume") != "free"]

    def to_dict(self) -> dict:
        """Every option except secrets (the hub token), as saved with the output and logged."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_OPTIONS}

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def check_mixed_precision(mixed_precision: str, device_type: str) -> None:
    """fp16 needs a GradScaler, which memmit keeps on CUDA only; elsewhere fp16 gradients would silently underflow."""
    if mixed_precision == "fp16" and device_type != "cuda":
        raise ValueError(f"mixed_precision=fp16 needs a CUDA GPU (it trains with a gradient scaler), and this run is "
                         f"on {device_type}; pass --mixed_precision bf16 (or no) instead")


Config = TypeVar("Config", bound=ModelDataConfig)


def _field_type(hint: Any) -> type:
    """The scalar type of a field's type hint, Optional[...] unwrapped (list[str] stays list)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args and typing.get_origin(hint) is not list else hint
    return list if typing.get_origin(hint) is list else hint


def _parse_value(hint: Any):
    """argparse type for a field; 'none'/'null' gives None for optional fields, as in YAML."""
    kind = _field_type(hint)
    optional = type(None) in typing.get_args(hint)

    def parse(text: str):
        return None if optional and text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__  # argparse's error names it: "invalid int value: '1.7'"
    return parse


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _help(f: dataclasses.Field) -> str:
    """What --help says of a field: its help, then its default or that it is required."""
    if f.metadata.get("required"):
        return f"{f.metadata['help']} (required)"
    default = _default(f)
    return f"{f.metadata['help']} (default: {default})"


# Not transformers' HfArgumentParser: it has no --no-x for False defaults, rejects `none` for Optional fields
# and exits on a bad choice where validate() raises a ValueError naming it.
def build_parser(config_class: type = MemmitConfig, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """One flag per field of `config_class`, plus --config; flags not given stay out of the namespace."""
    parser = argparse.ArgumentParser(prog=prog, description=config_class.__doc__,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", type=str, help="YAML file of option defaults; flags override it.")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = _field_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=_help(f))
        elif kind is list:
            parser.add_argument(f"--{f.name}", nargs="+", help=_help(f))
        else:
            parser.add_argument(f"--{f.name}", type=_parse_value(hints[f.name]), help=_help(f))
    return parser


def _typed(name: str, hint: Any, value: Any, where: str) -> Any:
    """A YAML value as the field's type, or a ValueError naming the option and where it was written. Strict: a
    quoted boolean, a float for an integer or a list for a single value is an error, never a guess."""
    optional = type(None) in typing.get_args(hint)
    kind = _field_type(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} ({where}) needs a value; it cannot be null")
    if kind is list:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ValueError(f"{name} ({where}) must be a list of strings, got {value!r}")
    if isinstance(value, (list, dict)):
        raise ValueError(f"{name} ({where}) takes one {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} ({where}) must be true or false (unquoted), got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} ({where}) must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string: a number written so is still a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name} ({where}) must be a number, got {value!r}")
    if isinstance(value, bool):  # YAML 1.1 reads unquoted no/yes/off/on as booleans
        raise ValueError(f"{name} ({where}) must be a string, got {value!r}: YAML reads an unquoted no, yes, off or "
                         "on as a boolean; quote it")
    if not isinstance(value, str):
        raise ValueError(f"{name} ({where}) must be a string, got {value!r}; quote it")
    return value


def load_yaml(path: str | Path, config_class: type = MemmitConfig) -> dict:
    """Options of `config_class` from a YAML file, each checked against its field's type and choices; an error
    names the option, the file and the line (an unknown key: the valid ones)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:  # one parse: the node tree gives each key's line, the document its values
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {str(path)!r}{where} is not valid YAML: {problem}") from exc
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {str(path)!r} (line {lines.get(unknown[0], '?')}); "
                         f"valid options: {list(fields)}")
    hints = typing.get_type_hints(config_class)
    values = {}
    for name, value in data.items():
        where = f"{str(path)!r}, line {lines[name]}"
        values[name] = _typed(name, hints[name], value, where)
        choices = fields[name].metadata.get("choices")
        if choices is not None and values[name] not in choices:
            raise ValueError(f"{name}={values[name]!r} ({where}) is not one of {list(choices)}")
    return values


def parse_args(argv: list[str] | None = None, config_class: type[Config] = MemmitConfig,
               prog: Optional[str] = None) -> Config:
    """Resolve defaults < YAML file < flags into one validated `config_class`."""
    flags = vars(build_parser(config_class, prog).parse_args(argv))
    values = load_yaml(flags.pop("config"), config_class) if "config" in flags else {}
    values.update(flags)
    return config_class(**values)


def options_given(cfg: Any, names: Sequence[str]) -> list[str]:
    """Which of `names` `cfg` (either config, or a namespace of one's values) sets to something other than the
    option's default."""
    defaults = {f.name: _default(f) for cls in (EvalConfig, MemmitConfig) for f in dataclasses.fields(cls)}
    return [name for name in names if hasattr(cfg, name) and getattr(cfg, name) != defaults[name]]


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(config_class: type) -> str:
    """A Markdown table of `config_class`'s options: flag, type, default, help."""
    hints = typing.get_type_hints(config_class)
    rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(config_class):
        kind = _field_type(hints[f.name])
        default = "required" if f.metadata.get("required") else f"`{_default(f)}`"
        flag = f"`--{f.name}`" + (f" (`--no-{f.name}`)" if kind is bool else "")
        choices = f" One of {', '.join(f'`{c}`' for c in f.metadata['choices'])}." if f.metadata.get("choices") else ""
        rows.append(f"| {flag} | {kind.__name__} | {_markdown_cell(default)} | "
                    f"{_markdown_cell(f.metadata['help'] + choices)} |")
    return "\n".join(rows)


def options_markdown() -> str:
    """docs/options.md: every option of `memmit train` and `memmit eval`, generated from the dataclasses here."""
    return "\n".join([
        "# Options", "",
        "Generated from `memmit/config.py` by `make docs` (`python -m memmit.config > docs/options.md`); a test",
        "fails when this file and the code disagree. Every option is a flag and a key of a `--config` YAML file;",
        "flags override the file. `none` (or YAML `null`) gives an optional option no value.", "",
        "## `memmit train` / `accelerate launch train_memmit.py`", "", options_table(MemmitConfig), "",
        "## `memmit eval`", "", options_table(EvalConfig), ""])


if __name__ == "__main__":
    print(options_markdown(), end="")
