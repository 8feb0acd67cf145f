#!/usr/bin/env python3
"""PyTorch eager training throughput of the engine's dense models (the same architectures, through timm's
VisionTransformer and PyramidVisionTransformerV2), for the side-by-side against `shiftaddvit bench --device cuda
--train` in the same device run.

One step = forward, label-smoothed cross-entropy (0.1), backward, global-norm clipping (1.0), AdamW, as the
engine's bench step. Images are random and already on the GPU (the engine's step also copies its images to the GPU
and its logits back, so this favours PyTorch slightly). Precisions: fp32 (IEEE f32 products), tf32
(torch.backends.cuda.matmul.allow_tf32), and bf16 autocast (mixed precision, fp32 master weights).

  python3 python/torch_train_bench.py --models vit_fmnist,pvt_fmnist,deit_tiny_patch16_224 --batches 64,256 [--json out.jsonl]
"""
import argparse, json, time

import torch
import timm


def build(name):
    if name == "vit_fmnist":
        # shiftaddvit's vit_fmnist preset: 28x28x1, patch 4, width 96, depth 4, heads 4, mlp 192, 10 classes,
        # class token + learned positions, LayerNorm eps 1e-6, exact GELU, qkv with bias
        return timm.models.vision_transformer.VisionTransformer(
            img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=4,
            mlp_ratio=2.0, qkv_bias=True, global_pool="token"), (1, 28, 10)
    if name == "pvt_fmnist":
        # shiftaddvit's pvt_fmnist preset: 28x28x1, stem conv k3 s2 p1, widths 32/64/96/128, heads 1/2/3/4,
        # depths 2/2/2/2, sr 2/1/1/1, mlp ratio 4
        m = timm.models.pvt_v2.PyramidVisionTransformerV2(
            in_chans=1, num_classes=10, depths=(2, 2, 2, 2), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4),
            sr_ratios=(2, 1, 1, 1), mlp_ratios=(4, 4, 4, 4))
        m.patch_embed.proj = torch.nn.Conv2d(1, 32, kernel_size=3, stride=2, padding=1)
        return m, (1, 28, 10)
    if name.startswith("deit_"):
        return timm.create_model(name, pretrained=False), (3, 224, 1000)
    if name.startswith("pvt_v2_"):
        return timm.create_model(name, pretrained=False), (3, 224, 1000)
    raise SystemExit(f"unknown model {name}")


def step_ms(model, opt, x, y, precision, iters, warmup):
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_fmnist")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in a.models.split(","):
        for precision in ("fp32", "tf32", "bf16"):
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            for b in [int(s) for s in a.batches.split(",")]:
                model, (cin, side, classes) = build(name)
                model = model.cuda().train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
                x = torch.randn(b, cin, side, side, device="cuda")
                y = torch.randint(0, classes, (b,), device="cuda")
                ms = step_ms(model, opt, x, y, precision, a.iters, a.warmup)
                row = {"model": name, "framework": "pytorch-eager", "precision": precision, "batch": b,
                       "train_step_ms": ms, "train_img_s": 1e3 * b / ms}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\n| model | PyTorch eager | batch | train step ms | train img/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['train_step_ms']:.3f} | {r['train_img_s']:.0f} |")


if __name__ == "__main__":
    main()
