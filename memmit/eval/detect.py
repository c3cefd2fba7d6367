"""`memmit eval --detect_prompts`: memorized prompts found from the model alone, without its training images.

Wen et al. ("Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024): a prompt the
model has memorized pulls every noise towards one image, so its text-conditional prediction departs far from the
unconditional one from the very first sampling steps. A prompt's score is ‖ε(x_t, c) − ε(x_t, ∅)‖ (L2 over the
latent; for a flow-matching model, SD3 or Flux, the same gap of its velocity predictions), averaged over the first
`detect_steps` steps of the pipeline's own sampling (DDIM for the DDPM-trained families, the flow-matching Euler
sampler for SD3 and Flux, each at its pipeline's default guidance) and over `detect_seeds` starting noises. Ranked
prompts go to detect_prompts.json; when the prompts are the training captions, the ROC AUC of the score against
"this caption occurs more than once in the training data" says how well it singles out the duplicated ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Optional

import torch
from torchmetrics.functional.classification import binary_auroc
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..data.dataset import caption_counts
from .report import load_eval_dataset
from .sampling import load_eval_task, sample_generators
from .metrics import default_device
from ..families.stable_diffusion import TextToImageTask
from ..families.text import fp32

TOP_PRINTED = 10


def sampling_guidance(task: TextToImageTask) -> float:
    """The classifier-free guidance the pipeline samples with by default: its guidance_scale (SD 7.5, SDXL 5.0,
    SD3 7.0), or for a guidance-distilled Flux its true_cfg_scale (1: the conditional prediction alone)."""
    options = inspect.signature(task.pipeline_class.__call__).parameters
    return float(options["true_cfg_scale" if "true_cfg_scale" in options else "guidance_scale"].default)


@torch.no_grad()
def prompt_scores(task: TextToImageTask, prompts: list[str], num_inference_steps: int, detect_steps: int,
                  num_seeds: int, seed: int, batch_size: int, device: torch.device,
                  show_progress: bool = True) -> torch.Tensor:
    """[len(prompts)] fp32 scores on the CPU. The starting noise of prompt i, seed j comes from its own
    generator (index i * num_seeds + j), so a prompt's score does not depend on the others or the batch size."""
    task.prepare(device, torch.float32)
    denoiser = task.denoiser.to(device).eval()
    scheduler, guidance = task.sampling_scheduler(), sampling_guidance(task)
    empty = fp32(*task.text.encode_text([""], device))
    latent_side = task.resolution // task.vae_scale_factor
    shape = (task.pipeline.vae.config.latent_channels, latent_side, latent_side)  # unpacked (Flux packs them)
    pairs = [(i, j) for i in range(len(prompts)) for j in range(num_seeds)]
    totals = torch.zeros(len(prompts))
    for start in tqdm(range(0, len(pairs), batch_size), desc="scoring prompts", disable=not show_progress):
        chunk = pairs[start:start + batch_size]
        # Set anew for each chunk: the flow-matching sampler counts its steps.
        task.set_sampling_timesteps(scheduler, num_inference_steps)
        text = fp32(*task.text.encode_text([prompts[i] for i, _ in chunk], device))
        # Unconditional then conditional: hidden states (and the pooled embedding) of the empty prompt, the prompts.
        context = task.denoiser_kwargs(*[None if e is None else torch.cat([u.expand_as(e), e])
                                         for u, e in zip(empty, text)])
        generators = sample_generators(seed, range(start, start + len(chunk)))
        # Both samplers start from unit-variance noise and take it unscaled (DDIM's init_noise_sigma is 1 and its
        # scale_model_input the identity; the flow-matching sampler has neither).
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        magnitude = torch.zeros(len(chunk), device=device)
        for t in scheduler.timesteps[:detect_steps]:
            both = torch.cat([latents, latents])
            uncond, cond = task.predict(denoiser, both, t.expand(len(both)).to(device), context).float().chunk(2)
            magnitude += (cond - uncond).flatten(1).norm(dim=1)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        totals.index_add_(0, torch.tensor([i for i, _ in chunk]), magnitude.cpu())
    return totals / (num_seeds * min(detect_steps, num_inference_steps))


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line."""
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ValueError(f"prompts_file {path!r} cannot be read: {exc.strerror or exc}") from exc
    if not prompts:
        raise ValueError(f"prompts_file {path!r} holds no prompt (one per line)")
    return prompts


def training_prompts(config: EvalConfig, task: TextToImageTask) -> tuple[list[str], list[bool]]:
    """The distinct training captions (a list-valued row contributes each of its captions) in order of first
    appearance, and for each whether it occurs more than once in the training data."""
    if config.caption_column is None:
        raise ValueError("--detect_prompts scores --prompts_file's prompts, or the training captions: pass one of "
                         "prompts_file or caption_column")
    ds = load_eval_dataset(config, task)
    counts = caption_counts(ds[config.caption_column], config.caption_column)
    return list(counts), [n > 1 for n in counts.values()]


def detect_prompts(config: EvalConfig, show_progress: bool = True) -> dict:
    """Score the prompts, write detect_prompts.json to config.output_dir and return it."""
    task = load_eval_task(config)  # an unconditional pipeline refuses --detect_prompts by name
    duplicated: Optional[list[bool]] = None
    if config.prompts_file:
        prompts = read_prompts_file(config.prompts_file)
    else:
        prompts, duplicated = training_prompts(config, task)
    scores = prompt_scores(task, prompts, config.num_inference_steps, config.detect_steps, config.detect_seeds,
                           config.seed, config.batch_size, default_device(), show_progress)
    order = sorted(range(len(prompts)), key=lambda i: -float(scores[i]))
    ranked = [{"prompt": prompts[i], "score": float(scores[i]),
               **({"duplicated": duplicated[i]} if duplicated is not None else {})} for i in order]
    report = {"settings": dataclasses.asdict(config), "guidance_scale": sampling_guidance(task),
              "method": f"Wen et al. 2024: mean over the first detect_steps {task.sampler} steps and detect_seeds "
                        "noises of ||eps(x_t, prompt) - eps(x_t, empty prompt)||_2 (flow matching: of the velocities)",
              "prompts": ranked}
    if duplicated is not None and 0 < sum(duplicated) < len(duplicated):
        report["roc_auc_duplicated"] = float(binary_auroc(scores, torch.tensor(duplicated, dtype=torch.long)))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect_prompts.json").write_text(json.dumps(report, indent=2))
    return report


def format_detection(report: dict) -> str:
    lines = [f"prompts by memorization score (Wen et al. 2024), highest first; {len(report['prompts'])} scored"]
    if "roc_auc_duplicated" in report:
        lines.append(f"ROC AUC against the captions duplicated in the training data: "
                     f"{report['roc_auc_duplicated']:.3f}")
    for row in report["prompts"][:TOP_PRINTED]:
        mark = " (duplicated)" if row.get("duplicated") else ""
        lines.append(f"{row['score']:10.4f}  {row['prompt']}{mark}")
    return "\n".join(lines)
