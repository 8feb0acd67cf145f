#!/usr/bin/env python3
"""PyTorch (pip wheel, CPU) baseline for the engine's CPU benchmark: the same timm VisionTransformer and
PyramidVisionTransformerV2 configs, forward latency and training-step throughput, with the same thread count.

  python3 python/bench_torch_cpu.py --archs vit_fmnist,deit_tiny_patch16_224 --batches 1,64 --threads 2 --json out.jsonl
"""
import argparse
import json
import time

import torch
import timm
import timm.loss

CONFIGS = {
    "vit_fmnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=4,
                       mlp_ratio=2.0),
    "deit_tiny_patch16_224": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                                  num_heads=3, mlp_ratio=4.0),
    "deit_small_patch16_224": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384,
                                   depth=12, num_heads=6, mlp_ratio=4.0),
}
# PVTv2: timm presets at 224x224x3 (1000 classes)
PVT = {"pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2"}


def build(arch):
    """(model, in_chans, img_size, num_classes) for an engine arch name."""
    if arch in PVT:
        return timm.create_model(arch, pretrained=False), 3, 224, 1000
    cfg = CONFIGS[arch]
    m = timm.models.vision_transformer.VisionTransformer(qkv_bias=True, class_token=True, global_pool="token", **cfg)
    return m, cfg["in_chans"], cfg["img_size"], cfg["num_classes"]


def median_ms(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="vit_fmnist")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for arch in a.archs.split(","):
        m, cin, size, classes = build(arch)
        for b in map(int, a.batches.split(",")):
            x = torch.randn(b, cin, size, size)
            y = torch.randint(0, classes, (b,))
            m.eval()
            with torch.inference_mode():
                fwd = median_ms(lambda: m(x), a.iters, a.warmup)
            row = {"arch": arch, "batch": b, "torch": torch.__version__, "threads": a.threads, "forward_ms": fwd}
            if a.train:
                m.train()
                opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.05)
                lossf = timm.loss.LabelSmoothingCrossEntropy(0.1)

                def step():
                    opt.zero_grad(set_to_none=True)
                    loss = lossf(m(x), y)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                    opt.step()

                row["train_step_ms"] = median_ms(step, a.iters, a.warmup)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
