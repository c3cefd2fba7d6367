"""The memmit loop: rounds -> shard turns -> optimizer steps with AGC -> aggregation (docs/method.md).

Each shard trainer (a process, or a group of processes training one shard data-parallel: group.py) trains the
shards k with k % trainers == its index, one after another, on one live model. Every process walks the same loop
steps: a turn slot lasts as long as the longest shard trained in it, a process whose shard is done (or that has
none) idles, so checkpoints and logs line up without asking the other processes.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import reduce
from tqdm.auto import tqdm

from ..config import MemmitConfig
from ..data.dataset import source_names
from ..data.split import Split
from ..draws import NOISE
from ..families.base import DenoisingTask
from ..forget.renders import ForgetSet, settings_of
from . import checkpoint as ckpt
from .agc import kept_sum
from .counts import SampleCounts, write_candidates
from .ensemble import shard_weights
from .group import ShardGroup
from .loader import TurnInputs, turn_inputs
from .model import LiveModel
from .shards import Shard, micro_batches_in_window, windows_per_turn
from .tracking import image_trackers, log_images, log_step, start_trackers

logger = get_logger(__name__)

# Consecutive optimizer steps with a non-finite loss after which the run stops: the weights have diverged.
NONFINITE_PATIENCE = 10


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Position:
    """Where the loop is: the next round, turn slot and window to run."""

    round: int = 0
    turn: int = 0
    window: int = 0


def remove_previous_run(out: Path) -> None:
    """--overwrite_output_dir: every file a memmit run writes goes, so none passes for (or is uploaded as) this run's."""
    index = out / "model_index.json"
    components = [k for k in json.loads(index.read_text()) if not k.startswith("_")] if index.is_file() else []
    for name in ["memmit", "checkpoints", "logs", *components]:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ["README.md", "model_index.json", "pytorch_lora_weights.safetensors"]:
        (out / name).unlink(missing_ok=True)



class Trainer:
    """Trains the shards this process holds, round by round, and aggregates them (setup.build_trainer wires it)."""

    def __init__(self, cfg: MemmitConfig, accelerator: Accelerator, group: ShardGroup, task: DenoisingTask,
                 model: LiveModel, dataset: datasets.Dataset, split: Split, content: list[str],
                 forget: Optional[ForgetSet] = None):
        self.cfg, self.accelerator, self.group, self.task, self.model = cfg, accelerator, group, task, model
        self.dataset, self.split, self.content, self.forget = dataset, split, content, forget
        self.out = Path(cfg.output_dir)
        acc = accelerator
        # One micro-batch of a shard: train_batch_size on each process of its group, as in diffusers' examples.
        self.batch_size = cfg.train_batch_size * self.group.size
        shards = self.split.shards
        self.weights = shard_weights([len(s) for s in shards], cfg.aggregation)
        trainers = self.group.trainers
        self.shards = {k: Shard(k, ids, cfg, self.task.num_train_timesteps, acc.device, self.batch_size,
                                restart_optimizer=self.model.lora)
                       for k, ids in enumerate(shards) if k % trainers == self.group.trainer}
        # Turn slot t trains shards t*T .. t*T+T-1 at once, one per shard trainer, for as long as the longest.
        self.slot_windows = [max(windows_per_turn(cfg, len(s), self.batch_size) for s in shards[t * trainers:
                                                                                                (t + 1) * trainers])
                             for t in range(math.ceil(cfg.num_shards / trainers))]
        if cfg.num_shards % trainers:
            logger.warning(f"num_shards={cfg.num_shards} is not a multiple of the {trainers} processes: "
                           f"{trainers - cfg.num_shards % trainers} process(es) idle for 1 of {len(self.slot_windows)} "
                           f"turns every round (~{100 / len(self.slot_windows):.0f}% of their time)",
                           main_process_only=True)
        self.counts = SampleCounts(len(dataset))
        self.position, self.global_step, self.last_checkpoint_step = Position(), 0, 0
        self.nonfinite_run = 0
        self.resumed_changes: Optional[dict] = None  # options changed since the checkpoint resumed, if one was

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over processes (on the accelerator: NCCL reduces nothing on the CPU)."""
        return reduce(t.to(self.accelerator.device), reduction="sum").to(t.device)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.denoiser

    def shard_at(self, turn: int) -> Optional[Shard]:
        """This process's shard in turn slot `turn` (None: it idles)."""
        return self.shards.get(turn * self.group.trainers + self.group.trainer)

    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self._write_run_files()
        start_trackers(acc, cfg)
        bar = tqdm(total=sum(self.slot_windows) * cfg.num_rounds, initial=self.global_step, desc="memmit",
                   disable=not acc.is_local_main_process)
        start = self.position
        for rnd in range(start.round, cfg.num_rounds):
            for turn in range(start.turn if rnd == start.round else 0, len(self.slot_windows)):
                resumed = (rnd, turn) == (start.round, start.turn)
                self._turn(rnd, turn, start.window if resumed else 0, bar)
            self._finish_round(rnd, bar)
        bar.close()
        totals = self.counts.totals(self._sum)
        if acc.is_main_process:
            write_candidates(self.out / "memmit" / "candidates.csv", totals, self.counts.excluded, self.split.shards,
                             source_names(self.dataset, cfg.image_column))
            if totals[2].any():
                logger.warning(f"{int(totals[2].sum())} non-finite per-sample losses were left out of the gradient "
                               "and the loss bank (column nonfinite of memmit/candidates.csv)")

    def _turn(self, rnd: int, turn: int, first_window: int, bar) -> None:
        """Slot `turn` of round `rnd`: this process's shard trains its windows from θ̄; checkpoints on the way."""
        shard = self.shard_at(turn)
        if shard is not None and first_window < shard.windows:
            if first_window == 0:
                self.model.start_turn(rnd, shard.index)
            shard.open(self.model.params, self.model.ema_average)
            inputs = self._inputs(shard, first_window)
        windows = self.slot_windows[turn]
        for w in range(first_window, windows):
            logs = None
            if shard is not None and w < shard.windows:
                logs = self._optimizer_step(shard, w, inputs)
                if w + 1 == shard.windows:
                    if self.group.leads:  # the group's members hold the same weights: one adds them
                        self.model.add_to_average(self.weights[shard.index],
                                                  shard.ema.shadow_params if shard.ema is not None else None)
                    shard.close()
            self.global_step += 1
            self.position = Position(rnd, turn, w + 1)
            bar.update(1)
            if logs is not None:
                bar.set_postfix(round=rnd, shard=shard.index, loss=f"{logs['loss']:.4f}",
                                skip=f"{100 * logs['skip_fraction']:.0f}%")
            if self.cfg.report_to != "none":  # a collective: every process takes part, or none
                leads = shard is not None and self.group.leads
                log_step(self.accelerator, shard.index if leads else None, logs if leads else None, self.global_step)
            if w + 1 < windows and self._checkpoint_due():
                self.save_checkpoint()
        self.position = Position(rnd, turn + 1, 0)
        # The round's last turn is covered by the round-end checkpoint.
        if turn + 1 < len(self.slot_windows) and self._checkpoint_due():
            self.save_checkpoint()

    def _inputs(self, shard: Shard, first_window: int):
        """This process's share of the shard's remaining micro-batches of the turn, made ahead in workers."""
        cfg = self.cfg
        count = sum(micro_batches_in_window(cfg, len(shard.ids), self.batch_size, w)
                    for w in range(first_window, shard.windows))
        batches = [b.part(self.group.rank, cfg.train_batch_size) for b in shard.stream.peek(count, self.batch_size)]
        inputs = TurnInputs(self.dataset, self.split, cfg.caption_column, self.task.inputs, batches, cfg.seed,
                            cfg.image_column)
        return turn_inputs(inputs, cfg.dataloader_num_workers, pin_memory=self.accelerator.device.type == "cuda")

    def _micro_batch(self, shard: Shard, inputs):
        """The shard's next micro-batch: this process's share through the model (`out`: its per-sample losses, or
        None for an empty share at an epoch's end) and the whole group's rows of (loss, timestep, loss weight,
        anchored), in the order one process holding the whole micro-batch would have them."""
        cfg, acc, group = self.cfg, self.accelerator, self.group
        whole = shard.stream.next_batch(self.batch_size)
        shares = [whole.part(j, cfg.train_batch_size) for j in range(group.size)]
        mine, batch, out = shares[group.rank], next(inputs), None
        local = torch.zeros((0, 4), dtype=torch.float64)
        if batch is not None:
            with acc.autocast():
                out = self.task.per_sample_loss(self.model.denoiser, batch, mine.generators(cfg.seed, NOISE), acc.device)
            weights = out.weights if out.weights is not None else torch.ones_like(out.losses)
            anchored = out.anchored if out.anchored is not None else torch.zeros(len(out.losses), dtype=torch.bool)
            # float64 (on the CPU: not every accelerator has it) holds fp32 losses, integer timesteps and flags
            # exactly: one collective for the four.
            local = torch.stack([out.losses.detach().cpu().double(), out.timesteps.double(),
                                 weights.detach().cpu().double(), anchored.double()], dim=1)
        return whole, mine, out, group.gather(local, [len(share.ids) for share in shares])

    def _optimizer_step(self, shard: Shard, window: int, inputs) -> dict:
        """One optimizer step's micro-batches with the AGC mask; the step's loss is the mean over the kept
        samples of all its micro-batches (of every process of the shard group). Returns log values."""
        cfg, acc, model, group = self.cfg, self.accelerator, self.model, self.group
        kept, seen, skipped, nonfinite, loss_sum = 0, 0, 0, 0, 0.0
        for _ in range(micro_batches_in_window(cfg, len(shard.ids), self.batch_size, window)):
            whole, mine, out, everyone = self._micro_batch(shard, inputs)
            # Every member applies the same AGC mask and bank update to the whole micro-batch: all hold one bank.
            losses, timesteps, step_weights = everyone[:, 0].float(), everyone[:, 1].long(), everyone[:, 2].float()
            # An anchored sample's loss is a distance between two predictions, not a denoising loss: AGC neither
            # banks it nor skips it (it is there to unlearn a copy, which AGC's skipping would stop).
            keep = shard.bank.step(losses, timesteps, cfg.agc_lambda, everyone[:, 3].bool())
            finite = torch.isfinite(losses)
            own = slice(group.rank * cfg.train_batch_size, group.rank * cfg.train_batch_size + len(mine.ids))
            self.counts.record(list(mine.ids), keep[own], finite[own])
            seen, nonfinite = seen + len(whole.ids), nonfinite + int((~finite).sum())
            skipped += int((~keep & finite).sum())
            # A micro-batch with a non-finite loss stays out of the gradient whole: masked or not, backpropagating
            # through that sample puts NaN (0 * NaN) into every weight's gradient.
            if keep.any() and finite.all():
                kept += int(keep.sum())
                loss_sum += float((losses * step_weights)[keep].sum())
                if keep[own].any():
                    # Summed now, divided by the window's kept count below: the gradient of the step's mean.
                    shard.scaler.scale(kept_sum(out.losses, keep[own], out.weights)).backward()
        if kept:
            group.sum_gradients(model.params)
            # A member whose shares kept nothing scaled no loss, and fp16's GradScaler sets its scale on first use.
            shard.scaler.scale(torch.zeros((), device=acc.device))
            shard.scaler.unscale_(shard.optimizer)
            for p in model.params:
                if p.grad is not None:
                    p.grad.div_(kept)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.params, cfg.max_grad_norm)
            shard.scaler.step(shard.optimizer)
            shard.scaler.update()
            if shard.ema is not None:
                shard.ema.step(model.params)
        # No kept sample: no optimizer step (the schedule still advances with the data).
        shard.optimizer.zero_grad(set_to_none=True)
        lr = shard.lr_scheduler.get_last_lr()[0]
        shard.lr_scheduler.step()
        self._watch_nonfinite(nonfinite, shard)
        return {"loss": loss_sum / kept if kept else float("nan"), "skip_fraction": skipped / seen, "lr": lr,
                "nonfinite": nonfinite}

    def _watch_nonfinite(self, nonfinite: int, shard: Shard) -> None:
        self.nonfinite_run = self.nonfinite_run + 1 if nonfinite else 0
        if self.nonfinite_run >= NONFINITE_PATIENCE:
            raise NonFiniteLossError(
                f"training stopped: {NONFINITE_PATIENCE} optimizer steps in a row had non-finite losses (shard "
                f"{shard.index}, step {self.global_step + 1}); the weights have diverged or the input holds "
                "NaN/inf. Lower --learning_rate, use --mixed_precision bf16 or no, or check the pipeline's weights")

    def _finish_round(self, rnd: int, bar) -> None:
        """θ̄ <- Σ_k w_k θ_k over every process's shards; exclusion; checkpoint; the round's sample grid."""
        self.model.finish_round(self._sum if self.accelerator.num_processes > 1 else None)
        if self.cfg.agc_exclusion is not None:
            self._exclude(rnd)
        self.position = Position(rnd + 1, 0, 0)
        self.save_checkpoint()
        self._log_samples(rnd, bar)

    def _exclude(self, rnd: int) -> None:
        """--agc_exclusion: samples AGC keeps skipping leave every later round. The split, the shard weights
        and the step budget stay as they were."""
        cfg = self.cfg
        drops, kept_whole = self.counts.exclude(rnd, self.split.shards, self.counts.totals(self._sum),
                                                cfg.agc_exclusion, cfg.agc_exclusion_min_visits)
        for k in kept_whole:
            logger.warning(f"round {rnd}: agc_exclusion would empty shard {k}; its samples stay", main_process_only=True)
        for k, ids in drops.items():
            if k in self.shards:
                self.shards[k].stream.drop(ids)
        if self.accelerator.is_main_process:
            (self.out / "memmit" / "excluded.json").write_text(json.dumps(self.counts.excluded, indent=2))

    def _log_samples(self, rnd: int, bar) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not cfg.num_validation_images or not acc.is_main_process or not image_trackers(acc):
            return
        # Sampling a large model on a CPU takes minutes: say so rather than leave the bar frozen.
        bar.write(f"memmit: round {rnd + 1} done; sampling {cfg.num_validation_images} images "
                  f"({cfg.validation_inference_steps} steps) for the logs")
        self.model.load_result()
        with self.model.eval_mode() as denoiser:
            images = self.task.sample(denoiser, cfg.num_validation_images, cfg.validation_inference_steps,
                                      torch.Generator().manual_seed(cfg.seed))
        log_images(acc, "samples", images, rnd + 1)

    def _checkpoint_due(self) -> bool:
        """checkpointing_steps loop steps since the last checkpoint; the same answer on every process."""
        n = self.cfg.checkpointing_steps
        return bool(n) and self.global_step - self.last_checkpoint_step >= n

    def _write_run_files(self) -> None:
        if not self.accelerator.is_main_process:
            return
        meta = self.out / "memmit"
        if self.cfg.overwrite_output_dir and self.resumed_changes is None:  # a new run, not a resumed one
            remove_previous_run(self.out)
        meta.mkdir(parents=True, exist_ok=True)
        # On resume the arithmetic equals the checkpoint's (checked), so this is the config the run uses.
        self.cfg.save(meta / "config.yaml")
        if self.resumed_changes:
            with open(meta / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, "changed": self.resumed_changes}) + "\n")
        (meta / "shards.json").write_text(json.dumps({str(k): s for k, s in enumerate(self.split.shards)}))
        if self.split.duplicates is not None:
            (meta / "duplicates.json").write_text(json.dumps(self.split.duplicates, indent=2))
        if self.forget is not None:
            self.forget.write(meta / "forget", settings_of(self.cfg))

    def save_checkpoint(self) -> None:
        shared, process = ckpt.run_state(self.model, self.shards, self.counts, asdict(self.position), self.global_step,
                                         self.nonfinite_run, self.split.shards, self.content, self.cfg.to_dict())
        path = ckpt.save(self.accelerator, self.out / "checkpoints", self.global_step, shared, process,
                         self.cfg.checkpoints_total_limit)
        self.last_checkpoint_step = self.global_step
        if self.accelerator.is_main_process:
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
            logger.info(f"saved {path.name}: {size:.1f} MiB (theta, the round's sum and the optimizer state of "
                        f"{len(self.split.shards)} shards); keeping the last {self.cfg.checkpoints_total_limit or 'all'}",
                        main_process_only=True)

    def resume(self, which: str) -> None:
        """Restore everything from a checkpoint, after checking it belongs to this run's settings."""
        path = ckpt.resolve(self.out / "checkpoints", which)
        if path is None:
            logger.info("no checkpoint found in %s; starting a new run", self.out / "checkpoints", main_process_only=True)
            return
        shared, process = ckpt.load(self.accelerator, path)
        if "config" not in shared:
            raise ValueError(f"checkpoint {path} was written by an older memmit, which did not record its settings; "
                             "start a new run (without --resume_from_checkpoint)")
        # resume_from_checkpoint always differs from the checkpoint's own run: no change worth recording.
        now = {k: v for k, v in self.cfg.to_dict().items() if k != "resume_from_checkpoint"}
        self.resumed_changes = ckpt.check_resume(path, shared, now,
                                                 set(self.cfg.to_dict()) - set(self.cfg.arithmetic_options()),
                                                 self.split.shards, self.content,
                                                 source_names(self.dataset, self.cfg.image_column))
        position, self.global_step, self.nonfinite_run = ckpt.restore_run(shared, process, self.model, self.shards,
                                                                          self.counts)
        self.position, self.last_checkpoint_step = Position(**position), self.global_step
        logger.info("resumed from %s at %s", path, self.position, main_process_only=True)
