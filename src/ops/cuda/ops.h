// shiftaddvit CUDA backend: the dense ViT inference ops (forward only), bf16 activations, fp32 statistics.
//
//   using namespace sav::cuda;
//   im2col_forward(cols, img, B, Cin, S, p, stream);                       // then Gemm::linear_f32 (gemm.h)
//   embed_layernorm_forward(y, x, pe, cls, pos, w, b, B, N, C, eps, stream);
//   patch_embed_ln_forward(y, x, img, w, b, cls, pos, ln_w, ln_b, B, Cin, S, p, C, eps, stream);  // or all three
//   layernorm_forward(y, C, x, C, w, b, M, C, eps, stream);
//   attention_forward(out, qkv, B, N, C, H, stream);
//   hamming_attention_prepare(prep, anchors, mu, A, C, H, nbits, m, stream);  // once per layer's weights
//   hamming_attention_forward_ld(out, C, qk, C, v, C, prep, conv_w, B, N, C, H, nbits, m, stream);
//   moe_epilogue_forward(out, ldo, choice, s, lds, b0, b1, br, M, F, gate, epi, stream);  // after the stacked Gemm
//   moe_route_mask_forward(xa, Ka, choice, x, K, wr, br, M, K, stream);  // before the masked Gemm (Ka columns)
//
// Shape legend (as ops/cpu/ops.h): B batch, N tokens, C channels, H heads, d = C/H, M rows, P patches per
// image, p patch side, Cin image channels, S image side, K = Cin*p*p (in-features of a linear), F
// out-features, b = nbits hash bits, m anchors, Fs rows of a stacked MoE weight.
//
// Conventions: all pointers are device pointers; every launch runs on the given stream and is checked (a
// bad configuration throws sav::Error); dimensions are passed explicitly; rows are contiguous unless an ld
// (leading dimension, in elements) is given. Each op's CPU reference (the spec) is the matching sav::cpu op.
// `*_supports` answers whether a size is handled, so callers can fall back or fail clearly.
#pragma once

#include <cstdint>
#include <vector>

#include "ops/cuda/common.h"

namespace sav::cuda {

// ---- patch embedding, step 1: im2col in bf16 (step 2 is a Gemm with bias) ----
// cols (B*P, K) bf16, row b*P + py*(S/p) + px, column ci*p*p + ky*p + kx (cpu::patch_embed_forward's cols)
// img (B,Cin,S,S) f32
void im2col_forward(bf16* cols, const float* img, int B, int Cin, int S, int p, cudaStream_t stream);

// ---- the whole patch embedding fused with block 0's LayerNorm, for few images (latency; dependent launch) ----
// x (B,N,C) f32 and y (B,N,C) bf16 as im2col_forward + Gemm::linear_f32 (w (C, K) bf16, K = Cin p^2, bias f32) +
// embed_layernorm_forward would write them, N = (S/p)^2 + 1; the product sums in another f32 order (the last bits
// of x, and rarely a bf16 of y, differ). All pointers 16-byte aligned.
void patch_embed_ln_forward(bf16* y, float* x, const float* img, const bf16* w, const float* bias, const float* cls,
                            const float* pos, const float* ln_w, const float* ln_b, int B, int Cin, int S, int p, int C,
                            float eps, cudaStream_t stream);
bool patch_embed_ln_supports(int Cin, int S, int p, int C);  // p % 4 == 0, Cin p^2 % 128 == 0 and <= 1024,
                                                             // C % 8 == 0, C <= 384

// ---- token assembly fused with a LayerNorm (the embedding's adds and block 0's norm1) ----
// x (B,N,C) f32 written: x[b,0,:] = cls + pos[0,:];  x[b,n,:] = pe[b,n-1,:] + pos[n,:] for n >= 1
// y (B,N,C) bf16 = LayerNorm(x) * w + b, or nullptr to skip the norm
// pe (B,N-1,C) f32   cls (C)   pos (N,C)   w, b (C)
void embed_layernorm_forward(bf16* y, float* x, const float* pe, const float* cls, const float* pos, const float* w,
                             const float* b, int B, int N, int C, float eps, cudaStream_t stream);

// ---- LayerNorm over the last dim, f32 in, bf16 out (statistics in f32) ----
// y (M,C) bf16, row i at y + i*ldy;  x (M,C) f32, row i at x + i*ldx;  w, b (C)
void layernorm_forward(bf16* y, int ldy, const float* x, int ldx, const float* w, const float* b, int M, int C,
                       float eps, cudaStream_t stream);
bool layernorm_supports(int C);  // 1 <= C <= 1024

// ---- multi-head softmax self-attention core (between qkv and proj), tensor cores (bf16 in, f32 acc) ----
// out (B,N,C) bf16 heads concatenated [h*d + i];  qkv (B,N,3C) bf16, timm layout [s*C + h*d + i], s in q,k,v
// scale = d^-0.5; the probabilities are rounded to bf16 before P V.
void attention_forward(bf16* out, const bf16* qkv, int B, int N, int C, int H, cudaStream_t stream);
bool attention_supports(int N, int C, int H);  // 1 <= N <= 256, C % H == 0, 1 <= d <= 64

// ---- Hamming attention core (METHOD.md section 1; spec: cpu::hamming_attention_forward, ops/cpu/hamming.h) ----
// Between to_qk / to_v and proj. A cluster of 1-8 CTAs per (image, head), everything in shared memory:
//   q = qk / max(||qk||, 1e-6);  D_nj = ||q_n - a_j||^2;  sigma = max(mean_{n,j} D, 1e-12)
//   y_nr = sum_j A_rj (exp(-D_nj / (2 sigma)) - mu_j);  code bit r = 1[y_nr > 0]
//   KV_r = sum of the V rows whose bit r is set        (MatAdd #1, additions only)
//   z_n  = 0.5 v_n + sum over set bits r of KV_r / pi  (MatAdd #2, additions only)
//   out_n = z_n / max(||z_n||, 1e-6) + sum_t conv_w[h,t] v_{n+t-4}   (9 taps over the image's tokens, zero pad)
// out (B,N,C) bf16, head h at columns h*d..h*d+d-1; qk, v (B,N,C) bf16 (the to_qk / to_v outputs);
// anchors (H,m,d), mu (H,m), A (H,b,m), conv_w (H,9), all f32. Deterministic (fixed summation orders). D
// is computed as ||q||^2 + ||a||^2 - 2 q.a (a few ulp from the CPU's sum of squared differences, so a bit
// whose y is within ~1e-7 of 0 may differ); every product runs on the tensor cores: the hash's q.a and y = k A^T
// with their f32 operands split in three bf16 parts, the MatAdds on the exact 0/1 codes and bf16 v (KV enters the
// second product split in three parts), so KV and z agree with the CPU's up to the f32 summation order when the
// codes agree.
// The KSH weights anchors (H,m,d), mu (H,m) and A (H,b,m) (f32) enter the kernel prepared once (they are frozen
// buffers): hamming_attention_prepare writes, per head, the anchors and A split in three bf16 parts, ||a_j||^2
// and mu in the kernel's shared-memory layout into `prep` (hamming_attention_prepared_bytes(C, H, nbits) bytes,
// 16-byte aligned), so each CTA stages them with one contiguous copy.
size_t hamming_attention_prepared_bytes(int C, int H, int nbits);
void hamming_attention_prepare(void* prep, const float* anchors, const float* mu, const float* A, int C, int H,
                               int nbits, int m, cudaStream_t stream);
// qk rows ldqk apart, v rows ldv apart, out rows ldo apart (elements; e.g. qk = buf, v = buf + C, ldqk = ldv = 2C
// for the stacked [to_qk; to_v] product).
// split: CTAs per (image, head), 1 .. ceil(N / 16) (each writes the rows of its 16-token tiles; every one hashes all
// tokens); 0 picks hamming_attention_split. The output is bit-identical for every split.
void hamming_attention_forward_ld(bf16* out, int ldo, const bf16* qk, int ldqk, const bf16* v, int ldv,
                                  const void* prep, const float* conv_w, int B, int N, int C, int H, int nbits, int m,
                                  cudaStream_t stream, int split = 0);
// The split the launcher picks: as many CTAs per (image, head) as the SMs allow with B H of them (at most one per
// 16-token tile, at least 1).
int hamming_attention_split(int B, int N, int H);
// 1 <= N <= 256, C % H == 0, 1 <= d <= 64, 1 <= nbits <= 64, 1 <= m <= 32 (and the shared memory fits)
bool hamming_attention_supports(int N, int C, int H, int nbits, int m);
// The Hamming attention above with the block's proj and the next masked MoE fc1's LayerNorm + router + mask fused
// (one kernel instead of three): a = the attention output (as hamming_attention_forward_ld's bf16 out, never stored),
// x (rows ldx apart) += a Wp^T + bp (t = s + bp, then x + t, each rounded once; s summed in f32 on the tensor cores:
// the even and the odd 16-wide k steps each in order, then added), then exactly moe_ln_route_mask_forward(xa, ldxa,
// choice, x, ldx, ln_w, ln_b, eps, wr, br, B N, C) on the new x (the same row arithmetic). wp (C, C) bf16, bp, ln_w,
// ln_b (C), wr (2, C), br (2) f32; xa (B N, ldxa) bf16 with moe_masked_cols(C) columns; choice (B N) or nullptr.
// Runs a thread-block cluster of the H heads of each 16-token tile (their attention outputs meet in every CTA's
// shared memory); each CTA runs the epilogue of rows h, h + H, .. of its tile. Where hamming_attention_proj_supports:
// the per-head kernel's sizes, the launcher's split one tile per CTA (small batches), H <= 8, C % 16 == 0, C <= 256,
// and the proj weight fits shared memory.
bool hamming_attention_proj_supports(int B, int N, int C, int H, int nbits, int m);
void hamming_attention_proj_ln_mask_forward(float* x, int ldx, const bf16* qk, int ldqk, const bf16* v, int ldv,
                                            const void* prep, const float* conv_w, const bf16* wp, const float* bp,
                                            const float* ln_w, const float* ln_b, float eps, const float* wr,
                                            const float* br, bf16* xa, int ldxa, int8_t* choice, int B, int N, int C,
                                            int H, int nbits, int m, cudaStream_t stream);

// The attention half of a Hamming block at small batch, ONE kernel (ham_block.cu): qk | v = xn W^T + b (bf16; wqkv
// (2C, C) bf16, to_qk rows then to_v rows, bqkv (2C) bf16), the Hamming attention of hamming_attention_forward_ld on
// them (prep, conv_w as there), then x += proj + bp and LayerNorm 2 + router + mask as
// hamming_attention_proj_ln_mask_forward (wp, bp, ln_w, ln_b, eps, wr, br, xa, ldxa, choice as there). xn (B N, ldxn)
// bf16 is LayerNorm 1 of x. A thread-block cluster per image, one CTA per 16-token tile holding every head of it;
// sigma and the codes meet through distributed shared memory, the v rows through v_scratch, and every CTA computes
// the whole KV. Where hamming_block_supports: head size 64, H <= 3 (C <= 192, DeiT-Tiny), nbits <= 64, m <= 32, the
// image's v rows fit in shared memory (N <= 208 at C = 192) and a cluster of ceil(N / 16) CTAs fits the device. qkv_out
// (B N, 2C) and ao_out (B N, C), when not null, receive the kernel's qk | v rows and attention output (tests).
// v_scratch: hamming_block_scratch_elems(B, N, C) bf16 of device memory the kernel passes the v rows through (16-byte
// aligned).
bool hamming_block_supports(int B, int N, int C, int H, int nbits, int m);
size_t hamming_block_scratch_elems(int B, int N, int C);
void hamming_block_forward(float* x, int ldx, const bf16* xn, int ldxn, const bf16* wqkv, const bf16* bqkv,
                           const void* prep, const float* conv_w, const bf16* wp, const float* bp, const float* ln_w,
                           const float* ln_b, float eps, const float* wr, const float* br, bf16* xa, int ldxa,
                           int8_t* choice, bf16* v_scratch, int B, int N, int C, int H, int nbits, int m,
                           cudaStream_t stream, bf16* qkv_out = nullptr, bf16* ao_out = nullptr);
// The same kernel up to the attention output: ao (B N, C) bf16 (rows C apart), what hamming_block_forward writes to
// ao_out, bit for bit; proj, the residual, LayerNorm 2 and the router are left to mlp_block_proj_forward. Where
// hamming_block_supports.
void hamming_block_attention_forward(bf16* ao, const bf16* xn, int ldxn, const bf16* wqkv, const bf16* bqkv,
                                     const void* prep, const float* conv_w, bf16* v_scratch, int B, int N, int C, int H,
                                     int nbits, int m, cudaStream_t stream);

// ---- MoE(mult, shift) linear (METHOD.md section 3), inference, routing on the GPU ----
// Step 1: ONE Gemm::linear_f32 (no bias, no accumulate) of the rows x (M,K) bf16 with the stacked weight
// (Fs,K) bf16 built by moe_stack_weights: s (M,Fs) f32 = x [W0; W1; Wr_hi; Wr_lo; 0]^T, i.e. columns
// [0,F) expert 0 (mult), [F,2F) expert 1 (shift, decoded to its exact bf16 powers of two), [2F,2F+2) the
// router's bf16 high part, [2F+2,2F+4) its bf16 remainder (so the router keeps ~16 bits of its f32 weight:
// the routing is a discrete decision), then zero padding to a multiple of 16 rows.
// Step 2 (this kernel, one thread per float4 of the output): logits l_e = s[2F+e] + s[2F+2+e] + br[e]; e = argmax (ties
// -> expert 0, as cpu::moe_router_forward); gate g = 1 (straight-through: p / stop_grad(p) is 1 in the
// forward) or the softmax probability of e (prob); y = (s[e*F + j] + b_e[j]) * g; then the epilogue:
//   moe_epilogue_bf16:          out (M,ldo) bf16 = y                      (qkv, to_qk, to_v)
//   moe_epilogue_bf16_gelu:     out (M,ldo) bf16 = GELU(y), erf form      (fc1; the CPU's GELU)
//   moe_epilogue_f32_residual:  out (M,ldo) f32 += y                      (proj, fc2: the residual stream)
// choice (M) int8 receives e (nullptr: not written). b0, b1 (F) f32, br (2) f32.
// Both experts are computed for every token: free at batch 1 (the products are launch-bound); at large
// batch twice the FLOPs of one expert plus the f32 scratch written and half read back (DeiT-Base fc1 at
// batch 64: 310 MB). The masked form below avoids the scratch for the straight-through gate; a gathered
// per-expert product is later work.
enum MoeEpilogue { moe_epilogue_bf16 = 0, moe_epilogue_bf16_gelu = 1, moe_epilogue_f32_residual = 2 };
enum MoeGate { moe_gate_straight_through = 0, moe_gate_prob = 1 };
void moe_epilogue_forward(void* out, int ldo, int8_t* choice, const float* s, int lds, const float* b0, const float* b1,
                          const float* br, int M, int F, MoeGate gate, MoeEpilogue epi, cudaStream_t stream);
// The residual epilogue (moe_epilogue_f32_residual: x (M,ldx) += the chosen expert's output) with the next
// LayerNorm fused: xn (M,ldxn) bf16 = LayerNorm(x) (ln_w, ln_b (F) f32). Bit for bit moe_epilogue_forward then
// layernorm_forward (the same arithmetic). Half a warp per row up to 512, a warp up to F = 1024; F % 4 == 0
// (moe_epilogue_residual_ln_supports); ldx, lds, ldxn multiples of 4, x, s, b0, b1, ln_w, ln_b 16-byte and xn 8-byte
// aligned, else it throws.
bool moe_epilogue_residual_ln_supports(int F);
void moe_epilogue_residual_ln_forward(float* x, int ldx, int8_t* choice, const float* s, int lds, const float* b0,
                                      const float* b1, const float* br, int M, int F, MoeGate gate, bf16* xn, int ldxn,
                                      const float* ln_w, const float* ln_b, float eps, cudaStream_t stream);
// Rows of the stacked weight: roundup(2F + 4, 16).
int moe_stack_rows(int F);
// Host: the stacked weight (moe_stack_rows(F), K) in bf16. w0 (F,K) dense expert, w1 (F,K) shift expert
// decoded to floats (cpu::shift_linear_weights: exact in bf16), wr (2,K) router.
std::vector<bf16> moe_stack_weights(const float* w0, const float* w1, const float* wr, int F, int K);

// Masked form, straight-through gate only (the gate is exactly 1 in the forward): the chosen expert's output is
// ONE product over a doubled input. With s_e = 1 if the token chose expert e, else 0:
//   x_aug (M,Ka) bf16 = [ x s0 | x s1 | s0 s0 s1 s1 | 0 ... ]            (exact copies of x and exact zeros)
//   W_aug (F,Ka) bf16 = [ W0 | W1 | b0_hi b0_lo b1_hi b1_lo | 0 ... ]    (moe_masked_weights)
//   x_aug W_aug^T = x W_e^T + b_e_hi + b_e_lo   for the chosen e, f32 accumulation
// with b_hi = bf16(b), b_lo = bf16(b - b_hi): the bias to ~16 bits (|b - b_hi - b_lo| <= 2^-17 |b|). Then
//   Gemm::linear_bf16(out, xa, W_aug, nullptr, M, Ka, F, gelu, stream)     (bf16 / GELU: cuBLASLt's tanh form)
//   Gemm::linear_f32(out, xa, W_aug, nullptr, M, Ka, F, true, stream)      (f32 residual add)
// so no f32 scratch and no epilogue pass: the output is written once, in its final type. The product's work,
// M F Ka ~ 2 M F K, is the stacked form's M Fs K (both experts are still computed, the other one on zeros).
// moe_route_mask_forward (one warp per token row): router logits in f32 from the bf16 x and the f32 router
// weight, l_e = sum_k x_k wr[e,k] + br[e] (fmaf, a fixed order: deterministic; about 24 bits, against the stacked
// form's ~16); e = 1 if l1 > l0, else 0 (ties and NaN -> expert 0, as cpu::moe_router_forward); choice (M) int8
// receives e (nullptr: not written); xa rows ldxa >= Ka apart (the Gemm needs ldxa == Ka), columns [0, Ka)
// written, the rest untouched; x (M,K) bf16 rows ldx >= K apart; wr (2,K) f32, br (2) f32. Any K >= 1.
__host__ __device__ constexpr int moe_masked_cols(int K) { return (2 * K + 4 + 15) / 16 * 16; }  // roundup(2K + 4, 16)
void moe_route_mask_forward(bf16* xa, int ldxa, int8_t* choice, const bf16* x, int ldx, const float* wr,
                            const float* br, int M, int K, cudaStream_t stream);
// The same with the LayerNorm before it fused (one kernel instead of two): x (M,K) f32 rows ldx apart, ln_w, ln_b
// (K) f32; the x_aug columns are bit for bit those of layernorm_forward's bf16 output (same arithmetic), the
// router sums them in another order than moe_route_mask_forward (a choice may differ at near-ties). Half a warp
// per row up to 512, a warp up to K = 1024; K % 4 == 0 (moe_ln_route_mask_supports); ldx, ldxa multiples of 4, x, ln_w,
// ln_b, wr 16-byte and xa 8-byte aligned, else it throws.
bool moe_ln_route_mask_supports(int K);
void moe_ln_route_mask_forward(bf16* xa, int ldxa, int8_t* choice, const float* x, int ldx, const float* ln_w,
                               const float* ln_b, float eps, const float* wr, const float* br, int M, int K,
                               cudaStream_t stream);
// Host: W_aug (F, moe_masked_cols(K)) in bf16. w0 (F,K) dense expert, w1 (F,K) shift expert decoded to floats
// (exact in bf16), b0, b1 (F) f32 biases.
std::vector<bf16> moe_masked_weights(const float* w0, const float* w1, const float* b0, const float* b1, int F, int K);

// ---- Small-M products with a whole-row epilogue in one launch (ops/cuda/rows_fused.cu) ----
// For few rows (batch 1: M = 197) a cuBLASLt product and the row kernel after it each cost a launch and a drain
// (~3.5 us in a graph); these kernels do both in one. On the H200 they are still slower than the pair they replace
// (bench/RESULTS.md, session 10: the row epilogue's latency chain stays, and the weight slices of 13 row tiles load
// slower than cuBLASLt's), so ViTCuda runs them only on request (ViTCuda::set_row_fusion). A thread-block cluster of G
// CTAs (1, 2, 4 or 8) owns a tile of 16 rows: CTA r computes the 8-column tiles r nt / G .. (r+1) nt / G - 1 of the
// tile's output (nt = the output's column tiles; bf16 mma.sync, f32 accumulation) and sends row i of the tile to CTA i
// / (16 / G) through distributed shared memory; after one cluster barrier each CTA runs the epilogue of its 16 / G rows
// with the arithmetic of the separate row kernel named below. Sums: output (i, j) = the sum, over k blocks of 64 in
// increasing order, of each block's 4-mma chain: independent of G and M (every cluster size and batch gives the same
// bits), not cuBLASLt's order (so the layered path's products differ from these in the last bits, and a near-tie
// routing decision may differ). Sizes: K % 8 == 0 and the input's row stride a multiple of 8 (16-byte rows), C % 4 ==
// 0, C <= 1024, the other row strides multiples of 4, the pointers 16-byte aligned (xa, xn 8-byte); the CTA's weight
// slice and the row tile must fit in shared memory (rows_fused_supports). cluster 0: rows_fused_cluster(M).
//
// rows_linear_ln_mask_forward: a linear with a residual add, then a masked MoE layer's LayerNorm + router + mask:
//   x (M,C) f32 (rows ldx apart) = x + (a (M,K) bf16 W^T + b), W (C,K) bf16 (rows K apart), b (C) f32: t = s + b,
//   then x + t, each rounded once; then exactly moe_ln_route_mask_forward(xa, ldxa, choice, x, ldx, ln_w, ln_b, eps,
//   wr, br, M, C) on the new x (bit for bit: the same row arithmetic), xa (M, moe_masked_cols(C)) bf16.
// rows_moe_residual_ln_forward: a stacked MoE layer with a residual epilogue and the next LayerNorm:
//   s (16, Fs) f32 = h (rows of the tile, K) bf16 ws^T per tile, kept in shared memory (ws the stacked
//   (moe_stack_rows(C), K) weight of moe_stack_weights), then exactly moe_epilogue_residual_ln_forward's arithmetic
//   on s: x (M,C) += the chosen expert's output, choice (M) (nullptr: not written), xn (M,C) bf16 = LayerNorm(x).
bool rows_fused_supports(int K, int C, int Fcols, int cluster = 8);  // Fcols: C or moe_stack_rows(C)
int rows_fused_cluster(int M);
void rows_linear_ln_mask_forward(float* x, int ldx, const bf16* a, int lda, const bf16* w, const float* b, int M, int K,
                                 int C, const float* ln_w, const float* ln_b, float eps, const float* wr,
                                 const float* br, bf16* xa, int ldxa, int8_t* choice, cudaStream_t stream,
                                 int cluster = 0);
void rows_moe_residual_ln_forward(float* x, int ldx, int8_t* choice, const bf16* h, int ldh, const bf16* ws,
                                  const float* b0, const float* b1, const float* br, int M, int K, int C, MoeGate gate,
                                  bf16* xn, int ldxn, const float* ln_w, const float* ln_b, float eps,
                                  cudaStream_t stream, int cluster = 0);

// ---- the MLP half of a ViT block at small M, one kernel ----
// mlp_block_forward: a masked MoE fc1 with GELU, then a stacked MoE fc2 with its residual epilogue and the next
// LayerNorm (the layered path's masked_product + stacked product + moe_epilogue_residual_ln_forward):
//   h (M,F) bf16 = gelu_tanh(xa wa^T) (xa (M, moe_masked_cols(C)) rows ldxa apart, as moe_ln_route_mask_forward
//   writes it; wa (F, moe_masked_cols(C)) from moe_masked_weights; f32 accumulation), then s (M, 2C + 4) f32 = h ws^T
//   (ws the stacked (moe_stack_rows(C), F) weight of moe_stack_weights; h stays on chip), then exactly
//   moe_epilogue_residual_ln_forward's arithmetic on s: x (M,C) += the chosen expert's output (gate), choice (M)
//   (nullptr: not written), xn (M,C) bf16 = LayerNorm(x; ln_w, ln_b, eps). A cluster of F / 128 CTAs per tile of
//   tile_rows (16 or 32; 0: mlp_block_tile_rows(M)) rows; the F products of s meet through distributed shared memory,
//   summed in a fixed order (the bits of a row depend on nothing else). Where mlp_block_supports: C % 8 == 0, C <= 192,
//   F a multiple of 128 up to 1024, on sm_90. hid_out (M,F), when not null, receives h (tests).
int mlp_block_tile_rows(int M);
bool mlp_block_supports(int M, int C, int F, int tile_rows = 0);
void mlp_block_forward(float* x, int ldx, int8_t* choice, const bf16* xa, int ldxa, const bf16* wa, const bf16* ws,
                       const float* b0, const float* b1, const float* br, int M, int C, int F, MoeGate gate, bf16* xn,
                       int ldxn, const float* ln_w, const float* ln_b, float eps, cudaStream_t stream,
                       int tile_rows = 0, bf16* hid_out = nullptr);
// mlp_block_proj_forward: the same with the attention half's proj, residual, LayerNorm 2 and the masked fc1's router +
// mask first (the attention kernel's phases 5 and 6: hamming_block_forward's arithmetic, bit for bit): from the
// attention output ao (M, C) bf16 rows ldao apart, x (M, C) += ao wp^T + bp, x_aug = the mask of LayerNorm(x; ln2_w,
// ln2_b, eps) by the router (wr, br1; choices into choice1 when not null), kept on chip, then mlp_block_forward's
// kernel on it (its choices into choice). Each CTA of a tile's cluster does the proj of the whole tile. Where
// mlp_block_proj_supports: mlp_block_supports' shapes with 16-row tiles and C % 32 == 0.
bool mlp_block_proj_supports(int M, int C, int F);
void mlp_block_proj_forward(float* x, int ldx, const bf16* ao, int ldao, const bf16* wp, const float* bp,
                            const float* ln2_w, const float* ln2_b, const float* wr, const float* br1, int8_t* choice1,
                            const bf16* wa, const bf16* ws, const float* b0, const float* b1, const float* br,
                            int8_t* choice, int M, int C, int F, MoeGate gate, bf16* xn, int ldxn, const float* ln_w,
                            const float* ln_b, float eps, cudaStream_t stream, bf16* hid_out = nullptr);

// ---- conversions ----
// y (n) bf16 = x (n) f32, round to nearest even
void f32_to_bf16(bf16* y, const float* x, int64_t n, cudaStream_t stream);

}  // namespace sav::cuda
