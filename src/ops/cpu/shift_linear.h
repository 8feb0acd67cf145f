// shiftaddvit: shift linear layers (DeepShift-PS, METHOD.md section 2) on the CPU.
//
// Every weight is W = sign * 2^p with an integer exponent p in [pmin, pmax] (default [-14, 0]) and
// sign in {-1, 0, +1}: a 5-bit weight. Training keeps two float tensors p (F,K) and s (F,K); the forward
// pass uses their rounded values
//     p_r = clamp(round(p), pmin, pmax),  s_r = sign(round(s)),  W = s_r * 2^p_r
// where round() is round-half-to-even as torch.round (so s_r = 0 exactly when |s| <= 0.5). A NaN p
// counts as pmin and a NaN s as 0.
//
// Usage (training, float path):
//   shift_from_dense(p, s, w_dense, F, K, -14, 0);                 // conversion from a dense linear
//   shift_linear_forward(y, x, p, s, b, M, K, F, -14, 0, scratch);  // y = x W^T + b (sgemm)
//   shift_linear_backward(dx, dp, ds, db, dy, x, p, s, M, K, F, -14, 0, scratch);
// Usage (inference, the multiplier-free MatShift kernel):
//   ShiftKernelWeights kw = shift_kernel_prepare(p, s, F, K, -14, 0);  // once
//   shift_linear_forward_int(y, x, kw, b, M, K, F, 16);                 // Q16.16 activations
// Checkpoints:
//   PackedShift ps = pack_shift(p, s, F, K, -14, 0);  unpack_shift(p, s, ps);
//
// Shape legend: M rows (= B*N tokens), K in-features, F out-features. All tensors contiguous row-major
// float32 unless stated. p, s, W, dp, ds are (F,K) as torch.nn.Linear.weight; x (M,K); y (M,F); b (F).
//
// Backward (straight-through, as DeepShift-PS's UnsymmetricGradMul: rounding, sign and clamp pass the
// gradient unchanged). With dW = dy^T x (F,K):
//     dx += dy W
//     dp += dW ⊙ (s_r * 2^p_r * ln 2)     (= dW ⊙ W ln 2: d(2^p)/dp = 2^p ln 2, times the sign)
//     ds += dW ⊙ 2^p_r                    (d(s*2^p)/ds with the sign/round STE = identity)
//     db += sum over rows of dy
// A zero weight (s_r = 0) gets dp = 0 but a nonzero ds, so it can come back to life.
//
// Conversion from a dense weight w: p = clamp(round(log2|w|), pmin, pmax), s = sign(w) (as DeepShift's
// round_power_of_2 followed by its clamp). Rounding is in the log domain, so the threshold between 2^k
// and 2^(k+1) is the geometric midpoint 2^(k+0.5). Weights with |w| below 2^pmin are CLAMPED to
// sign * 2^pmin (not zeroed), weights above 2^pmax to sign * 2^pmax; w == 0 gives s = 0 and p = pmin.
//
// Integer kernel (MatShift). Activations become fixed point with f = frac_bits fractional bits
// (default 16, the release's Q16.16):  x_int = round_half_even(x * 2^f) in int32, then
//     acc[i,j] = sum_k s_r[j,k] * (x_int[i,k] >> -p_r[j,k])     (int32, no multiplication)
//     y[i,j]   = float(acc[i,j]) * 2^-f + b[j]
// ">>" is an arithmetic shift right, i.e. floor(x_int / 2^-p) (rounds toward -inf, also for negative
// x_int). Requires pmax <= 0 and pmin >= -31.
// Overflow is impossible by construction: every term satisfies |x_int >> n| <= |x_int|, so every partial
// sum (in any order, any SIMD lane) is bounded by the row's L1 norm  sum_k |x_int[i,k]|. The kernel
// checks, exactly in int64, that this L1 norm is <= 2^31 - 1 for every row (and that x is finite) and
// throws sav::Error otherwise; it never wraps. shift_linear_int_frac_bits() picks the largest f that
// fits, for callers who prefer fewer fractional bits to an error.
// On a throw, y is left partially written.
// Error against the exact product: rounding x costs <= 0.5 * 2^p_r Q-units per term and the floor of
// the shift < 1 Q-unit (0 when p_r = 0), so |y_int - y_exact| <= 1.5 * K * 2^-f, plus the final float
// roundings (int -> float, + bias: about |y| * 2^-23). The floor makes the error one-sided per term.
//
// Packed 5-bit code (checkpoints), relative to pmax so any window of 15 exponents works
// (requires pmax - pmin <= 14; [-14, 0] uses them all):
//     code = 0                                 zero weight
//     code = (neg << 4) | (pmax - p + 1)       nonzero weight, neg = 1 for sign -1, low nibble in 1..15
// (code 16, "negative zero", and low nibbles beyond pmax - pmin + 1 are invalid and rejected.)
// Codes are a little-endian bit stream: code n occupies stream bits [5n, 5n+5), stream bit b is bit
// (b % 8) of byte b / 8, with the code's least significant bit first. ceil(F*K*5/8) bytes.
#pragma once

#include <cstdint>
#include <vector>

namespace sav::cpu {

inline constexpr int shift_default_pmin = -14;
inline constexpr int shift_default_pmax = 0;
inline constexpr int shift_default_frac_bits = 16;

// torch.round: round half to even, independent of the FP rounding mode.
float shift_round_half_even(float v);

// ---- materialisation and conversion ----
// W (F,K) = s_r * 2^p_r.  p (F,K)  s (F,K). Any pmin <= pmax within [-100, 100].
void shift_linear_weights(float* W, const float* p, const float* s, int F, int K, int pmin, int pmax);
// p (F,K) (integer-valued floats)  s (F,K) in {-1,0,+1}  w (F,K) dense weight. Throws on a non-finite w.
void shift_from_dense(float* p, float* s, const float* w, int F, int K, int pmin, int pmax);

// ---- float path (training) ----
// y (M,F) = x W^T + b.  x (M,K)  p, s (F,K)  b (F) or nullptr.
// scratch: F*K floats of work space (receives the materialised W) or nullptr (allocated internally).
void shift_linear_forward(float* y, const float* x, const float* p, const float* s, const float* b, int M, int K,
                          int F, int pmin, int pmax, float* scratch = nullptr);
void shift_linear_forward_ref(float* y, const float* x, const float* p, const float* s, const float* b, int M,
                              int K, int F, int pmin, int pmax);
// dx (M,K) +=  dp (F,K) +=  ds (F,K) +=  db (F) +=  (formulas above; any may be nullptr).
// dy (M,F)  x (M,K)  p, s (F,K). scratch: 2*F*K floats or nullptr (allocated internally).
void shift_linear_backward(float* dx, float* dp, float* ds, float* db, const float* dy, const float* x,
                           const float* p, const float* s, int M, int K, int F, int pmin, int pmax,
                           float* scratch = nullptr);
void shift_linear_backward_ref(float* dx, float* dp, float* ds, float* db, const float* dy, const float* x,
                               const float* p, const float* s, int M, int K, int F, int pmin, int pmax);

// ---- packed 5-bit storage ----
struct PackedShift {
  int F = 0, K = 0, pmin = shift_default_pmin, pmax = shift_default_pmax;
  std::vector<uint8_t> codes;  // ceil(F*K*5/8) bytes, layout above
};
// One code from a rounded (sign, p); sign in {-1,0,1}, p in [pmin, pmax] when sign != 0.
uint8_t shift_code_encode(int sign, int p, int pmin, int pmax);
// Inverse; throws on an invalid code. A zero code gives sign 0, p = pmin.
void shift_code_decode(uint8_t code, int pmin, int pmax, int* sign, int* p);
// p, s (F,K) are rounded as in the forward pass (p_r, s_r) before packing.
PackedShift pack_shift(const float* p, const float* s, int F, int K, int pmin, int pmax);
// p, s (F,K) receive the rounded values (p = pmin where s = 0).
void unpack_shift(float* p, float* s, const PackedShift& packed);

// ---- integer shift-add kernel (inference) ----
// Prepared once from (p, s): the nonzero weights grouped by k-block (k_block inputs) and output j,
// positives first, then negatives; zero weights cost nothing. Each entry names the shift plane row
// (shift - shift_lo) * k_block + (k - kb * k_block): the kernel precomputes, per block of rows and
// k-block, the planes x_int >> shift for shift in [shift_lo, shift_hi] (one shift per activation and
// exponent instead of one per weight), so the inner loop is a pure add/subtract. Bit-exact to the spec.
struct ShiftKernelWeights {
  int F = 0, K = 0;
  int k_block = 0;                 // inputs per k-block
  int shift_lo = 0, shift_hi = 0;  // range of -p_r over the nonzero weights
  std::vector<int32_t> seg_start;  // (nkb*F + 1) segment (kb, j) = entries [seg_start[kb*F+j], seg_start[kb*F+j+1])
  std::vector<int32_t> seg_npos;   // (nkb*F) positive entries at the start of each segment
  std::vector<uint32_t> entry;     // (nnz) plane row, as above
};
// p, s (F,K); requires pmax <= 0, pmin >= -31.
ShiftKernelWeights shift_kernel_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax);
ShiftKernelWeights shift_kernel_prepare(const PackedShift& packed);

enum ShiftIntIsa { shift_isa_auto = 0, shift_isa_scalar, shift_isa_avx2 };
// Which kernel shift_isa_auto runs on this CPU ("avx2" or "scalar").
const char* shift_int_isa_name(ShiftIntIsa isa = shift_isa_auto);

// Largest f in [0, max_frac_bits] for which every row of x surely fits: max_i sum_k |x| * 2^f + K/2
// <= 2^31-1 (a sufficient bound; the kernel's own check is the exact one). x (M,K). Throws if x has a
// non-finite value or does not fit even with f = 0.
int shift_linear_int_frac_bits(const float* x, int M, int K, int max_frac_bits = shift_default_frac_bits);
// y (M,F)  x (M,K)  b (F) or nullptr; frac_bits in [0, 30]. Throws (never wraps) when a row of x does
// not fit at frac_bits. isa forces a kernel (tests); shift_isa_avx2 throws on a CPU without AVX2.
void shift_linear_forward_int(float* y, const float* x, const ShiftKernelWeights& w, const float* b, int M, int K,
                              int F, int frac_bits = shift_default_frac_bits, ShiftIntIsa isa = shift_isa_auto);
// Plain scalar loops over the dense (p, s): the spec of the kernel (int64 accumulation; same checks).
void shift_linear_forward_int_ref(float* y, const float* x, const float* p, const float* s, const float* b, int M,
                                  int K, int F, int pmin, int pmax, int frac_bits = shift_default_frac_bits);

}  // namespace sav::cpu
