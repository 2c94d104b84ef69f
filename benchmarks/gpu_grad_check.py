"""GPU check of the training path: are encoder gradients finite and does a tiny distillation learn?

For each Bi-WKV backend (CUDA extension, Triton) in its own process:
- bi_wkv at (1, 4096, 192) in bf16: output and gradients vs the portable float64 implementation;
- rwkvsam_t at 1024: MSE of the image embedding to a fixed random target, backward in fp32 and
  under bf16 autocast: total gradient norm and the first parameters with non-finite gradients;
- 20 AdamW steps (lr 1e-3) on that fixed target, fp32 and bf16: MSE at the start and the end.

Usage: python benchmarks/gpu_grad_check.py            (runs both backends in subprocesses)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings


def one_backend() -> dict:
    import torch

    warnings.simplefilter("ignore", UserWarning)
    from rwkvsam_core import build_model
    from rwkvsam_core.ops import bi_wkv, bi_wkv_backend_info
    from rwkvsam_core.ops.portable import bi_wkv_portable

    out: dict = {"backend": bi_wkv_backend_info("cuda")}
    torch.manual_seed(0)
    b, t, c = 1, 4096, 192
    w = ((torch.rand(c, device="cuda") * 8 - 5) / t).requires_grad_()
    u = (torch.randn(c, device="cuda") / t).requires_grad_()
    k = (torch.randn(b, t, c, device="cuda") * 3).bfloat16().requires_grad_()
    v = torch.randn(b, t, c, device="cuda").bfloat16().requires_grad_()
    g = torch.randn(b, t, c, device="cuda")
    y = bi_wkv(w, u, k, v)
    grads = torch.autograd.grad(y, (w, u, k, v), g.to(y.dtype))
    w64, u64, k64, v64 = (x.detach().double().requires_grad_() for x in (w, u, k, v))
    y64 = bi_wkv_portable(w64, u64, k64, v64)
    ref = torch.autograd.grad(y64, (w64, u64, k64, v64), g.double())
    rel = lambda a, r: float((a.double() - r).norm() / r.norm())  # noqa: E731
    out["op_rel_err"] = {
        "y": rel(y, y64),
        **{n: rel(a, r) for n, a, r in zip("wukv", grads, ref, strict=True)},
    }
    out["op_grads_finite"] = all(bool(torch.isfinite(a).all()) for a in grads)

    for amp in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model("rwkvsam_t", device="cuda").train()
        params = [p for n, p in model.named_parameters() if n.startswith(("backbone.", "neck."))]
        x = model.preprocess(torch.rand(2, 3, 1024, 1024, device="cuda") * 255)
        target = torch.randn(2, 256, 64, 64, device="cuda")
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses, norms, bad = [], [], []
        t0 = time.perf_counter()
        for step in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
                emb = model.encode_image(x)["embedding"]
            loss = torch.nn.functional.mse_loss(emb.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
            if step == 0:
                bad = [
                    n
                    for n, p in model.named_parameters()
                    if p.grad is not None and not torch.isfinite(p.grad).all()
                ][:8]
            losses.append(round(float(loss), 5))
            norms.append(float(norm))
            opt.step()
        torch.cuda.synchronize()
        out[amp] = {
            "mse_first": losses[0],
            "mse_last": losses[-1],
            "grad_norm_first": norms[0],
            "nonfinite_norm_steps": sum(1 for n in norms if n != n or n == float("inf")),
            "nonfinite_params_step0": bad,
            "s_per_step": (time.perf_counter() - t0) / 20,
        }
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(one_backend()), flush=True)
        return
    for backend in ("cuda", "triton"):
        env = {**os.environ, "RWKVSAM_BI_WKV_BACKEND": backend}
        res = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not lines:
            print(f"== {backend}: FAILED (exit {res.returncode})\n{res.stderr[-3000:]}")
            continue
        print(f"== {backend}: {json.dumps(json.loads(lines[-1][7:]), indent=1)}")


if __name__ == "__main__":
    main()
