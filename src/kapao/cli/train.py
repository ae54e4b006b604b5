"""`kapao train`: train KAPAO on a COCO-format keypoint dataset (one process, or many via torchrun)."""

from __future__ import annotations

import argparse

from kapao.errors import KapaoError, require_torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; `torchrun --nproc_per_node N -m kapao train ...` for DDP")
    p.add_argument("--data", required=False, help="data YAML with train/val images and annotations")
    p.add_argument("--cfg", default="kapao-s", help="model config: kapao-n/s/m/l or a YAML path")
    p.add_argument("--weights", default=None, help="initial weights (kapao .safetensors, official .pt or registry name)")
    p.add_argument("--hyp", default="hyp.kp-p6", help="hyperparameter YAML (hyp.kp-p6, hyp.kp or a path)")
    p.add_argument("--imgsz", type=int, default=1280)
    p.add_argument("--batch-size", type=int, default=16, help="total batch size over all processes")
    p.add_argument("--nominal-batch", type=int, default=64, help="images per optimizer step (gradient accumulation)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--rect", action="store_true", help="rectangular batches for the per-epoch validation")
    p.add_argument("--multi-scale", action="store_true", help="vary the image size +/- 50%% per batch")
    p.add_argument("--freeze", type=int, default=0, help="freeze the first N layers")
    p.add_argument("--adam", action="store_true", help="Adam instead of SGD")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across DDP processes")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--linear-lr", action="store_true", help="linear instead of one-cycle LR")
    p.add_argument("--val-scales", type=float, nargs="+", default=None, help="TTA scales for validation")
    p.add_argument("--val-flips", type=int, nargs="+", default=None, help="TTA flips for validation (-1 none, 3 lr)")
    p.add_argument("--val-imgsz", type=int, default=None, help="validation size (default: --imgsz)")
    p.add_argument("--noval", action="store_true", help="no validation until the end")
    p.add_argument("--nosave", action="store_true", help="save only the final checkpoint")
    p.add_argument("--patience", type=int, default=100, help="stop after N epochs without AP improvement")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers per process")
    p.add_argument("--cache", default=None, choices=["ram"], help="keep decoded, resized images in memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--project", default="runs/train")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the network (about 1.5x faster on CPUs with AVX512-BF16; head and loss fp32)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="resume the latest run (or the given weights/last.pt) with its own options")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    require_torch("kapao train")
    from kapao.engine.trainer import TrainOptions, parse_flips, train

    if not args.data and not args.resume:
        raise KapaoError("--data is required (a data YAML; `kapao synth OUT` makes a small one)")
    opt = TrainOptions(
        data=args.data or "", cfg=args.cfg, weights=args.weights, hyp=args.hyp, imgsz=args.imgsz,
        batch_size=args.batch_size, nominal_batch=args.nominal_batch, epochs=args.epochs, rect=args.rect, multi_scale=args.multi_scale,
        freeze=args.freeze, adam=args.adam, sync_bn=args.sync_bn, label_smoothing=args.label_smoothing,
        linear_lr=args.linear_lr, val_scales=args.val_scales, val_flips=parse_flips(args.val_flips),
        val_imgsz=args.val_imgsz, noval=args.noval, nosave=args.nosave, patience=args.patience,
        workers=args.workers, cache=args.cache, device=args.device, project=args.project, name=args.name,
        exist_ok=args.exist_ok, seed=args.seed, bf16=args.bf16, progress=not args.quiet,
    )
    run_dir, history = train(opt, resume=args.resume)
    return 0
