"""The model card of a memmit output: Hub metadata (ModelCardData, with the evaluation results) and a body that says
what was done (the method's settings), what was measured before and after, how to load the result and what to
cite."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .config import SECRET_OPTIONS

TAGS = ["diffusers", "diffusers-training", "memorization-mitigation", "iet-agc"]
COMPARE_FIGURE = "memmit/eval/compare.png"  # written by --evaluate; the card shows it when present
FORGET_VERIFICATION = "memmit/forget/verify.json"  # written by --evaluate in forget mode; the card shows its table
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
CITATION = """\
@inproceedings{liu2024iterative,
  title     = {Iterative Ensemble Training with Anti-Gradient Control for Mitigating Memorization in Diffusion Models},
  author    = {Liu, Xiao and Guan, Xiaoliu and Wu, Yu and Miao, Jiaxu},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  eprint    = {2407.15328},
  archivePrefix = {arXiv}
}"""


def default_repo_id(output_dir: str | Path) -> str:
    return os.path.basename(os.path.abspath(output_dir))


def _hub_id(name: Optional[str]) -> Optional[str]:
    """`name` when it names a Hub repo, None for a local path (Hub metadata only accepts repo ids)."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name


def _describe_source(name: Optional[str], kind: str) -> str:
    if name is None:
        return f"an unnamed {kind}"
    if _hub_id(name):
        prefix = "datasets/" if kind == "dataset" else ""
        return f"[{name}](https://huggingface.co/{prefix}{name})"
    return f"a local {kind} (`{Path(name).name}`)"  # the full path is private to the training machine


def _generation_task(cfg: dict) -> str:
    return "text-to-image" if cfg.get("caption_column") else "unconditional-image-generation"


def _method_lines(cfg: dict) -> list[str]:
    local = (f"{cfg['local_steps']} optimizer steps" if cfg.get("local_steps")
             else f"{cfg['local_epochs']} epoch(s)")
    lam = cfg["agc_lambda"]
    agc = ("off (λ = 0)" if lam == 0 else
           f"λ = {'the task default' if lam is None else lam}: a sample is skipped when its loss falls below "
           f"λ × the per-timestep loss bank (bank decay β = {cfg['agc_bank_decay']}"
           + (f", {cfg['agc_bank_bins']} bins of timesteps)" if cfg.get("agc_bank_bins") else ")"))
    if lam != 0 and cfg.get("agc_exclusion"):
        agc += (f"; a sample skipped in at least {cfg['agc_exclusion']:.0%} of its visits (after "
                f"{cfg['agc_exclusion_min_visits']}) is left out of later rounds (`memmit/excluded.json`)")
    weights = (f"LoRA of rank {cfg['lora_rank']} per shard" if cfg.get("lora_rank")
               else "full fine-tuning of the denoiser")
    iet = (f"off: one model on all the data (K = 1, memmit's default), {cfg['num_rounds']} rounds of {local}"
           if cfg["num_shards"] == 1 else
           f"K = {cfg['num_shards']} disjoint shards ({cfg['shard_strategy']} split), {cfg['num_rounds']} rounds; "
           f"each round every shard's model trains for {local} on its own shard, then the shard models are "
           f"averaged ({cfg['aggregation']} weights)")
    return [
        f"- **Iterative Ensemble Training**: {iet}.",
        f"- **Anti-Gradient Control**: {agc}.",
        (_forget_text(cfg) if cfg.get("forget_prompts") else
         f"- **Near-duplicate training images**: {DEDUP_TEXT.get(cfg.get('dedup', 'none'), cfg.get('dedup'))}."),
        f"- **Optimisation**: {weights}; AdamW, learning rate {cfg['learning_rate']} ({cfg['lr_scheduler']}), "
        f"batch {cfg['train_batch_size']} × {cfg['gradient_accumulation_steps']} accumulation, "
        f"mixed precision {cfg['mixed_precision']}, EMA {'on' if cfg.get('use_ema') else 'off'}, seed {cfg['seed']}.",
    ]


def _forget_text(cfg: dict) -> str:
    kept = ("held to the input model's predictions (distilled)" if cfg.get("retain_distill")
            else "trained as they are")
    return ("- **Forget mode**: no training image; the pipeline's renders of the prompts it reproduces trained towards "
            f"anchor prompts, its renders of the anchors and other prompts {kept} (`memmit/forget/forget.json` lists "
            "the prompts, the anchors and the reproductions).")


DEDUP_TEXT = {"none": "not handled (the paper's method)",
              "keep_one": "found before training and trained on once (`memmit/duplicates.json` lists them)",
              "same_shard": "found before training; all copies of one image in the same shard"}


def _memorized_label(report: dict) -> str:
    clusters = report["pixel"].get("clusters")  # reports before near-duplicate families lack it
    family = (f", d2 outside the near-duplicate family ({clusters['detector']['features']} < "
              f"{clusters['detector']['threshold']:g})" if clusters else "")
    return f"memorized fraction (d1/d2 < {report['pixel']['threshold']:.3g}{family})"


def _frechet_label(report: dict) -> str:
    return f"Frechet distance ({report['quality']['extractor']['kind']})"


def _eval_results(reports: dict[str, dict], dataset: Optional[str], task: str) -> list[EvalResult]:
    ds_type = _hub_id(dataset) or (Path(dataset).name if dataset else "training-set")
    common = dict(task_type=task, dataset_type=ds_type, dataset_name=f"{ds_type} (training images)")
    results = []
    for label, r in reports.items():
        results.append(EvalResult(**common, metric_type="memorized_fraction",
                                  metric_value=r["pixel"]["fraction_memorized_ratio"],
                                  metric_name=f"{_memorized_label(r)}, {label}"))
        if r["quality"].get("available"):
            results.append(EvalResult(**common, metric_type="frechet_distance",
                                      metric_value=r["quality"]["frechet_distance"],
                                      metric_name=f"{_frechet_label(r)}, {label}"))
    return results


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _results_table(reports: dict[str, dict]) -> list[str]:
    first = next(iter(reports.values()))
    rows = [(_memorized_label(first), lambda r: _pct(r["pixel"]["fraction_memorized_ratio"])),
            # "0.5": the neighbourhood-score threshold `memmit compare` shows too
            ("neighbourhood score < 0.5", lambda r: _pct(r["pixel"]["fraction_memorized_by_score"].get("0.5"))),
            (_frechet_label(first),
             lambda r: f"{r['quality']['frechet_distance']:.3f}" if r["quality"].get("available") else "-"),
            ("samples scored", lambda r: str(r["pixel"]["num_samples"]))]
    lines = ["| | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in reports.values()) + " |" for name, cell in rows]
    return lines


def _public_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in SECRET_OPTIONS}


def _eval_data_line(reports: dict[str, dict], dataset: Optional[str]) -> str:
    """What the reports measured: on which images, with how many samples."""
    first = next(iter(reports.values()))
    pixel, settings = first["pixel"], first.get("settings", {})
    # Reports from before the sampler was recorded were all DDIM's.
    steps = (f", {settings['num_inference_steps']} {settings.get('sampler', 'DDIM')} steps"
             if "num_inference_steps" in settings else "")
    seed = f", seed {settings['seed']}" if "seed" in settings else ""
    prompts = ", prompts drawn from the training captions" if settings.get("caption_column") else ""
    # Hand-made or older reports may lack the training set's counts.
    train = (f"{pixel['num_train']} training images ({pixel['num_distinct_train']} distinct)"
             if "num_distinct_train" in pixel else "training images")
    return (f"Each pipeline drew {pixel['num_samples']} samples{steps}{seed}{prompts}, compared with the {train} "
            f"of {_describe_source(dataset, 'dataset')}.")


def _pipeline_class(out: Path) -> str:
    """The output's pipeline class: model_index.json's, or the LoRA export's record of the base pipeline's."""
    for name, key in [("model_index.json", "_class_name"), ("memmit/lora_export.json", "pipeline_class")]:
        if (out / name).is_file():
            return json.loads((out / name).read_text()).get(key) or "DiffusionPipeline"
    return "DiffusionPipeline"


def _usage_lines(cfg: dict, base_model: Optional[str], repo_id: str, pipeline_class: str) -> list[str]:
    """How to load the result with its own pipeline class and render one image (from a prompt, text-to-image)."""
    if cfg.get("export") == "lora":  # a LoRA of the whole change, applied to the original pipeline
        load = [f'pipe = {pipeline_class}.from_pretrained("{_hub_id(base_model) or "BASE_MODEL"}")',
                f'pipe.load_lora_weights("{repo_id}")']
    else:
        load = [f'pipe = {pipeline_class}.from_pretrained("{repo_id}")']
    prompt = json.dumps((cfg.get("validation_prompts") or ["A PROMPT"])[0]) if cfg.get("caption_column") else ""
    return ["```python", f"from diffusers import {pipeline_class}", "", *load, f"image = pipe({prompt}).images[0]",
            "```"]


def _card_body(cfg: dict, base_model: Optional[str], dataset: Optional[str],
               reports: Optional[dict[str, dict]], repo_id: str, figure: bool = False,
               pipeline_class: str = "DiffusionPipeline", verification: Optional[dict] = None) -> str:
    trained_on = ("its own renders of prompts it reproduced" if cfg.get("forget_prompts")
                  else _describe_source(dataset, "dataset"))
    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        f"{_describe_source(base_model, 'pipeline')} fine-tuned on {trained_on} with "
        "memmit, which mitigates memorization of training images by [Iterative Ensemble Training and "
        "Anti-Gradient Control](https://arxiv.org/abs/2407.15328) (IET + AGC).", "",
        "## What memmit did", "", *_method_lines(cfg), "",
    ]
    if reports:
        lines += ["## Memorization before and after", "",
                  "Samples from each pipeline compared with the training images by `memmit eval` "
                  "(a sample counts as memorized when its nearest training image is much closer than the "
                  "second nearest).", "", _eval_data_line(reports, dataset), "", *_results_table(reports), ""]
        if figure:
            lines += [f"![memorized samples, {' and '.join(reports)}]({COMPARE_FIGURE})", ""]
    if verification:
        lines += ["## Forget prompts before and after", "",
                  f"Renders of the {len(verification['prompts'])} reproducing forget prompts, "
                  f"{verification['settings']['samples']} each from seeds the run did not render, by the input and "
                  "the mitigated pipeline; a render reproduces when it lies within the near-duplicate threshold of "
                  "one of the prompt's references (`memmit/forget/verify.json`).", "",
                  "| prompts | reproducing, before | after |", "|---|---|---|",
                  *[f"| {kind} | {row['before']:.1%} | {row['after']:.1%} |"
                    for kind, row in verification["summary"].items()], ""]
        kept = verification["retained"]
        if kept["mean_pixel_change"] is not None:
            from .forget.verify import quality_text  # torch and diffusers: imported for a forget run's card only

            quality = quality_text(kept)
            lines += [f"The {len(kept['prompts'])} retained prompts' renders changed by "
                      f"{kept['mean_pixel_change']:.3f} RMS (pixels in [-1, 1]) for the same seeds"
                      + (f"; their {quality}." if quality else "."), ""]
    lines += ["## How to use", "", *_usage_lines(cfg, base_model, repo_id, pipeline_class), "",
              "## Training configuration", "", "<details>", "", "```yaml",
              yaml.safe_dump(_public_config(cfg), sort_keys=False).rstrip(), "```", "", "</details>", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path, cfg_dict: dict, base_model: Optional[str], dataset: Optional[str],
                     eval_reports: Optional[dict[str, dict]] = None, repo_id: Optional[str] = None) -> Path:
    """Write output_dir/README.md: Hub metadata (ModelCardData) and a body describing the run.

    `eval_reports` maps a label ("before", "after") to a `memmit eval` report.json dict; `repo_id`
    (default: the output dir's name) is what the loading example shows.
    """
    repo_id = repo_id or default_repo_id(output_dir)
    task = _generation_task(cfg_dict)
    data = ModelCardData(
        base_model=_hub_id(base_model), library_name="diffusers", tags=[*TAGS, task], pipeline_tag=task,
        datasets=[d] if (d := _hub_id(dataset)) else None,
        model_name=repo_id.split("/")[-1] if eval_reports else None,
        eval_results=_eval_results(eval_reports, dataset, task) if eval_reports else None,
    )
    figure = bool(eval_reports) and (Path(output_dir) / COMPARE_FIGURE).is_file()
    verified = Path(output_dir) / FORGET_VERIFICATION
    body = _card_body(cfg_dict, base_model, dataset, eval_reports, repo_id, figure, _pipeline_class(Path(output_dir)),
                      json.loads(verified.read_text()) if verified.is_file() else None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path
