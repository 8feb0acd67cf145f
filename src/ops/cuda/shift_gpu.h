// shiftaddvit CUDA backend: shift linear layers (METHOD.md section 2) on the GPU, three ways, and a per-shape
// chooser. Spec: ops/cpu/shift_linear.h (W = s_r * 2^p_r, the MatShift integer kernel, the packed 5-bit code).
//
//   using namespace sav::cuda;
//   ShiftLinearGpu lin(p, s, bias, F, K, -14, 0);            // host (F,K) p, s and (F) bias; uploads all forms
//   const ShiftPath path = lin.pick(M, stream);              // times the exact paths once for this M (syncs)
//   lin.forward(y, x, M, stream, path);                      // y (M,F) f32 = x W^T + b; x (M,K) bf16
//   lin.forward(y, x, M, stream, shift_path_int);            // the multiplier-free MatShift kernel instead
//   if (lin.int_status_take() >= 0) { /* a row of x did not fit Q(31-f).f; its outputs are NaN */ }
//
// Or the kernels alone:
//   ShiftGpuWeights wi = shift_gpu_weights_prepare(p, s, F, K, -14, 0);         // int form (once)
//   shift_int_linear_forward(y, x, wi, bias, M, K, F, 16, stream, status);      // x f32 or bf16
//   ShiftPackedWeights wp = shift_packed_weights_prepare(p, s, F, K, -14, 0);   // 5-bit form (once)
//   shift_packed_linear_forward(y, x, wp, bias, M, K, F, stream);               // y f32 or bf16, x bf16
//   shift_packed_linear_forward(h, x, wp, bias, M, K, F, {.gelu = true}, stream);  // h bf16 = GELU(x W^T + b)
//   shift_packed_linear_forward(r, x, wp, bias, M, K, F, {.accumulate = true}, stream);  // r f32 += x W^T + b
//
// Shape legend: M rows (tokens), K in-features, F out-features. x (M,K), y (M,F) row-major contiguous device
// arrays; p, s (F,K) host floats as torch.nn.Linear.weight; bias (F) f32 (device for the kernels, host for the
// constructor) or nullptr.
//
// The three paths (ShiftPath):
//   shift_path_cublas_decoded  the weights decoded once to bf16 (exact: +-2^p is a bf16) and multiplied by
//                              cuBLASLt (sav::cuda::Gemm, bf16 tensor cores, f32 accumulation). The engine's path.
//   shift_path_packed_mma      decode-to-matrix-unit: the packed 5-bit codes are read from global memory (5 bits
//                              per weight: 3.2x less weight traffic than bf16), decoded to bf16 in registers and
//                              fed to mma.sync m16n8k16 (bf16 x bf16 -> f32). Same products as cublas_decoded;
//                              only the f32 summation order differs (~1e-6 of max|y|).
//   shift_path_int             shift-add ("MatShift"): x rounded to fixed point with f fractional bits, then
//                              out = sum_k sign * (x_int >> -p) with integer shifts and adds only, on CUDA cores;
//                              bit-exact to cpu::shift_linear_forward_int_ref. It is NOT numerically the same as
//                              the other two: fixed-point rounding of x and the floor of each shift change the
//                              result by up to 1.5 K 2^-f (see shift_linear.h), so ShiftLinearGpu::pick leaves it
//                              out unless asked.
//
// Overflow of the int path. The CPU reference throws when a row of x has a non-finite value, a value with
// |x 2^f| >= 2^31, or sum_k |x_int| > 2^31 - 1 (then an int32 accumulator could wrap). A kernel cannot throw, so
// the kernel checks exactly the same conditions per row (in int64) and, for such a row, writes NaN to every
// output of the row and records the smallest such row index in `status` (an unsigned device word, atomicMin;
// 0xFFFFFFFF = none: initialise it with shift_int_status_reset). Every other row is bit-exact to the CPU.
// Accumulation is in 32-bit integers modulo 2^32, which equals the exact sum whenever the row passes the check.
// The host reads the word when it chooses (shift_int_status_read, or ShiftLinearGpu::int_status_take), so a
// forward has no host round trip.
//
// Calls are asynchronous on `stream`, allocate nothing, and never synchronise: they can be captured into CUDA
// graphs (ShiftLinearGpu::forward too, once pick / a first cuBLASLt call of the shape has run eagerly). Results
// are bit-identical from run to run (fixed reduction orders, no float atomics). Kernels need sm_80; the
// split-K plans (thread-block clusters) are used on sm_90 only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "ops/cpu/shift_linear.h"
#include "ops/cuda/common.h"

namespace sav::cuda {

class Gemm;

// ---- device weight forms ----

// Int (MatShift) form: one byte per weight, transposed and padded, codes[k][j] (Kp, Fp):
//   nonzero weight: (neg << 7) | n, n = -p_r in 0..31;   zero weight (and padding): 32.
// plus one 32-bit constant per output column (see shift_gpu.cu: the kernel works on x_int + 2^31 and logical
// shifts, and the constants restore the arithmetic-shift sum exactly, modulo 2^32).
struct ShiftGpuWeights {
  int F = 0, K = 0;
  int Fp = 0, Kp = 0;              // F rounded up to 128, K rounded up to 32
  DeviceBuffer<uint8_t> codes;     // (Kp, Fp)
  DeviceBuffer<uint32_t> col_add;  // (Fp)
};
// p, s (F,K) host; rounded as the forward pass (cpu::shift_linear_weights). Needs -31 <= pmin <= pmax <= 0.
ShiftGpuWeights shift_gpu_weights_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax);

// Packed-mma form: the 5-bit codes of cpu::PackedShift re-ordered so that one lane's mma.sync B fragments are
// two aligned 32-bit words plus a shared sign word. Per (k-block kb of 64 inputs, output row j), a record of 10
// words (40 bytes = 64 weights x 5 bits), records (nkb, Fp) contiguous so a CTA's k-block is one aligned block:
//   with the nibble d = p_r - pmin + 1 (1..15; 0 = zero weight) and the sign bit of weight k = 64 kb + kl,
//   kl = 16 st + 8 b + 2 t + e   (k16 step st 0..3, fragment register b 0..1, lane-in-quad t 0..3, half e 0..1),
//   h = st / 2, q = 2 (st % 2) + b, P = 4 h + q:
//     word 2 t + h,  bits 4 q + 16 e .. +3  = d          (nibble words 0..7)
//     word 8 + t/2,  bit 8 (t % 2) + P + 16 e = negative  (sign words 8..9)
// Decoding a pair (e = 0, 1) costs 2 shifts and 2 logic ops: bits d << 7 and the sign at bit 15 of each half
// form the bf16 2^(d - 127) (or 0 for d = 0), and one bf16x2 multiply by 2^(126 + pmin) makes it +-2^p_r,
// exactly. Needs pmax - pmin <= 14 and -126 <= pmin <= 1.
struct ShiftPackedWeights {
  int F = 0, K = 0;
  int Fp = 0, nkb = 0;  // F rounded up to 128, ceil(K / 64)
  int pmin = cpu::shift_default_pmin, pmax = cpu::shift_default_pmax;
  DeviceBuffer<uint32_t> words;  // (nkb, Fp, 10)
};
ShiftPackedWeights shift_packed_weights_prepare(const float* p, const float* s, int F, int K, int pmin, int pmax);
// From checkpoint codes (cpu::pack_shift's stream); invalid codes throw.
ShiftPackedWeights shift_packed_weights_prepare(const cpu::PackedShift& packed);

// Host images of the two device forms (what the prepare functions upload), for tests and tools.
// W (F,K): the materialised weights s_r 2^p_r (cpu::shift_linear_weights); throws on a value that is not 0 or a
// power of two within the range.
std::vector<uint8_t> shift_int_codes_host(const float* W, int F, int K, std::vector<uint32_t>* col_add);
std::vector<uint32_t> shift_packed_words_host(const float* W, int F, int K, int pmin, int pmax);

// ---- kernels ----

// The launch plan (tests, benchmarks, logs): CTA tile bm x bn, and the number of CTAs of a thread-block cluster
// that split K (1 = no split; their partial sums are added in rank order through distributed shared memory).
struct ShiftKernelPlan {
  int bm = 0, bn = 0, splits = 1;
};
ShiftKernelPlan shift_int_plan(int M, int K, int F);
ShiftKernelPlan shift_packed_plan(int M, int K, int F);

// Largest M the kernels accept (grid rows).
inline constexpr int shift_gpu_max_rows = 65535 * 64;

// Integer shift-add kernel. y (M,F) f32 = MatShift(x) as cpu::shift_linear_forward_int_ref, + bias.
// x (M,K) f32 or bf16 (bf16 values are exact in f32, so the CPU reference of the bf16 values is the spec);
// bias (F) f32 or nullptr; frac_bits in [0, 30]; status: nullptr or a device word (see "Overflow" above).
// y must not alias x. Throws sav::Error on bad arguments (null pointers, M outside [0, shift_gpu_max_rows],
// K / F not the weights', frac_bits out of range).
void shift_int_linear_forward(float* y, const float* x, const ShiftGpuWeights& w, const float* bias, int M, int K,
                              int F, int frac_bits, cudaStream_t stream, unsigned* status = nullptr);
void shift_int_linear_forward(float* y, const bf16* x, const ShiftGpuWeights& w, const float* bias, int M, int K, int F,
                              int frac_bits, cudaStream_t stream, unsigned* status = nullptr);
// status = 0xFFFFFFFF (no bad row), asynchronously (capturable).
void shift_int_status_reset(unsigned* status, cudaStream_t stream);
// Synchronises `stream`, returns the smallest row flagged since the last reset, or -1.
int64_t shift_int_status_read(const unsigned* status, cudaStream_t stream);

// Decode-to-matrix-unit kernel. y (M,F) = x W^T + bias with bf16 x, the decoded bf16 weights, f32
// accumulation; y f32, or bf16 (rounded once, after the bias). bias (F) f32 or nullptr. y must not alias x.
void shift_packed_linear_forward(float* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, cudaStream_t stream);
void shift_packed_linear_forward(bf16* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, cudaStream_t stream);

// What the packed kernel does with each output v = (x W^T)[i,j] + bias[j] (f32) before storing it: the epilogues
// of a transformer's linears (the ones sav::cuda::Gemm fuses into cuBLASLt).
//   gelu        v = GELU(v), the tanh form (as cuBLASLt's GELU epilogue):
//               0.5 v (1 + tanh(0.7978845608 (v + 0.044715 v^3))), in f32 with tanhf (absolute error ~1e-7 |v|);
//   accumulate  f32 y only: y[i,j] = y[i,j] + v (the residual add "y += x W^T + b"; one rounding, so the result
//               is bit-exact to y plus the f32 output of the same call without accumulate, added in f32);
//   ldy         row stride of y in elements (0 = F; else >= F): row i at y + i ldy, columns [F, ldy) untouched
//               (e.g. the q/k and v halves of one wider buffer). Any element alignment of y works.
// The order is bias, GELU, accumulate, then one rounding to the output type.
struct ShiftEpilogue {
  bool gelu = false;
  bool accumulate = false;
  int ldy = 0;
};
// The kernel above with an epilogue. Throws sav::Error for accumulate with a bf16 y, ldy < 0 or in (0, F), or y
// (the span of its (M-1) ldy + F elements) overlapping x.
void shift_packed_linear_forward(float* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, const ShiftEpilogue& epi, cudaStream_t stream);
void shift_packed_linear_forward(bf16* y, const bf16* x, const ShiftPackedWeights& w, const float* bias, int M, int K,
                                 int F, const ShiftEpilogue& epi, cudaStream_t stream);
// The packed form of already materialised weights W (F,K) = s_r 2^p_r (cpu::shift_linear_weights, e.g. two
// layers' rows stacked), uploaded; throws as shift_packed_words_host.
ShiftPackedWeights shift_packed_weights_from_matrix(const float* W, int F, int K, int pmin, int pmax);
// Whether the packed form holds exponents [pmin, pmax] (pmax - pmin <= 14, -126 <= pmin <= 1).
bool shift_packed_supports(int pmin, int pmax);

// ---- one layer, three paths, a chooser ----

enum ShiftPath { shift_path_cublas_decoded = 0, shift_path_packed_mma, shift_path_int };
// "cublas_decoded", "packed_mma", "int"
const char* shift_path_name(ShiftPath path);

// One shift linear layer with every device form: decoded bf16 weights (cuBLASLt), packed codes (packed-mma) and
// int codes (MatShift), the f32 bias and the int path's status word. Not thread-safe (one per stream, as Gemm).
class ShiftLinearGpu {
 public:
  // p, s (F,K), bias (F) or nullptr: host f32. Needs -31 <= pmin <= pmax <= 0 and pmax - pmin <= 14 (the forms
  // of all three paths); frac_bits in [0, 30] is the int path's fixed point.
  ShiftLinearGpu(const float* p, const float* s, const float* bias, int F, int K, int pmin = cpu::shift_default_pmin,
                 int pmax = cpu::shift_default_pmax, int frac_bits = cpu::shift_default_frac_bits);
  ~ShiftLinearGpu();
  ShiftLinearGpu(ShiftLinearGpu&&) noexcept;
  ShiftLinearGpu& operator=(ShiftLinearGpu&&) noexcept;
  ShiftLinearGpu(const ShiftLinearGpu&) = delete;
  ShiftLinearGpu& operator=(const ShiftLinearGpu&) = delete;

  int F() const { return F_; }
  int K() const { return K_; }
  int frac_bits() const { return frac_bits_; }

  // y (M,F) f32 = x W^T + b by `path`; x (M,K) bf16 device. No allocation, no synchronisation (capturable once
  // the path has run eagerly for this M: cuBLASLt picks its algorithm on a shape's first call). M = 0: nothing.
  void forward(float* y, const bf16* x, int M, cudaStream_t stream, ShiftPath path);
  // The fastest path for M rows: the first call for (M, include_int) runs each candidate on scratch buffers
  // (zero inputs; 3 warm-ups, then the median of 9 CUDA-event-timed launches), synchronising `stream` and
  // allocating; later calls return the cached answer. Candidates: cublas_decoded and packed_mma (the same
  // products: a choice for speed only), plus int when include_int (which changes results by fixed-point
  // rounding, see above). Throws if `stream` is being captured.
  ShiftPath pick(int M, cudaStream_t stream, bool include_int = false);
  // The median microseconds pick measured for (M, include_int) per path (index ShiftPath; negative = not timed),
  // or nullptr before pick.
  const float* pick_times_us(int M, bool include_int = false) const;
  // The path of the last forward (pick's own runs excluded).
  ShiftPath last_path() const { return last_; }

  // The int path's status word: the smallest row flagged since the last take (NaN outputs), or -1; resets it.
  // Synchronises `stream`.
  int64_t int_status_take(cudaStream_t stream);

  const ShiftGpuWeights& int_weights() const { return intw_; }
  const ShiftPackedWeights& packed_weights() const { return packed_; }
  const bf16* decoded_weights() const { return w_bf16_.get(); }  // (F,K) bf16
  const float* bias() const { return bias_.size() ? bias_.get() : nullptr; }

 private:
  struct Timing {
    ShiftPath best = shift_path_cublas_decoded;
    float us[3] = {-1.0f, -1.0f, -1.0f};
  };
  int F_ = 0, K_ = 0, pmin_ = 0, pmax_ = 0, frac_bits_ = 0;
  DeviceBuffer<bf16> w_bf16_;
  DeviceBuffer<float> bias_;
  ShiftPackedWeights packed_;
  ShiftGpuWeights intw_;
  DeviceBuffer<unsigned> status_;
  std::unique_ptr<Gemm> gemm_;
  std::map<std::pair<int, bool>, Timing> picks_;
  ShiftPath last_ = shift_path_cublas_decoded;
};

}  // namespace sav::cuda
