"""Train kapao-n from scratch on synthetic scenes on this CPU and print the OKS AP curve.

    python benchmarks/train_synthetic.py                 # the shipped model's recipe (about an hour on 2 cores)
    python benchmarks/train_synthetic.py --quick         # 2 epochs on a small set: checks the pipeline
    python benchmarks/train_synthetic.py --speed-only    # train images/second at 640 for kapao-s and kapao-n

The recipe is the one of the shipped `kapao_n_synth` weights: `kapao synth` scenes at 256 px
(1500 train + 100 held-out val images, 1-3 people, min person 80 px, clutter 0.5, side cue 0.5), kapao-n,
hyp.synth with Adam, batch 16 with one optimizer step per batch, bf16 autocast (--bf16), images cached in RAM, 100 epochs.
AP is measured each epoch on the held-out val scenes by the same evaluator as `kapao val`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_speed(cfg: str, imgsz: int, batch: int, steps: int, data_yaml: Path, bf16: bool) -> float:
    """Images/second of the training step as the trainer runs it on CPU (augmented batches,
    channels-last, optional bf16 autocast, loss, backward, SGD step)."""
    from kapao.data.dataset import KeypointDataset, create_dataloader, split_source
    from kapao.engine.loss import KapaoLoss
    from kapao.hyp import load_hyp, scale_hyp
    from kapao.models.kapao import KapaoModel

    src = split_source(data_yaml, "train")
    hyp = load_hyp("hyp.kp-p6")
    ds = KeypointDataset(src.annotations, src.schema, imgsz, images_dir=src.images, augment=True, hyp=hyp)
    loader = create_dataloader(ds, batch, workers=1, shuffle=True)
    model = KapaoModel(cfg, src.schema).train().to(memory_format=torch.channels_last)
    loss_fn = KapaoLoss(model, scale_hyp(hyp, model.head.nl, model.head.nc, imgsz))
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, nesterov=True)
    seen, t0 = 0, None
    for i, (imgs, targets, _, _) in enumerate(loader):
        if i == 1:  # the first step warms up allocators and workers
            t0, seen = time.perf_counter(), 0
        x = (imgs.float() / 255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            preds = model(x)
        loss, _ = loss_fn(preds, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen += imgs.shape[0]
        if i >= steps:
            break
    return seen / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--fp32", action="store_true", help="train in fp32 (the recipe uses bf16 autocast)")
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the data and run here (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from kapao.data.synthetic import synthesize
    from kapao.engine.trainer import TrainOptions, train

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kapao-train-bench-"))
    images, epochs = (64, 2) if args.quick else (args.images, args.epochs)
    t0 = time.perf_counter()
    data = synthesize(work / "data", images, 16 if args.quick else 100, imgsz=256, people=(1, 3), seed=0,
                      min_person=80, clutter=0.5, side_cue=0.5, workers=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {images} images in "
          f"{time.perf_counter() - t0:.0f} s ({data})")
    if args.speed_only or args.quick:
        print(f"\n{'model':<9}{'imgsz':>6}{'batch':>6}{'precision':>10}{'train img/s':>13}")
        for cfg in ("kapao-n", "kapao-s"):
            for bf16 in (False, True):
                ips = train_speed(cfg, 640, 8, 3 if args.quick else 6, data, bf16)
                print(f"{cfg:<9}{640:>6}{8:>6}{'bf16' if bf16 else 'fp32':>10}{ips:>13.2f}")
        if args.speed_only:
            return 0
    t0 = time.perf_counter()
    run, _ = train(TrainOptions(
        data=str(data), cfg="kapao-n", hyp="hyp.synth", adam=True, imgsz=256, batch_size=16, nominal_batch=16,
        epochs=epochs, workers=1, cache="ram", project=str(work / "runs"), progress=False, bf16=not args.fp32,
    ))
    wall = time.perf_counter() - t0
    rows = list(csv.DictReader((run / "results.csv").open()))
    print(f"\n{'epoch':>5}{'AP':>8}{'AP50':>8}{'AR':>8}{'box':>9}{'kps':>9}{'epoch s':>9}")
    for r in rows:
        print(f"{int(r['epoch']) + 1:>5}{float(r['val/AP']):>8.3f}{float(r['val/AP50']):>8.3f}{float(r['val/AR']):>8.3f}"
              f"{float(r['train/box']):>9.4f}{float(r['train/kps']):>9.4f}{float(r['seconds']):>9.0f}")
    print(f"\nwall time {wall / 60:.1f} min; run folder {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
