"""Recipe sweep for the Fashion-MNIST dense teacher, run with PyTorch + timm on the H200.

The engine trains the teacher on the 2-core CPU machine, where an epoch costs minutes; this script
tries candidate recipes on the same architecture (timm VisionTransformer with vit_fmnist geometry) on
the GPU so that the CPU run can use one that reaches the target accuracy in the fewest epochs.
Usage: python teacher_sweep.py DATA_DIR NAME EPOCHS LR BATCH PAD_CROP HFLIP SMOOTH [DIM DEPTH MLP]
Prints one line per epoch and a final line 'RESULT name best last'.
"""
import gzip, math, sys, time
import numpy as np
import torch
import torch.nn.functional as F
import timm.models.vision_transformer as vt


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    nd = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def main():
    d, name, epochs, lr, batch, pad, hflip, smooth = sys.argv[1:9]
    dim, depth, mlp = (int(sys.argv[9]), int(sys.argv[10]), int(sys.argv[11])) if len(sys.argv) > 9 else (96, 4, 192)
    epochs, lr, batch, pad, hflip, smooth = int(epochs), float(lr), int(batch), int(pad), int(hflip), float(smooth)
    torch.manual_seed(0)
    dev = "cuda"
    xtr = torch.tensor(idx(f"{d}/train-images-idx3-ubyte.gz"), dtype=torch.float32, device=dev) / 255.0
    ytr = torch.tensor(idx(f"{d}/train-labels-idx1-ubyte.gz").astype(np.int64), device=dev)
    xte = torch.tensor(idx(f"{d}/t10k-images-idx3-ubyte.gz"), dtype=torch.float32, device=dev) / 255.0
    yte = torch.tensor(idx(f"{d}/t10k-labels-idx1-ubyte.gz").astype(np.int64), device=dev)
    mean, std = 0.2860, 0.3530
    xtr = ((xtr - mean) / std).unsqueeze(1)
    xte = ((xte - mean) / std).unsqueeze(1)
    m = vt.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=dim, depth=depth,
                             num_heads=4, mlp_ratio=mlp / dim, qkv_bias=True, class_token=True,
                             global_pool="token").to(dev)
    decay = [p for n, p in m.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    nodecay = [p for n, p in m.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nodecay, "weight_decay": 0.0}], lr=lr)
    steps_per = len(xtr) // batch
    total = epochs * steps_per
    warm = steps_per
    step = 0
    best = 0.0
    t0 = time.time()
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(len(xtr), device=dev)
        for i in range(steps_per):
            ids = perm[i * batch:(i + 1) * batch]
            x = xtr[ids]
            if pad:
                x = F.pad(x, (pad, pad, pad, pad), value=(0 - mean) / std)
                ox = torch.randint(0, 2 * pad + 1, (1,)).item()
                oy = torch.randint(0, 2 * pad + 1, (1,)).item()
                x = x[:, :, oy:oy + 28, ox:ox + 28]
            if hflip:
                flip = torch.rand(len(x), device=dev) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            cur = lr * (step + 1) / warm if step < warm else 1e-5 + 0.5 * (lr - 1e-5) * (
                1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = cur
            loss = F.cross_entropy(m(x), ytr[ids], label_smoothing=smooth)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            step += 1
        m.eval()
        with torch.no_grad():
            acc = sum((m(xte[j:j + 1000]).argmax(1) == yte[j:j + 1000]).sum().item() for j in range(0, 10000, 1000)) / 100
        best = max(best, acc)
        print(f"{name} epoch {ep + 1} loss {loss.item():.4f} test {acc:.2f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"RESULT {name} epochs={epochs} lr={lr} batch={batch} pad={pad} hflip={hflip} smooth={smooth} "
          f"dim={dim} depth={depth} mlp={mlp} best={best:.2f} last={acc:.2f}", flush=True)


if __name__ == "__main__":
    main()
