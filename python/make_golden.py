#!/usr/bin/env python3
"""Golden reference files for the C++ tests, computed by timm/PyTorch (run where they exist: the H200 machine).

  python3 python/make_golden.py --out tests/golden

Writes
  vit_tiny.safetensors   a tiny timm VisionTransformer (32x32x3, patch 8, width 48, depth 2, 3 heads, mlp 96,
                         7 classes): its weights (timm names), an input batch, targets, float64 logits, the
                         label-smoothed (0.1) cross-entropy and every parameter gradient (all stored as f32).
  deit_tiny_logits.safetensors   float64 logits (stored f32 and as two f32 halves hi+lo) of timm's
                         deit_tiny_patch16_224 whose weights and input are python/synth.py tensors (names as in
                         the state_dict; the input is named "input", shape (2,3,224,224)); the C++ test rebuilds
                         the same weights and input bit-exactly, so the 22 MB checkpoint is never committed.
  deit_tiny_timm.safetensors (only with --full): the timm state_dict itself and the input, for the CLI check.
  pvt_tiny.safetensors   a tiny timm PyramidVisionTransformerV2 (64x64x3, widths 8/16/24/32, heads 1/2/3/4,
                         depths 1/2/1/1, sr 8/4/2/1, mlp ratios 2, 7 classes): weights, input, targets, float64
                         logits, the cross-entropy (smoothing 0.1) and every parameter gradient.
  pvt_v2_b0_logits.safetensors   float64 logits (hi + lo halves) of timm's pvt_v2_b0 with python/synth.py
                         weights and input, like deit_tiny_logits.
  pvt_v2_b0_timm.safetensors (only with --full): that timm state_dict and input, for the CLI check.
"""
import argparse
import os
import sys

import numpy as np
import torch
import timm
import timm.loss
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth import synth_tensor  # noqa: E402


def tiny_vit():
    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
        qkv_bias=True, class_token=True, global_pool="token")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                std = 0.5 if name in ("cls_token", "pos_embed") else (1.0 / fan_in) ** 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
    return m


def golden_training(out, m, x, y, fname, config):
    """Weights, input, targets, float64 logits, the label-smoothed (0.1) cross-entropy and every parameter
    gradient of model m on batch (x, y), written to out/fname."""
    tensors = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    md = m.double()
    logits = md(x.double())
    loss = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)(logits, y)
    loss.backward()
    tensors["input"] = x.contiguous()
    tensors["target"] = y.to(torch.int32)
    tensors["logits"] = logits.detach().float().contiguous()
    tensors["loss"] = loss.detach().float().reshape(1)
    for k, p in md.named_parameters():
        tensors["grad." + k] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(out, fname),
              metadata={"timm": timm.__version__, "torch": torch.__version__, "config": config})
    print(fname, "loss", float(loss.detach()), "logits", tuple(logits.shape))


def golden_tiny(out):
    m = tiny_vit()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 32, 32, generator=g)
    golden_training(out, m, x, torch.tensor([1, 6, 3]), "vit_tiny.safetensors",
                    "img 32 patch 8 in 3 classes 7 dim 48 depth 2 heads 3 mlp 96 smoothing 0.1 float64")


def golden_synth_logits(out, arch, fname, full_name, full):
    """float64 logits (hi + lo f32 halves) of timm's `arch` with python/synth.py weights and input; with
    `full`, also the timm state_dict and the input (for the CLI check)."""
    m = timm.create_model(arch, pretrained=False)
    sd = m.state_dict()
    new = {k: torch.from_numpy(synth_tensor(k, tuple(v.shape))) for k, v in sd.items()}
    m.load_state_dict(new)
    m.eval()
    x = torch.from_numpy(synth_tensor("input", (2, 3, 224, 224)))
    with torch.no_grad():
        logits = m.double()(x.double())
    hi = logits.float()
    lo = (logits - hi.double()).float()
    save_file({"logits": hi.contiguous(), "logits_lo": lo.contiguous()}, os.path.join(out, fname),
              metadata={"timm": timm.__version__, "torch": torch.__version__, "precision": "float64"})
    print(arch, ": max |logit|", float(logits.abs().max()))
    if full:
        new["input"] = x
        save_file({k: v.contiguous() for k, v in new.items()}, os.path.join(out, full_name))


def randomize(m, seed):
    """Random weights with non-trivial norms and biases (1-D weights 1 + 0.2 n, biases 0.1 n, matrices and
    convolutions n / sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((1.0 / p[0].numel()) ** 0.5 * torch.randn(p.shape, generator=g))


def golden_pvt_tiny(out):
    torch.manual_seed(0)
    m = timm.models.pvt_v2.PyramidVisionTransformerV2(
        in_chans=3, num_classes=7, depths=(1, 2, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
        sr_ratios=(8, 4, 2, 1), mlp_ratios=(2, 2, 2, 2))
    randomize(m, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=g)
    golden_training(out, m, x, torch.tensor([4, 1]), "pvt_tiny.safetensors",
                    "img 64 in 3 classes 7 dims 8,16,24,32 heads 1,2,3,4 depths 1,2,1,1 sr 8,4,2,1 mlp 2 "
                    "smoothing 0.1 float64")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden")
    ap.add_argument("--full", action="store_true", help="also write the 22 MB timm deit_tiny checkpoint + input")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    golden_tiny(args.out)
    golden_synth_logits(args.out, "deit_tiny_patch16_224", "deit_tiny_logits.safetensors",
                        "deit_tiny_timm.safetensors", args.full)
    golden_pvt_tiny(args.out)
    golden_synth_logits(args.out, "pvt_v2_b0", "pvt_v2_b0_logits.safetensors", "pvt_v2_b0_timm.safetensors",
                        args.full)


if __name__ == "__main__":
    main()
