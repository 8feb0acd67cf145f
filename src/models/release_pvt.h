// shiftaddvit: checkpoints of the public ShiftAddViT release (GATECH-EIC/ShiftAddViT: PVTv2 with KSH
// Hamming attention and mult/shift MoE linears, the original PVT repository's names) loaded into the
// engine's PVTv2 (models/pvt.h), with the release's own semantics (ReparamOptions::release_compat).
//
//   sav::Checkpoint ck = sav::Checkpoint::open("official_pvt_v2_b0_moe.safetensors");
//   if (sav::is_release_pvt_layout(ck)) {
//     auto model = sav::load_release_pvt(ck, "pvt_v2_b0");  // the arch hint may be empty
//     model->forward(images, B);                           // the release's logits
//     sav::save_model(*model, "engine.safetensors");       // engine names; reloads in compatibility mode
//   }
// sav::load_model (models/registry.h) does this by itself when a checkpoint has the release's names.
//
// Names (release stage s = 1..4 -> engine stage s-1):
//   patch_embed1.{proj,norm}.*           -> patch_embed.{proj,norm}.*
//   patch_embed{s>1}.{proj,norm}.*       -> stages.{s-1}.downsample.{proj,norm}.*
//   norm{s}.*                            -> stages.{s-1}.norm.*
//   head.*                               -> head.*
//   block{s}.{i}.X                       -> stages.{s-1}.blocks.{i}.X where, inside a block,
//     norm1.*, norm2.*, attn.sr.*, attn.norm.*  unchanged
//     attn.{to_qk,to_v,proj,q,kv}, mlp.{fc1,fc2}  linears, below
//     attn.qkv (3C,C): fused softmax projection without spatial reduction (the last stage of the
//                      release's Hamming models) -> attn.q = rows [0,C), attn.kv = rows [C,3C) (k, v);
//                      an MoE qkv gives both halves the same router (so both route every token alike)
//     attn.qk_quant.ksh.anchor (1,H,m,d) -> attn.ksh.anchors (H,m,d)
//     attn.qk_quant.ksh.mvec (1,H,1,m)   -> attn.ksh.mu (H,m)
//     attn.qk_quant.ksh.A (H,b,m)        -> attn.ksh.A (H,b,m)
//     attn.dconv.weight (H,1,9,1)        -> attn.dwconv.weight (H,9)
//     attn.qk_quant.projection_matrix    unused by the release's forward: ignored
//     mlp.dwconv.dwconv.*                -> mlp.dwconv.*
//   Linear suffixes: dense .weight .bias; shift (DeepShift LinearShift) .shift -> .p, .sign -> .s, .bias;
//   MoE .gate.gate.{weight,bias} -> .router.{weight,bias}, .experts.0.{weight,bias} unchanged,
//   .experts.1.{shift,sign,bias} -> .experts.1.{p,s,bias}. Shift exponents and signs are copied as stored
//   (the forward pass rounds them as the release does).
//
// Geometry and kinds come from the tensors: stage widths, input channels and the stem kernel from
// patch_embed{s}.proj, depths by counting blocks, MLP ratios from fc1, classes from head. Per stage the
// attention is 'h' (Hamming) when attn.to_qk exists, else 's' (softmax; sr ratio from attn.sr, 1 without);
// linear kinds are 'm' (experts), 's' (shift) or 'd' (weight) and must agree within a stage (attention
// linears among themselves, fc1 with fc2, across blocks); hash bits b and anchors m from ksh.A, the same
// in every layer. Head counts: ksh.A's for Hamming stages; for softmax stages the pvt_v2 preset's with the
// same widths, depths and MLP ratios (b0, b1, b2), else the release's pvt_v2 head counts 1, 2, 5, 8. The
// image size is the arch hint's (224 without one); the stem stride is 4 as in every release model. A given
// hint must name a PVT preset of the same geometry; the config takes the matching preset's name, else
// "pvt_v2_custom".
//
// Every engine tensor must be found with the shape above and every checkpoint tensor used (bar
// projection_matrix); errors name the release's tensors. The model gets release_compat = true: what the
// release computes differently from METHOD.md is listed in nn/linear_layer.h (MoE: argmax routing, gate
// 1.0, log(exp(y) + eps) combine; shift: Q16.16 floor fixed point of input and bias). Hamming attention and
// everything else already agree with the release (ops/cpu/hamming.h).
#pragma once

#include <memory>
#include <string>

#include "models/pvt.h"

namespace sav {

class Checkpoint;

// True when the tensor names are the release's (patch_embed1.proj.weight and block1.* tensors).
bool is_release_pvt_layout(const Checkpoint& ck);
// The engine config of a release checkpoint (geometry and kinds as above); throws naming what is missing,
// mis-shaped or inconsistent, or a hint that does not fit.
PvtConfig release_pvt_config(const Checkpoint& ck, const std::string& arch_hint = "");
// The model with every tensor copied from the checkpoint, in release compatibility mode.
std::unique_ptr<Pvt> load_release_pvt(const Checkpoint& ck, const std::string& arch_hint = "");

}  // namespace sav
