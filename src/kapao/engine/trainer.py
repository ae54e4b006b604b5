"""Training: the official KAPAO recipe in one short loop, on one process or many (torchrun + DDP).

The step is linear: (warm-up) -> autocast forward -> loss -> scaled backward -> (every `accumulate`
batches) optimizer step + EMA update. Each epoch ends with OKS AP on the val split (the same
evaluator as `kapao val`), a results.csv row, and atomic `last`/`best` checkpoints; `--resume`
restores everything, so a run killed mid-epoch loses at most that epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kapao.config import load_model_config
from kapao.data.dataset import KeypointDataset, create_dataloader, split_source
from kapao.engine.ema import ModelEMA, unwrap
from kapao.engine.evaluator import model_backend, run_validation
from kapao.engine.loss import KapaoLoss
from kapao.engine.optim import accumulation_steps, build_optimizer, lr_lambda, warmup, warmup_accumulation
from kapao.errors import KapaoError
from kapao.hyp import load_hyp, scale_hyp
from kapao.io.writers import atomic_write_bytes, next_run_dir, write_image, write_json
from kapao.models.kapao import KapaoModel
from kapao.schema import KeypointSchema

LOSS_NAMES = ("box", "obj", "cls", "kps")
METRIC_NAMES = ("AP", "AP50", "AP75", "AR")
CHECKPOINT_VERSION = 1


class TrainingDiverged(KapaoError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainOptions:
    """Everything a run depends on; saved in every checkpoint so `--resume` continues the same run."""

    data: str
    cfg: str = "kapao-s"
    weights: str | None = None
    hyp: str = "hyp.kp-p6"
    imgsz: int = 1280
    batch_size: int = 16
    nominal_batch: int = 64  # gradients accumulate up to this many images per optimizer step
    epochs: int = 300
    rect: bool = False  # rectangular batches for the per-epoch validation
    multi_scale: bool = False
    freeze: int = 0
    adam: bool = False
    sync_bn: bool = False
    label_smoothing: float = 0.0
    linear_lr: bool = False
    val_scales: list[float] | None = None
    val_flips: list[int | None] | None = None
    val_imgsz: int | None = None
    noval: bool = False
    nosave: bool = False
    patience: int = 100
    workers: int = 2
    cache: str | None = None
    device: str = "cpu"
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the network (CPU AVX512-BF16 or CUDA); head and loss stay fp32
    progress: bool = True
    info: dict[str, Any] = field(default_factory=dict)  # free-form, stored with the final weights


@dataclass
class EpochLog:
    epoch: int
    losses: list[float]
    metrics: dict[str, float]
    lr: list[float]
    seconds: float


# ------------------------------------------------------------------------------------------------
# distributed helpers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, local, world)


def state_checksum(model: nn.Module) -> str:
    """md5 of the float32 bytes of every parameter: equal across ranks when DDP is in sync.
    (BatchNorm running statistics differ until DDP re-broadcasts them at the next forward.)"""
    h = hashlib.md5()
    for v in unwrap(model).parameters():
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def ranks_agree(model: nn.Module, info: DistInfo) -> bool:
    if not info.enabled:
        return True
    sums: list[Any] = [None] * info.world_size
    dist.all_gather_object(sums, state_checksum(model))
    return len(set(sums)) == 1


# ------------------------------------------------------------------------------------------------
# checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A `last.pt` written by the trainer (plain tensors and Python values only)."""
    p = Path(path)
    if not p.is_file():
        raise KapaoError(f"{p}: checkpoint to resume from not found; pass runs/train/expN/weights/last.pt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which and why, in one line
        raise KapaoError(f"{p}: not a kapao training checkpoint ({type(e).__name__}); resume from weights/last.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "kapao-train":
        raise KapaoError(f"{p}: not a kapao training checkpoint; resume from a run's weights/last.pt")
    return ckpt


def find_last_checkpoint(project: str | Path = "runs/train") -> Path:
    runs = sorted(Path(project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise KapaoError(f"{project}: no run with weights/last.pt to resume; pass the checkpoint path")
    return runs[-1]


# ------------------------------------------------------------------------------------------------
# model initialisation


def transfer_weights(model: KapaoModel, state: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Copy the tensors whose name and shape match; returns (copied, skipped names)."""
    own = model.state_dict()
    copied = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in copied) + sorted(k for k in own if k not in state)
    model.load_state_dict(copied, strict=False)
    return len(copied), skipped


def freeze_layers(model: KapaoModel, n: int) -> list[str]:
    """Freeze the first `n` layers (backbone transfer learning); returns the frozen parameter names."""
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith("layers.") and int(name.split(".")[1]) < n:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


# ------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, opt: TrainOptions, resume: str | Path | bool | None = None):
        self.resume_ckpt: dict[str, Any] | None = None
        if resume:
            path = find_last_checkpoint(opt.project) if resume is True else Path(resume)
            self.resume_ckpt = load_training_checkpoint(path)
            saved = TrainOptions(**self.resume_ckpt["options"])
            saved.progress = opt.progress
            opt = saved
            self.run_dir_hint: Path | None = path.parent.parent
        else:
            self.run_dir_hint = None
        self.opt = opt
        self.dist = init_distributed(opt.device)
        self._validate_options()
        self.device = self._device()
        self._seed(opt.seed + self.dist.rank)
        self.run_dir = self._make_run_dir()
        self.weights_dir = self.run_dir / "weights"

    # -- setup ------------------------------------------------------------------------------------

    def _validate_options(self) -> None:
        o = self.opt
        if o.epochs < 1:
            raise KapaoError(f"--epochs is {o.epochs}; train for at least 1 epoch")
        if o.batch_size < 1 or o.batch_size % self.dist.world_size:
            raise KapaoError(f"--batch-size {o.batch_size} must be a positive multiple of the {self.dist.world_size} processes")
        if o.nominal_batch < 1:
            raise KapaoError(f"--nominal-batch {o.nominal_batch} must be >= 1 (the official recipe uses 64)")
        if o.imgsz < 64 or o.imgsz % 64:
            raise KapaoError(f"--imgsz {o.imgsz} must be a multiple of 64 (the largest stride), e.g. 640")
        if o.cache not in (None, "ram"):
            raise KapaoError(f"--cache {o.cache!r}: use 'ram' (decoded, resized images kept in memory) or leave it out")

    def _device(self) -> torch.device:
        d = self.opt.device
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise KapaoError(f"--device {d}: CUDA is not available on this machine; use --device cpu")
            if self.dist.enabled:
                d = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(torch.device(d))
        elif d != "cpu":
            raise KapaoError(f"--device {d!r}: use cpu or cuda[:N]")
        return torch.device(d)

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _make_run_dir(self) -> Path:
        if self.run_dir_hint is not None:
            return self.run_dir_hint
        path = [None]
        if self.dist.is_main:
            path[0] = str(next_run_dir(self.opt.project, self.opt.name, self.opt.exist_ok))
        if self.dist.enabled:
            dist.broadcast_object_list(path, src=0)
        return Path(path[0])

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    def _build_data(self) -> None:
        o = self.opt
        src = split_source(o.data, "train")
        self.schema: KeypointSchema = src.schema
        self.train_set = KeypointDataset(
            src.annotations, src.schema, o.imgsz, images_dir=src.images, augment=True, hyp=self.hyp_raw,
            cache=o.cache, seed=o.seed,
        )
        if len(self.train_set) == 0:
            raise KapaoError(f"{src.annotations}: the training split has no usable images; see the annotation summary")
        per_rank = o.batch_size // self.dist.world_size
        if len(self.train_set) < o.batch_size:
            raise KapaoError(
                f"--batch-size {o.batch_size} is larger than the {len(self.train_set)} training images of {o.data}; "
                "use a smaller batch"
            )
        self.sampler = (
            torch.utils.data.distributed.DistributedSampler(self.train_set, shuffle=True, seed=o.seed)
            if self.dist.enabled else None
        )
        self.train_loader = create_dataloader(self.train_set, per_rank, o.workers, shuffle=True, sampler=self.sampler)
        self.val_set = None
        if not o.noval and self.dist.is_main:
            vsrc = split_source(o.data, "val")
            self.val_set = KeypointDataset(
                vsrc.annotations, vsrc.schema, o.val_imgsz or o.imgsz, images_dir=vsrc.images, augment=False,
                rect=o.rect, batch_size=per_rank * 2,
            )

    def _build_model(self) -> None:
        o = self.opt
        cfg = load_model_config(o.cfg)
        model = KapaoModel(cfg, self.schema)
        if o.weights and self.resume_ckpt is None:
            from kapao import weights as weights_lib

            init, meta = weights_lib.load(o.weights, schema=self.schema if o.weights.endswith(".pt") else None)
            if init.schema.num_keypoints != self.schema.num_keypoints:
                raise KapaoError(
                    f"{o.weights}: init weights are for {init.schema.num_keypoints} keypoints, {o.data} has "
                    f"{self.schema.num_keypoints}; the head would not fit (start without --weights or use matching weights)"
                )
            n, skipped = transfer_weights(model, init.state_dict())
            self._log(f"init weights {o.weights}: {n} tensors copied, {len(skipped)} skipped (name or shape differs)")
            for name in skipped[:10]:
                self._log(f"  skipped {name}")
        # as the official train.py: round the initial weights to fp16 once
        model.half().float()
        frozen = freeze_layers(model, o.freeze)
        if frozen:
            self._log(f"froze {len(frozen)} parameter tensors of the first {o.freeze} layers")
        self.model = model.to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions are ~15 % faster on NHWC tensors, forward and backward
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and o.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def setup(self) -> None:
        o = self.opt
        hyp = load_hyp(o.hyp)
        self.hyp_raw = hyp
        self._build_data()
        self._build_model()
        core = unwrap(self.model)
        self.hyp = scale_hyp(hyp, core.head.nl, core.head.nc, o.imgsz, o.label_smoothing)
        self.accumulate = accumulation_steps(o.batch_size, o.nominal_batch)
        weight_decay = self.hyp.weight_decay * o.batch_size * self.accumulate / o.nominal_batch
        self.optimizer = build_optimizer(self.model, self.hyp.lr0, self.hyp.momentum, weight_decay, o.adam)
        self.lf = lr_lambda(o.epochs, self.hyp.lrf, o.linear_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.ema = ModelEMA(self.model) if self.dist.is_main else None
        self.loss_fn = KapaoLoss(core, self.hyp)
        # AMP as the official recipe on CUDA (fp16 + loss scaling); --bf16 needs no scaler
        self.amp = self.device.type == "cuda" and not o.bf16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.autocast_dtype = torch.bfloat16 if o.bf16 else torch.float16
        if o.bf16 and self.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            self._log("warning: this CPU has no native bf16; --bf16 will be slower than fp32")
        self.start_epoch, self.best_fitness, self.stale_epochs = 0, -1.0, 0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        if self.dist.enabled:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_fitness = float(ckpt["best_fitness"])
        self.stale_epochs = int(ckpt.get("stale_epochs", 0))
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        if self.start_epoch >= self.opt.epochs:
            raise KapaoError(f"{self.run_dir}: this run already finished its {self.opt.epochs} epochs; nothing to resume")
        self._log(f"resuming {self.run_dir} from epoch {self.start_epoch} (best AP {self.best_fitness:.4f})")

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> list[EpochLog]:
        self.setup()
        o = self.opt
        if self.dist.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.weights_dir.glob(".*tmp*"):  # temp files of a run killed while saving
                stale.unlink(missing_ok=True)
            write_json(self.run_dir / "options.json", asdict(o), indent=2)
            if self.start_epoch == 0:
                self._plot_train_batches()
        writer = self._tensorboard()
        nb = len(self.train_loader)
        warmup_iters = max(round(self.hyp.warmup_epochs * nb), 100) if self.hyp.warmup_epochs > 0 else 0
        history: list[EpochLog] = []
        last_step = -1
        self.optimizer.zero_grad()
        for epoch in range(self.start_epoch, o.epochs):
            t0 = time.perf_counter()
            self.model.train()
            self.train_set.set_epoch(epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            mean_losses = torch.zeros(4)
            bar = tqdm(self.train_loader, total=nb, disable=not (o.progress and self.dist.is_main),
                       desc=f"epoch {epoch + 1}/{o.epochs}", unit="batch")
            for i, (imgs, targets, _paths, _) in enumerate(bar):
                ni = i + nb * epoch
                imgs = imgs.to(self.device, non_blocking=True).float() / 255.0
                if self.device.type == "cpu":
                    imgs = imgs.contiguous(memory_format=torch.channels_last)
                accumulate = self.accumulate
                if ni < warmup_iters:
                    accumulate = warmup_accumulation(ni, warmup_iters, o.batch_size, o.nominal_batch)
                    warmup(self.optimizer, ni, warmup_iters, self.lf(epoch), self.hyp.momentum,
                           self.hyp.warmup_momentum, self.hyp.warmup_bias_lr)
                if o.multi_scale:
                    imgs = self._random_scale(imgs)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.amp or o.bf16):
                    preds = self.model(imgs)
                loss, items = self.loss_fn(preds, targets.to(self.device))  # fp32 (it casts the logits)
                if self.dist.enabled:
                    loss = loss * self.dist.world_size  # DDP averages gradients across processes
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, batch {i}; training stopped, "
                        f"the last good checkpoint is {self.weights_dir / 'last.pt'} (lower lr0 or check the labels)"
                    )
                self.scaler.scale(loss).backward()
                if ni - last_step >= accumulate:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad()
                    if self.ema is not None:
                        self.ema.update(self.model)
                    if last_step < 0 and self.dist.enabled:
                        self._record_ddp_sync("after_first_step")
                    last_step = ni
                mean_losses = (mean_losses * i + items.detach().cpu()) / (i + 1)
                if self.dist.is_main:
                    bar.set_postfix({n: f"{v:.4f}" for n, v in zip(LOSS_NAMES, mean_losses.tolist())} | {"img": imgs.shape[-1]})
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step()
            log = self._end_epoch(epoch, mean_losses.tolist(), lrs, time.perf_counter() - t0, writer)
            if log is not None:
                history.append(log)
            stop = [self.stale_epochs >= o.patience]
            if self.dist.enabled:
                dist.broadcast_object_list(stop, src=0)
            if stop[0]:
                self._log(f"early stop: no AP improvement for {o.patience} epochs")
                break
        if self.dist.enabled:
            self._record_ddp_sync("at_end")
        if self.dist.is_main:
            self._finish(history)
        if writer is not None:
            writer.close()
        return history

    def _random_scale(self, imgs: torch.Tensor) -> torch.Tensor:
        stride = unwrap(self.model).max_stride
        size = random.randrange(int(self.opt.imgsz * 0.5), int(self.opt.imgsz * 1.5) + stride) // stride * stride
        factor = size / max(imgs.shape[2:])
        if factor == 1:
            return imgs
        shape = [math.ceil(x * factor / stride) * stride for x in imgs.shape[2:]]
        return F.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)

    def _record_ddp_sync(self, when: str) -> None:
        agree = ranks_agree(self.model, self.dist)
        if self.dist.is_main:
            path = self.run_dir / "ddp.json"
            state = json.loads(path.read_text()) if path.is_file() else {"world_size": self.dist.world_size}
            state[f"ranks_agree_{when}"] = agree
            write_json(path, state, indent=2)
            if not agree:
                raise KapaoError(f"DDP ranks hold different weights {when.replace('_', ' ')}; this is a bug, please report it")

    # -- end of epoch: val, logs, checkpoints (rank 0) --------------------------------------------

    def _end_epoch(self, epoch: int, losses: list[float], lrs: list[float], seconds: float, writer: Any) -> EpochLog | None:
        if not self.dist.is_main:
            return None
        o = self.opt
        assert self.ema is not None
        metrics: dict[str, float] = {}
        if self.val_set is not None:
            result = run_validation(
                model_backend(self.ema.ema), self.val_set, "val", batch_size=self.val_set.batch_size,
                scales=o.val_scales, flips=o.val_flips, progress=False,
            )
            assert result.metrics is not None
            metrics = {n: float(result.metrics.stats[n]) for n in METRIC_NAMES}
        if self.val_set is None:  # --noval: the latest weights are the best we know of
            improved, self.stale_epochs = True, 0
        else:
            improved = metrics["AP"] > self.best_fitness
            if improved:
                self.best_fitness, self.stale_epochs = metrics["AP"], 0
            else:
                self.stale_epochs += 1
        log = EpochLog(epoch, losses, metrics, lrs, seconds)
        self._append_csv(log)
        if writer is not None:
            for n, v in zip(LOSS_NAMES, losses):
                writer.add_scalar(f"train/{n}_loss", v, epoch)
            for n, v in metrics.items():
                writer.add_scalar(f"metrics/{n}", v, epoch)
            for j, lr in enumerate(lrs):
                writer.add_scalar(f"lr/pg{j}", lr, epoch)
        summary = " ".join(f"{n} {v:.4f}" for n, v in zip(LOSS_NAMES, losses))
        if metrics:
            summary += " | " + " ".join(f"{n} {v:.4f}" for n, v in metrics.items())
        self._log(f"epoch {epoch + 1}/{o.epochs} ({seconds:.0f} s): {summary}")
        if not o.nosave or epoch == o.epochs - 1:
            self._save(epoch, improved)
        return log

    def _append_csv(self, log: EpochLog) -> None:
        path = self.run_dir / "results.csv"
        header = ["epoch", *(f"train/{n}" for n in LOSS_NAMES), *(f"val/{n}" for n in METRIC_NAMES),
                  *(f"lr/pg{j}" for j in range(len(log.lr))), "seconds"]
        rows = list(csv.reader(path.open())) if path.is_file() else [header]
        # a resumed epoch replaces the row it left behind
        rows = [r for r in rows if r[0] == "epoch" or int(r[0]) != log.epoch]
        rows.append([str(log.epoch), *(f"{v:.6g}" for v in log.losses),
                     *(f"{log.metrics.get(n, float('nan')):.6g}" for n in METRIC_NAMES),
                     *(f"{v:.6g}" for v in log.lr), f"{log.seconds:.1f}"])
        text = "\n".join(",".join(r) for r in rows) + "\n"
        atomic_write_bytes(path, text.encode())

    def _save(self, epoch: int, improved: bool) -> None:
        from kapao import weights as weights_lib

        assert self.ema is not None
        ckpt = {
            "format": "kapao-train",
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "best_fitness": self.best_fitness,
            "stale_epochs": self.stale_epochs,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "options": asdict(self.opt),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())},
        }
        _atomic_torch_save(ckpt, self.weights_dir / "last.pt")
        info = self._weights_info(epoch)
        weights_lib.save(self.ema.ema, self.weights_dir / "last.safetensors", info=info)
        if improved:
            weights_lib.save(self.ema.ema, self.weights_dir / "best.safetensors", info=info)

    def _weights_info(self, epoch: int) -> dict[str, Any]:
        o = self.opt
        return {
            "epoch": epoch,
            "best_ap": self.best_fitness,
            "recipe": {k: v for k, v in asdict(o).items() if k not in ("progress", "info")},
            **o.info,
        }

    def _finish(self, history: list[EpochLog]) -> None:
        self._plot_results()
        self._log(f"results in {self.run_dir} (best AP {self.best_fitness:.4f})")

    def _plot_results(self) -> None:
        path = self.run_dir / "results.csv"
        if not path.is_file():
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._log("matplotlib is not installed: results.png skipped (pip install kapao[train])")
            return
        rows = list(csv.DictReader(path.open()))
        epochs = [int(r["epoch"]) + 1 for r in rows]
        cols = [c for c in rows[0] if c.startswith(("train/", "val/"))]
        fig, axes = plt.subplots(2, 4, figsize=(14, 6))
        for ax, col in zip(axes.ravel(), cols):
            ax.plot(epochs, [float(r[col]) for r in rows], marker=".")
            ax.set_title(col)
            ax.set_xlabel("epoch")
        fig.tight_layout()
        tmp = self.run_dir / ".results.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.run_dir / "results.png")

    def _plot_train_batches(self, n: int = 16) -> None:
        """A labelled mosaic of augmented training samples (like YOLOv5's train_batch.jpg)."""
        from kapao.viz import draw_labels, make_grid

        tiles, names = [], []
        for i in range(min(n, len(self.train_set))):
            img, labels, path, _ = self.train_set[i]
            bgr = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[:, :, ::-1])
            tiles.append(draw_labels(bgr, labels[:, 1:].numpy(), self.schema))
            names.append(Path(path).name)
        write_image(self.run_dir / "train_batch.jpg", make_grid(tiles, names))

    def _tensorboard(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._log("tensorboard is not installed: TensorBoard logs skipped (pip install kapao[train])")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def train(opt: TrainOptions, resume: str | Path | bool | None = None) -> tuple[Path, list[EpochLog]]:
    """Run training; returns the run folder and the per-epoch logs (rank 0)."""
    trainer = Trainer(opt, resume)
    try:
        history = trainer.train()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return trainer.run_dir, history


def parse_flips(values: Sequence[int] | None) -> list[int | None] | None:
    return None if values is None else [None if v == -1 else int(v) for v in values]
