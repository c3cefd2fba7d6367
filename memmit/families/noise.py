"""The forward processes a denoiser is trained on: DDPM's variance-preserving noise (the UNet families) and
rectified flow (SD3, Flux). Each draws from every sample's own generator, on the CPU: its noise, then its
timestep, so a run is reproducible on any device and in any batch, and resumable exactly (draws.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..config import WEIGHTING_SCHEMES
from ..draws import per_sample_randint, per_sample_randn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Noised:
    """One batch's draw: the denoiser's input and timestep (on the device), each sample's timestep index (a CPU
    long in [0, num_train_timesteps): what AGC's loss bank is keyed by), the target, and the scheme's loss weights
    (None when they are all 1)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    indices: torch.Tensor
    target: torch.Tensor
    weights: Optional[torch.Tensor] = None


def noisiest(indices: torch.Tensor, fraction: float, num_train_timesteps: int, noisier_up: bool) -> torch.Tensor:
    """Timestep indices moved into the noisiest `fraction` of the schedule, keeping their order and spread within it:
    index i of [0, T) becomes one of the top fraction*T indices (DDPM: noise grows with i) or of the bottom ones
    (flow matching: sigma falls as i grows). A mapping, not a fresh draw: the sample's generator draws what it did."""
    span = max(1, int(fraction * num_train_timesteps))
    scaled = indices * span // num_train_timesteps
    return num_train_timesteps - span + scaled if noisier_up else scaled


class DDPMNoise:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise at a uniform integer t, from the DDPM schedule of the pipeline's
    scheduler config, whatever sampler the pipeline ships with (SDXL's EulerDiscreteScheduler.add_noise is not
    variance preserving: x0 + sigma * noise), as diffusers' SD and SDXL examples train; target by prediction_type."""

    def __init__(self, scheduler_config):
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def __call__(self, x0: torch.Tensor, generators: Sequence[torch.Generator], device: torch.device,
                 squeeze: Optional[tuple[torch.Tensor, float]] = None) -> Noised:
        """`squeeze` = (mask, fraction): the masked samples' timesteps move into the noisiest fraction (noisiest)."""
        noise = per_sample_randn(x0.shape[1:], generators)
        timesteps = per_sample_randint(self.num_train_timesteps, generators)
        if squeeze is not None:
            mask, fraction = squeeze
            timesteps = torch.where(mask.cpu(), noisiest(timesteps, fraction, self.num_train_timesteps, True), timesteps)
        x0, noise, t = x0.to(device), noise.to(device), timesteps.to(device)
        return Noised(self.scheduler.add_noise(x0, noise, t), t, timesteps, self.target(x0, noise, t))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising target of prediction_type."""
        if self.prediction_type == "epsilon":
            return noise.clone()
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0.clone()


class FlowMatchNoise:
    """Rectified flow as diffusers' SD3 and Flux examples train it: u from the weighting scheme's density
    (compute_density_for_timestep_sampling), the index floor(u T) into the scheduler's training sigmas (shifted by
    its config), x_t = (1 - sigma) x0 + sigma noise, target noise - x0, loss weights compute_loss_weighting_for_sd3.
    The index is AGC's discrete timestep: sigma decreases as it grows."""

    def __init__(self, scheduler_config, weighting_scheme: str, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = (weighting_scheme, logit_mean,
                                                                                   logit_std, mode_scale)

    def __call__(self, x0: torch.Tensor, generators: Sequence[torch.Generator], device: torch.device,
                 squeeze: Optional[tuple[torch.Tensor, float]] = None) -> Noised:
        """`squeeze` = (mask, fraction): the masked samples' timesteps move into the noisiest fraction (noisiest)."""
        noise = per_sample_randn(x0.shape[1:], generators)
        u = torch.cat([compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean, self.logit_std,
                                                             self.mode_scale, generator=g) for g in generators])
        # u = 1 exactly (a sigmoid that rounds up in fp32, the mode density at 0) would index past the end, which
        # diffusers does not guard.
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        if squeeze is not None:
            mask, fraction = squeeze
            indices = torch.where(mask.cpu(), noisiest(indices, fraction, self.num_train_timesteps, False), indices)
        sigmas = self.scheduler.sigmas[indices].float()
        x0, noise, sigma = x0.to(device), noise.to(device), sigmas.to(device).view(-1, *[1] * (x0.dim() - 1))
        noisy = (1 - sigma) * x0 + sigma * noise
        weights = (compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).to(device)
                   if self.weighting_scheme in ("sigma_sqrt", "cosmap") else None)
        return Noised(noisy, self.scheduler.timesteps[indices].to(device), indices, noise - x0, weights)
