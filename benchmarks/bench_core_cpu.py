"""CPU benchmark of the core (issue 2): image embedding and per-prompt decoding.

Prints a table:
- rwkvsam_t image embedding (encode_image) at 512, 1024, 1536, 2048: median seconds, and the
  time per megapixel relative to 512^2 (1.0 = exactly linear in the pixel count);
- one box prompt through prompt encoder + mask decoder + refine on a cached image at 1024
  (model.decode only, and Predictor.predict including the upsampling to a 1024x1024 image).

Usage: python benchmarks/bench_core_cpu.py [--model rwkvsam_t] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/_machine.py (run as a script)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="rwkvsam_t")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536, 2048])
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    from rwkvsam_core import Predictor, build_model

    torch.manual_seed(0)
    print(
        f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("| input | embedding (s, median) | s per Mpx | ratio to 512^2 per Mpx |")
    print("|---|---|---|---|")
    base = None
    for size in args.sizes:
        model = build_model(args.model, device="cpu", image_size=size)
        x = torch.rand(1, 3, size, size) * 255
        with torch.inference_mode():
            t = median_time(lambda m=model, x=x: m.encode_image(m.preprocess(x)), args.repeats)
        per_mpx = t / (size * size / 1e6)
        base = base or per_mpx
        print(f"| {size}x{size} | {t:.3f} | {per_mpx:.3f} | {per_mpx / base:.2f} |")

    model = build_model(args.model, device="cpu", image_size=1024)
    predictor = Predictor(model)
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    predictor.set_image(image)
    feats = predictor.get_features().tensors
    box = torch.tensor([[200.0, 300.0, 700.0, 800.0]])
    with torch.inference_mode():
        t_dec = median_time(lambda: model.decode(feats, boxes=box), 3 * args.repeats, warmup=2)
        t_dec1 = median_time(
            lambda: model.decode(feats, boxes=box, multimask_output=False), 3 * args.repeats, 2
        )
    t_pred = median_time(lambda: predictor.predict(box=np.array([200, 300, 700, 800])), 3 * args.repeats, 2)
    print()
    print("| one box prompt at 1024 (cached image) | ms (median) |")
    print("|---|---|")
    print(f"| decoder + refine, 3 masks (model.decode) | {t_dec * 1e3:.1f} |")
    print(f"| decoder + refine, 1 mask | {t_dec1 * 1e3:.1f} |")
    print(f"| Predictor.predict (+ upsampling to 1024x1024, 3 masks) | {t_pred * 1e3:.1f} |")


if __name__ == "__main__":
    main()
