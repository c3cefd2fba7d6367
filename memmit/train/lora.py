"""LoRA shards with exact aggregation, and the LoRA export by truncated SVD.

Averaging each shard's A and B separately is not the average of the products B·A, so a LoRA shard
is folded in as merged weights: θ̄ + scale·B_k·A_k enters the accumulator with w_k, and since the
w_k sum to 1 the new θ̄ is θ̄ + Σ w_k·scale·B_k·A_k, exactly. Adapters then restart from zero.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

ADAPTER = "default"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float,
             target_modules: list[str]) -> None:
    """Freeze the denoiser and inject one trainable adapter (peft) into the target modules."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=target_modules,
                        init_lora_weights=True)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft's "Target modules ... not found"
        raise ValueError(f"lora_target_modules {target_modules} match no module of the {type(model).__name__}: {exc}") from exc


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def is_lora_key(name: str) -> bool:
    return "lora_" in name


@torch.no_grad()
def reset_adapters(model: torch.nn.Module, seed: int) -> None:
    """Fresh adapters (A random, B zero: the product starts at 0), seeded so a run is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in lora_layers(model):
            layer.reset_lora_parameters(ADAPTER, True)


@torch.no_grad()
def merge_adapters(model: torch.nn.Module) -> None:
    """Base weights += scale·B·A in place (the adapters stay, inactive until unmerged)."""
    for layer in lora_layers(model):
        layer.merge(adapter_names=[ADAPTER])


@torch.no_grad()
def unmerge_adapters(model: torch.nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def add_merged(average, model: torch.nn.Module, base: list[torch.Tensor], weight: float) -> None:
    """accumulator += weight·(θ̄ + scale·B·A): the shard's adapters merged for the add, then unmerged."""
    merge_adapters(model)
    average.add(base, weight)
    unmerge_adapters(model)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The denoiser's weights under their original names, adapters left out (for saving a plain one)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if not is_lora_key(k)}


def svd_lora(deltas: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """One LoRA (scale 1) per weight change by truncated SVD: a linear layer's [out, in], or a convolution's
    [out, in, kh, kw] as [out, in·kh·kw] (peft's conv LoRA: A a [r, in, kh, kw] convolution, B a 1x1 one); returns
    peft-style keys and the relative Frobenius error ||Δ - B·A|| / ||Δ|| over all changes."""
    state, err2, norm2 = {}, 0.0, 0.0
    for name, delta in deltas.items():
        if delta.dim() not in (2, 4):
            raise ValueError(f"LoRA export handles linear and convolution layers; {name} has shape "
                             f"{tuple(delta.shape)}")
        matrix = delta.double().flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        prefix = name.removesuffix(".weight")
        state[f"{prefix}.lora_A.weight"] = a.float().reshape(r, *delta.shape[1:]).contiguous()
        state[f"{prefix}.lora_B.weight"] = b.float().reshape(delta.shape[0], r, *[1] * (delta.dim() - 2)).contiguous()
        err2 += float((matrix - b @ a).pow(2).sum())
        norm2 += float(matrix.pow(2).sum())
    return state, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0
