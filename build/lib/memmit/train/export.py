"""What output_dir holds after training: the merged pipeline, or one LoRA of the whole change (--export lora)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import MemmitConfig
from .lora import svd_lora
from .model import LiveModel
from ..families.base import DenoisingTask


def check_export(task: DenoisingTask, cfg: MemmitConfig) -> None:
    """Refuse, before training, an export the pipeline cannot load."""
    if cfg.export == "lora" and not hasattr(type(task.pipeline), "save_lora_weights"):
        raise ValueError(f"--export lora needs a pipeline that loads LoRA weights; "
                         f"{type(task.pipeline).__name__} does not")


def export_result(task: DenoisingTask, model: LiveModel, cfg: MemmitConfig, out: Path) -> None:
    denoiser = model.result()
    if cfg.export == "lora":
        export_lora(task, denoiser, model.pretrained, cfg, out)
    else:
        task.save_pipeline(denoiser, out)


def export_lora(task: DenoisingTask, denoiser: torch.nn.Module, pretrained: dict, cfg: MemmitConfig,
                out: Path) -> None:
    """One LoRA of the whole change (final - pretrained) in the target modules, by truncated SVD."""
    final = {k: v.detach().cpu() for k, v in denoiser.state_dict().items()}

    def targeted(name: str) -> bool:
        module = name.removesuffix(".weight")
        return name.endswith(".weight") and any(module == t or module.endswith("." + t)
                                                for t in cfg.lora_target_modules)

    deltas = {k: final[k].float() - pretrained[k].float() for k in final if final[k].is_floating_point()}
    lora_state, error = svd_lora({k: d for k, d in deltas.items() if targeted(k)}, cfg.export_lora_rank)
    total = sum(float(d.pow(2).sum()) for d in deltas.values())
    outside = sum(float(d.pow(2).sum()) for k, d in deltas.items() if not targeted(k))
    # Each family's save_lora_weights names its denoiser's layers: unet_lora_layers, transformer_lora_layers.
    type(task.pipeline).save_lora_weights(out, **{f"{task.denoiser_name}_lora_layers": lora_state},
                                          safe_serialization=True)
    summary = {"export_lora_rank": cfg.export_lora_rank, "relative_svd_error": error,
               "change_outside_targets": (outside / total) ** 0.5 if total > 0 else 0.0,
               "target_modules": cfg.lora_target_modules,
               "pipeline_class": type(task.pipeline).__name__}  # what loads it (the model card's usage)
    (out / "memmit" / "lora_export.json").write_text(json.dumps(summary, indent=2))
    print(f"memmit: LoRA export rank {cfg.export_lora_rank}: relative SVD error {error:.2e}; "
          f"share of the change outside {cfg.lora_target_modules}: {summary['change_outside_targets']:.2e}")
