#!/usr/bin/env python3
"""End-to-end check of `shiftaddvit infer` against timm on a real timm-written checkpoint.

Builds a timm model with random weights and non-trivial biases (every bias and norm parameter randomised),
saves its state_dict with safetensors as timm would, runs the engine's CLI on it, and compares against
timm's float64 logits: max abs error / max abs logit.

  python3 python/check_infer.py --bin build/shiftaddvit --arch deit_tiny_patch16_224 --batch 4
"""
import argparse
import os
import subprocess
import tempfile

import torch
import timm
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/shiftaddvit")
    ap.add_argument("--arch", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    m = timm.create_model(a.arch, pretrained=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if n.endswith(".weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif n in ("cls_token", "pos_embed"):
                p.copy_(0.5 * torch.randn_like(p))
    m.eval()
    cfg = m.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))
    x = torch.randn(a.batch, *size)
    with torch.no_grad():
        ref = m.double()(x.double())
    with tempfile.TemporaryDirectory() as d:
        w, i, o = (os.path.join(d, f) for f in ("w.safetensors", "in.safetensors", "out.safetensors"))
        save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, w)
        save_file({"input": x.contiguous()}, i)
        subprocess.run([a.bin, "infer", "--arch", a.arch, "--weights", w, "--input", i, "--output", o], check=True)
        got = load_file(o)["logits"].double()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    print(f"{a.arch} batch {a.batch}: max|engine - timm fp64| / max|logit| = {err:.3e} "
          f"(max |logit| {ref.abs().max().item():.3f}) -> {'PASS' if err < a.tol else 'FAIL'}")
    raise SystemExit(0 if err < a.tol else 1)


if __name__ == "__main__":
    main()
