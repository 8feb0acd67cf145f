// shiftaddvit: operation counts and the energy model. See energy.h for the conventions and the memory
// model; every count formula is written next to the code that adds it.
//
// Notation: M rows (tokens of one image), K in-features, F out-features, C width, N tokens, H heads,
// d head dim, b hash bits, m anchors, s MoE shift share, rho = matadd_density.
//
// Accounting follows METHOD.md section 5 and the brief, NOT the release's hw_utils.py where they differ
// (the release: tiling search per layer, DRAM 200 pJ/word without the 3.7 factor, shift layers' memory
// traffic all at 10 bits per value, MatAdd without DRAM/buffer traffic, a MAC priced at its mult/shift/
// add alone, layernorm/GELU/softmax not priced). Here weights are 32-bit (dense) or 5-bit codes (shift),
// activations 32-bit, every mult/add/shift/special priced, memory as in energy.h.
#include "energy/energy.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/progress.h"

namespace sav {

namespace {

constexpr double kWordBits = 16.0;  // Eyeriss prices memory per 16-bit word

struct KindName {
  LayerKind kind;
  const char* name;
};
constexpr KindName kKindNames[] = {
    {LayerKind::linear_dense, "linear_dense"}, {LayerKind::linear_shift, "linear_shift"},
    {LayerKind::linear_moe, "linear_moe"},     {LayerKind::attn_softmax, "attn_softmax"},
    {LayerKind::attn_hamming, "attn_hamming"}, {LayerKind::layernorm, "layernorm"},
    {LayerKind::gelu, "gelu"},                 {LayerKind::residual_add, "residual_add"},
    {LayerKind::patch_embed, "patch_embed"},   {LayerKind::softmax_head, "softmax_head"},
    {LayerKind::dwconv, "dwconv"},             {LayerKind::mean_pool, "mean_pool"},
};

bool is_linear(LayerKind k) {
  return k == LayerKind::linear_dense || k == LayerKind::linear_shift || k == LayerKind::linear_moe;
}

// Accumulates the counts of one layer. Each helper documents what it adds; `rf_words` follows the
// register-file rule of energy.h (operands of every op; partial sums stay in the accumulator).
class Counter {
 public:
  Counter(EnergyRow& row, const EnergyOptions& opt) : r_(row), o_(opt) {}

  double w(int bits) const { return bits / kWordBits; }  // words per value
  double act_w() const { return w(o_.act_bits); }

  // `outs` fp32 dot products of length `len` (+ a bias when bias = 1): outs*len mults,
  // outs*(len-1+bias) adds; operands a (bits_a) and b (bits_b) per product read from the RF, plus
  // the bias operand (dense_weight_bits) per output.
  void dot_fp32(double outs, double len, int bias, int bits_a, int bits_b) {
    r_.mult_fp32 += outs * len;
    r_.add_fp32 += outs * (len - 1 + bias);
    r_.macs += outs * len;
    r_.rf_words += outs * len * (w(bits_a) + w(bits_b)) + outs * bias * w(o_.dense_weight_bits);
  }
  // `outs` shift-accumulate dot products of length `len` (MatShift): outs*len shifts,
  // outs*(len-1+bias) int32 adds (the sign folds into add/subtract; the bias is added as a fixed-point
  // int32); per product a 32-bit activation and a shift_weight_bits code from the RF, plus the bias.
  void dot_shift(double outs, double len, int bias) {
    r_.shift += outs * len;
    r_.add_int32 += outs * (len - 1 + bias);
    r_.macs += outs * len;
    r_.rf_words += outs * len * (act_w() + w(o_.shift_weight_bits)) + outs * bias * w(o_.dense_weight_bits);
  }
  // n standalone fp32 mults / adds (compares): two activation-width operands each from the RF.
  void mult(double n) {
    r_.mult_fp32 += n;
    r_.rf_words += n * 2 * act_w();
  }
  void add(double n) {
    r_.add_fp32 += n;
    r_.rf_words += n * 2 * act_w();
  }
  // n special functions (exp, erf, sqrt, reciprocal): one operand each.
  void special(double n) {
    r_.special += n;
    r_.rf_words += n * act_w();
  }
  // n MatAdd additions (fp32): one 32-bit value and the gating code bit each.
  void matadd(double n) {
    r_.add_fp32 += n;
    r_.rf_words += n * (act_w() + w(o_.code_bits));
  }
  // Softmax over `rows` rows of width W: max (W-1 compares) + subtract max (W adds) + W exps + sum
  // (W-1 adds) + 1 reciprocal + W mults by it: adds rows*(3W-2), mults rows*W, special rows*(W+1).
  void softmax_rows(double rows, double W) {
    add(rows * (3 * W - 2));
    special(rows * (W + 1));
    mult(rows * W);
  }
  // x / ||x||_2 over `rows` rows of width W: W squares + (W-1) adds, sqrt + reciprocal, W mults:
  // mults rows*2W, adds rows*(W-1), special rows*2.
  void l2_normalise_rows(double rows, double W) {
    mult(rows * W);
    add(rows * (W - 1));
    special(rows * 2);
    mult(rows * W);
  }
  // Tensor traffic: values and their bit widths.
  void weights(double values, int bits) { r_.weight_bytes += values * bits / 8.0; }
  void act_in(double values) { r_.act_in_bytes += values * o_.act_bits / 8.0; }
  void act_out(double values) { r_.act_out_bytes += values * o_.act_bits / 8.0; }
  void inter(double values, int bits) { r_.inter_bytes += values * bits / 8.0; }

 private:
  EnergyRow& r_;
  const EnergyOptions& o_;
};

void check_options(const EnergyOptions& o) {
  const double prices[] = {o.fp32_mult_pj, o.fp32_add_pj, o.shift_pj,   o.int32_add_pj, o.int32_mult_pj,
                           o.int8_mult_pj, o.int8_add_pj, o.int8_shift_pj, o.special_pj,  o.mem_unit_pj,
                           o.dram_units,   o.gb_units,    o.noc_units,  o.rf_units};
  for (double p : prices)
    SAV_CHECK(std::isfinite(p) && p >= 0, "energy options: unit energies must be finite and >= 0, got " << p);
  SAV_CHECK(o.act_bits > 0 && o.dense_weight_bits > 0 && o.shift_weight_bits > 0 && o.code_bits > 0,
            "energy options: bit widths must be positive (act " << o.act_bits << ", dense weight "
                                                               << o.dense_weight_bits << ", shift weight "
                                                               << o.shift_weight_bits << ", code "
                                                               << o.code_bits << ")");
  SAV_CHECK(o.matadd_density >= 0 && o.matadd_density <= 1,
            "energy options: matadd_density is a fraction in [0,1], got " << o.matadd_density);
}

void check_layer(const LayerDesc& L) {
  SAV_CHECK(L.tokens > 0, "layer '" << L.name << "': tokens must be positive, got " << L.tokens);
  switch (L.kind) {
    case LayerKind::linear_dense:
    case LayerKind::linear_shift:
    case LayerKind::linear_moe:
    case LayerKind::patch_embed:
      SAV_CHECK(L.in > 0 && L.out > 0,
                "layer '" << L.name << "': in and out must be positive, got " << L.in << " -> " << L.out);
      break;
    case LayerKind::attn_softmax:
    case LayerKind::attn_hamming:
      SAV_CHECK(L.heads > 0 && L.head_dim > 0, "layer '" << L.name << "': heads and head_dim must be positive, got "
                                                         << L.heads << " x " << L.head_dim);
      if (L.kind == LayerKind::attn_hamming)
        SAV_CHECK(L.hash_bits > 0 && L.anchors > 0, "layer '" << L.name
                                                              << "': hash_bits and anchors must be positive, got "
                                                              << L.hash_bits << ", " << L.anchors);
      break;
    case LayerKind::layernorm:
    case LayerKind::gelu:
    case LayerKind::residual_add:
    case LayerKind::softmax_head:
    case LayerKind::mean_pool:
      SAV_CHECK(L.in > 0, "layer '" << L.name << "': width (in) must be positive, got " << L.in);
      break;
    case LayerKind::dwconv:
      SAV_CHECK(L.in > 0 && L.out > 0, "layer '" << L.name << "': channels and taps must be positive, got " << L.in
                                                 << " x " << L.out);
      break;
  }
  if (L.kind == LayerKind::linear_moe)
    SAV_CHECK(L.shift_share >= 0 && L.shift_share <= 1,
              "layer '" << L.name << "': shift_share is a fraction in [0,1], got " << L.shift_share);
}

// Adds the counts of layer L to row (no pricing).
void count_layer(const LayerDesc& L, const EnergyOptions& o, EnergyRow& row) {
  Counter c(row, o);
  const double M = double(L.tokens), K = double(L.in), F = double(L.out);
  const int act = o.act_bits, wd = o.dense_weight_bits;
  switch (L.kind) {
    case LayerKind::linear_dense:
      // y = x W^T + b: M*F dot products of length K with bias -> M*K*F mults, M*K*F adds.
      c.dot_fp32(M * F, K, 1, act, wd);
      c.weights(K * F + F, wd);
      c.act_in(M * K);
      c.act_out(M * F);
      break;

    case LayerKind::linear_shift:
      // out[i,j] = sum_k sign[j,k] (x[i,k] >> -p[j,k]) + b[j]: M*K*F shifts, M*K*F int32 adds.
      // Weights: K*F codes of shift_weight_bits (5) + F biases of dense_weight_bits (32).
      c.dot_shift(M * F, K, 1);
      c.weights(K * F, o.shift_weight_bits);
      c.weights(F, wd);
      c.act_in(M * K);
      c.act_out(M * F);
      break;

    case LayerKind::linear_moe: {
      // Top-1 routing: (1-s)M tokens through the dense expert, sM through the shift expert (expected
      // counts). An expert's weights are read only if it gets tokens (so s = 0 is dense + router and
      // s = 1 is shift + router exactly). Input read once, output written once (gather/scatter free).
      const double s = L.shift_share, Md = (1 - s) * M, Ms = s * M;
      c.dot_fp32(Md * F, K, 1, act, wd);
      c.dot_shift(Ms * F, K, 1);
      if (Md > 0) c.weights(K * F + F, wd);
      if (Ms > 0) {
        c.weights(K * F, o.shift_weight_bits);
        c.weights(F, wd);
      }
      if (L.router) {
        // Router r(x) = softmax(W_r x + b_r), C -> E = 2: M*2 dot products of length K with bias
        // (2MK mults, 2MK adds); softmax over 2 per token (4 adds, 2 mults, 3 specials); top-1 argmax
        // (1 compare = 1 add); the chosen output scaled by its gate probability (M*F mults).
        c.dot_fp32(M * 2, K, 1, act, wd);
        c.weights(2 * K + 2, wd);
        c.softmax_rows(M, 2);
        c.add(M);
        c.mult(M * F);
      }
      c.act_in(M * K);
      c.act_out(M * F);
      break;
    }

    case LayerKind::attn_softmax: {
      // q, k, v (N,C) -> softmax(q k^T / sqrt(d)) v, per head.
      // Nk = kv_tokens keys/values (PVT's spatial reduction), else Nk = N.
      const double N = M, H = L.heads, d = L.head_dim, C = H * d, Nk = L.kv_tokens > 0 ? double(L.kv_tokens) : M;
      c.mult(H * N * d);                       // q * d^-0.5 (timm scales q): H*N*d mults
      c.dot_fp32(H * N * Nk, d, 0, act, act);  // q k^T: H*N*Nk*d mults, H*N*Nk*(d-1) adds
      c.softmax_rows(H * N, Nk);               // H*N rows of width Nk
      c.dot_fp32(H * N * d, Nk, 0, act, act);  // P v: H*N*d*Nk mults, H*N*d*(Nk-1) adds
      c.act_in(N * C + 2 * Nk * C);
      c.act_out(N * C);
      c.inter(H * N * Nk, act);  // the probabilities P, written once and read back once
      break;
    }

    case LayerKind::attn_hamming: {
      // METHOD.md section 1 between to_qk/to_v and proj, per head (all fp32 but the MatAdds' codes).
      const double N = M, H = L.heads, d = L.head_dim, C = H * d, b = L.hash_bits, m = L.anchors;
      const double rho = o.matadd_density;
      c.l2_normalise_rows(H * N, d);  // q = qk / ||qk||: H*N*2d mults, H*N*(d-1) adds, 2HN special
      // D_nj = ||q_n - a_j||^2: per (h,n,j) d subtractions, d squares, d-1 adds
      //   -> H*N*m*d mults, H*N*m*(2d-1) adds.
      c.add(H * N * m * d);
      c.mult(H * N * m * d);
      c.add(H * N * m * (d - 1));
      // sigma' = 2 sigma = (2/(N m)) sum D: H*(N*m-1) adds + H mults; 1/sigma': H specials.
      c.add(H * (N * m - 1));
      c.mult(H);
      c.special(H);
      // k_nj = exp(-D_nj / sigma') - mu_j: per (h,n,j) 1 mult, 1 exp, 1 add.
      c.mult(H * N * m);
      c.special(H * N * m);
      c.add(H * N * m);
      // y_nr = sum_j A_rj k_nj: H*N*b dot products of length m (A is a weight); code = y > 0 is free.
      c.dot_fp32(H * N * b, m, 0, act, wd);
      // MatAdd #1, KV = code^T V: each (h, r, c) accumulates the N rows' values whose bit is set,
      // from a zero accumulator: rho*H*b*d*N adds. MatAdd #2, code KV: rho*H*N*d*b adds.
      c.matadd(rho * H * b * d * N);
      c.matadd(rho * H * N * d * b);
      // z = 0.5 V + (1/pi) (code KV): per (h,n,c) 2 mults, 1 add.
      c.mult(2 * H * N * d);
      c.add(H * N * d);
      c.l2_normalise_rows(H * N, d);  // z / ||z||
      // DWConv9 over the token index (one 9-tap kernel per head, padding taps counted): H*N*d dot
      // products of length 9 -> 9HNd mults, 8HNd adds; then + to the normalised z: HNd adds.
      c.dot_fp32(H * N * d, 9, 0, act, wd);
      c.add(H * N * d);
      // Frozen buffers: anchors (H,m,d), mu (H,m), A (H,b,m), conv (H,9).
      c.weights(H * m * d + H * m + H * b * m + H * 9, wd);
      c.act_in(2 * N * C);  // qk and v
      c.act_out(N * C);
      c.inter(H * N * b, o.code_bits);  // codes
      c.inter(H * b * d, act);          // KV
      break;
    }

    case LayerKind::layernorm: {
      // Per row of width C: mean (C-1 adds, 1 mult by 1/C), centre (C adds), variance (C squares,
      // C-1 adds, 1 mult), + eps (1 add), rsqrt (1 special), normalise (C mults), affine (C mults,
      // C adds): adds 4C-1, mults 3C+2, special 1 per row. Weights gamma, beta: 2C.
      const double C = K;
      c.add(M * (C - 1));
      c.mult(M);
      c.add(M * C);
      c.mult(M * C);
      c.add(M * (C - 1));
      c.mult(M);
      c.add(M);
      c.special(M);
      c.mult(M * C);
      c.mult(M * C);
      c.add(M * C);
      c.weights(2 * C, wd);
      c.act_in(M * C);
      c.act_out(M * C);
      break;
    }

    case LayerKind::gelu: {
      // 0.5 x (1 + erf(x / sqrt 2)) per element: 3 mults, 1 add, 1 special (erf).
      const double n = M * K;
      c.mult(n);
      c.special(n);
      c.add(n);
      c.mult(2 * n);
      c.act_in(n);
      c.act_out(n);
      break;
    }

    case LayerKind::residual_add: {
      const double n = M * K;  // one fp32 add per element
      c.add(n);
      c.act_in(2 * n);
      c.act_out(n);
      break;
    }

    case LayerKind::patch_embed: {
      // Conv p x p stride p on M patches == linear K = in_chans*p*p -> F with bias (M*K*F mults and
      // adds); then the class token is prepended and the position table ((M+1) x F) added:
      // (M+1)*F adds. Weights: conv K*F + F bias, class token F, position table (M+1)*F.
      c.dot_fp32(M * F, K, 1, act, wd);
      c.add((M + 1) * F);
      c.weights(K * F + F + F + (M + 1) * F, wd);
      c.act_in(M * K);
      c.act_out((M + 1) * F);
      break;
    }

    case LayerKind::softmax_head:
      c.softmax_rows(M, K);  // M rows of width K (classes)
      c.act_in(M * K);
      c.act_out(M * K);
      break;

    case LayerKind::dwconv:
      // Depthwise k x k conv with bias (zero padding; padding taps counted): M*C dot products of length
      // F = k*k -> M*C*F mults and adds. Weights C*k*k + C.
      c.dot_fp32(M * K, F, 1, act, wd);
      c.weights(K * F + K, wd);
      c.act_in(M * K);
      c.act_out(M * K);
      break;

    case LayerKind::mean_pool:
      // mean over M rows of width C: (M-1)*C adds and C mults by 1/M.
      c.add((M - 1) * K);
      c.mult(K);
      c.act_in(M * K);
      c.act_out(K);
      break;
  }
}

// Prices the counts of a row (counts -> words -> pJ).
void price_row(EnergyRow& r, const EnergyOptions& o) {
  const double fm = o.price_8bit ? o.int8_mult_pj : o.fp32_mult_pj;
  const double fa = o.price_8bit ? o.int8_add_pj : o.fp32_add_pj;
  const double im = o.price_8bit ? o.int8_mult_pj : o.int32_mult_pj;
  const double ia = o.price_8bit ? o.int8_add_pj : o.int32_add_pj;
  const double sh = o.price_8bit ? o.int8_shift_pj : o.shift_pj;
  r.compute_pj = r.mult_fp32 * fm + r.add_fp32 * fa + r.mult_int32 * im + r.add_int32 * ia + r.shift * sh +
                 r.special * o.special_pj;
  const double to_words = 8.0 / kWordBits;
  const double weight_words = o.weights_from_dram ? r.weight_bytes * to_words : 0.0;
  const double act_words = (r.act_in_bytes + r.act_out_bytes) * to_words;
  const double inter_words = 2 * r.inter_bytes * to_words;  // written once, read back once
  r.dram_words = weight_words + (o.acts_in_dram ? act_words : 0.0);
  r.gb_words = (o.acts_in_dram ? 0.0 : act_words) + inter_words;
  r.noc_words = weight_words + act_words + inter_words;  // every buffer <-> PE transfer crosses the NoC once
  // r.rf_words was counted op by op.
  r.dram_pj = r.dram_words * o.dram_units * o.mem_unit_pj;
  r.gb_pj = r.gb_words * o.gb_units * o.mem_unit_pj;
  r.noc_pj = r.noc_words * o.noc_units * o.mem_unit_pj;
  r.rf_pj = r.rf_words * o.rf_units * o.mem_unit_pj;
}

void accumulate(EnergyRow& t, const EnergyRow& r) {
  t.mult_fp32 += r.mult_fp32;
  t.add_fp32 += r.add_fp32;
  t.mult_int32 += r.mult_int32;
  t.add_int32 += r.add_int32;
  t.shift += r.shift;
  t.special += r.special;
  t.macs += r.macs;
  t.weight_bytes += r.weight_bytes;
  t.act_in_bytes += r.act_in_bytes;
  t.act_out_bytes += r.act_out_bytes;
  t.inter_bytes += r.inter_bytes;
  t.dram_words += r.dram_words;
  t.gb_words += r.gb_words;
  t.noc_words += r.noc_words;
  t.rf_words += r.rf_words;
  t.compute_pj += r.compute_pj;
  t.dram_pj += r.dram_pj;
  t.gb_pj += r.gb_pj;
  t.noc_pj += r.noc_pj;
  t.rf_pj += r.rf_pj;
}

// Field table shared by CSV and JSON (name, accessor).
struct Field {
  const char* name;
  double (*get)(const EnergyRow&);
};
#define SAV_ENERGY_FIELD(f) {#f, [](const EnergyRow& r) { return double(r.f); }}
const Field kFields[] = {
    SAV_ENERGY_FIELD(mult_fp32),  SAV_ENERGY_FIELD(add_fp32),     SAV_ENERGY_FIELD(mult_int32),
    SAV_ENERGY_FIELD(add_int32),  SAV_ENERGY_FIELD(shift),        SAV_ENERGY_FIELD(special),
    SAV_ENERGY_FIELD(macs),       SAV_ENERGY_FIELD(weight_bytes), SAV_ENERGY_FIELD(act_in_bytes),
    SAV_ENERGY_FIELD(act_out_bytes), SAV_ENERGY_FIELD(inter_bytes), SAV_ENERGY_FIELD(dram_words),
    SAV_ENERGY_FIELD(gb_words),   SAV_ENERGY_FIELD(noc_words),    SAV_ENERGY_FIELD(rf_words),
    SAV_ENERGY_FIELD(compute_pj), SAV_ENERGY_FIELD(dram_pj),      SAV_ENERGY_FIELD(gb_pj),
    SAV_ENERGY_FIELD(noc_pj),     SAV_ENERGY_FIELD(rf_pj),
    {"memory_pj", [](const EnergyRow& r) { return r.memory_pj(); }},
    {"total_pj", [](const EnergyRow& r) { return r.total_pj(); }},
};
#undef SAV_ENERGY_FIELD

std::string csv_text(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char ch : s) q += (ch == '"') ? std::string("\"\"") : std::string(1, ch);
  return q + "\"";
}

nlohmann::ordered_json row_json(const EnergyRow& r) {
  nlohmann::ordered_json j;
  j["name"] = r.name;
  j["kind"] = r.kind;
  j["group"] = r.group;
  for (const Field& f : kFields) j[f.name] = f.get(r);
  return j;
}

std::string pct_saving(double dense, double conv) {
  if (!(dense > 0)) return "-";
  return fmt(100.0 * (1.0 - conv / dense), 1) + "%";
}

// LinearChoice from "dense" | "shift" | "moe".
LinearChoice parse_linear_choice(const std::string& s, double share, const char* what) {
  LinearChoice c;
  if (s == "dense")
    c.kind = LayerKind::linear_dense;
  else if (s == "shift")
    c.kind = LayerKind::linear_shift;
  else if (s == "moe")
    c.kind = LayerKind::linear_moe;
  else
    SAV_THROW("vit_converted_layers: " << what << " must be dense|shift|moe, got '" << s << "'");
  c.shift_share = share;
  c.router = true;
  return c;
}

LayerDesc convert_linear(LayerDesc L, const LinearChoice& c) {
  SAV_CHECK(is_linear(c.kind), "layer '" << L.name << "': a linear converts to linear_dense|linear_shift|linear_moe, got "
                                         << layer_kind_name(c.kind));
  SAV_CHECK(c.kind != LayerKind::linear_moe || (c.shift_share >= 0 && c.shift_share <= 1),
            "layer '" << L.name << "': shift_share is a fraction in [0,1], got " << c.shift_share);
  L.kind = c.kind;
  L.shift_share = c.kind == LayerKind::linear_moe ? c.shift_share : 0.0;
  L.router = c.kind == LayerKind::linear_moe && c.router;
  return L;
}

LayerDesc lin(std::string name, int64_t M, int64_t K, int64_t F) {
  LayerDesc L;
  L.name = std::move(name);
  L.kind = LayerKind::linear_dense;
  L.tokens = M;
  L.in = K;
  L.out = F;
  return L;
}
LayerDesc elem(std::string name, LayerKind kind, int64_t M, int64_t C) {
  LayerDesc L;
  L.name = std::move(name);
  L.kind = kind;
  L.tokens = M;
  L.in = L.out = C;
  return L;
}
LayerDesc attn_core(std::string name, int64_t N, int C, int heads) {
  LayerDesc a = elem(std::move(name), LayerKind::attn_softmax, N, C);
  a.heads = heads;
  a.head_dim = C / heads;
  return a;
}
int conv_out(int in, int k, int s, int pad) { return (in + 2 * pad - k) / s + 1; }

// The layers a block conversion treats alike in ViT and PVT: the attention core (softmax -> Hamming over all
// tokens), attn.proj, mlp.fc1, mlp.fc2; any other layer is kept as it is. `rest` is the name after the block.
LayerDesc convert_block_layer(LayerDesc L, const std::string& rest, const BlockChoice& ch) {
  if (rest == "attn.core") {
    L.kind = ch.attn;
    L.hash_bits = ch.hash_bits;
    L.anchors = ch.anchors;
    if (ch.attn == LayerKind::attn_hamming) L.kv_tokens = 0;  // no spatial reduction
    return L;
  }
  if (rest == "attn.proj") return convert_linear(L, ch.proj);
  if (rest == "mlp.fc1") return convert_linear(L, ch.fc1);
  if (rest == "mlp.fc2") return convert_linear(L, ch.fc2);
  return L;
}

// "blocks.{i}.rest" -> i and rest; false for other names.
bool split_block_name(const std::string& name, int& index, std::string& rest) {
  const std::string pre = "blocks.";
  if (name.rfind(pre, 0) != 0) return false;
  size_t dot = name.find('.', pre.size());
  if (dot == std::string::npos || dot == pre.size()) return false;
  const std::string num = name.substr(pre.size(), dot - pre.size());
  if (!std::all_of(num.begin(), num.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) return false;
  index = std::stoi(num);
  rest = name.substr(dot + 1);
  return true;
}

}  // namespace

const char* layer_kind_name(LayerKind kind) {
  for (const KindName& k : kKindNames)
    if (k.kind == kind) return k.name;
  SAV_THROW("layer_kind_name: invalid LayerKind value " << int(kind));
}

LayerKind layer_kind_from_name(const std::string& name) {
  for (const KindName& k : kKindNames)
    if (name == k.name) return k.kind;
  std::string all;
  for (const KindName& k : kKindNames) all += std::string(all.empty() ? "" : "|") + k.name;
  SAV_THROW("unknown layer kind '" << name << "'; expected one of " << all);
}

std::string energy_group(const LayerDesc& L) {
  switch (L.kind) {
    case LayerKind::patch_embed:
      return "patch embed";
    case LayerKind::attn_softmax:
    case LayerKind::attn_hamming:
      return "attention";
    case LayerKind::layernorm:
      return "layernorm";
    case LayerKind::gelu:
      return "gelu";
    case LayerKind::residual_add:
      return "residual add";
    case LayerKind::softmax_head:
    case LayerKind::mean_pool:
      return "head";
    case LayerKind::dwconv:
      return "mlp dwconv";
    default:
      break;
  }
  if (L.name.find("patch_embed") != std::string::npos || L.name.find("downsample") != std::string::npos)
    return "patch embed";
  if (L.name.find(".attn.") != std::string::npos) return "attn linears";
  if (L.name.find(".mlp.") != std::string::npos) return "mlp linears";
  if (L.name.find("head") != std::string::npos) return "head";
  return "other linears";
}

EnergyRow energy_layer(const LayerDesc& layer, const EnergyOptions& opt) {
  check_options(opt);
  check_layer(layer);
  EnergyRow row;
  row.name = layer.name;
  row.kind = layer_kind_name(layer.kind);
  row.group = energy_group(layer);
  count_layer(layer, opt, row);
  price_row(row, opt);
  return row;
}

EnergyReport energy_report(const std::vector<LayerDesc>& layers, const EnergyOptions& opt) {
  EnergyReport rep;
  rep.options = opt;
  rep.total.name = rep.total.kind = rep.total.group = "total";
  rep.layers.reserve(layers.size());
  for (const LayerDesc& L : layers) {
    rep.layers.push_back(energy_layer(L, opt));
    accumulate(rep.total, rep.layers.back());
  }
  return rep;
}

void print_energy_table(std::ostream& os, const EnergyReport& dense, const EnergyReport& converted) {
  // Groups in a fixed order, then any other group either report has.
  std::vector<std::string> order = {"patch embed", "attn linears", "attention", "mlp linears", "layernorm",
                                    "gelu",        "residual add", "head",      "other linears"};
  std::map<std::string, std::pair<EnergyRow, EnergyRow>> sums;
  for (const EnergyRow& r : dense.layers) accumulate(sums[r.group].first, r);
  for (const EnergyRow& r : converted.layers) accumulate(sums[r.group].second, r);
  for (auto& [g, _] : sums)
    if (std::find(order.begin(), order.end(), g) == order.end()) order.push_back(g);

  const double uj = 1e-6;  // pJ -> uJ
  Table t({"group", "dense compute uJ", "conv compute uJ", "saving", "dense total uJ", "conv total uJ",
           "saving"});
  for (const std::string& g : order) {
    auto it = sums.find(g);
    if (it == sums.end()) continue;
    const EnergyRow &a = it->second.first, &b = it->second.second;
    t.add({g, fmt(a.compute_pj * uj, 1), fmt(b.compute_pj * uj, 1), pct_saving(a.compute_pj, b.compute_pj),
           fmt(a.total_pj() * uj, 1), fmt(b.total_pj() * uj, 1), pct_saving(a.total_pj(), b.total_pj())});
  }
  const EnergyRow &A = dense.total, &B = converted.total;
  t.add({"total", fmt(A.compute_pj * uj, 1), fmt(B.compute_pj * uj, 1), pct_saving(A.compute_pj, B.compute_pj),
         fmt(A.total_pj() * uj, 1), fmt(B.total_pj() * uj, 1), pct_saving(A.total_pj(), B.total_pj())});
  t.print(os);

  // Totals by operation type and memory level.
  const double g = 1e-9, mw = 1e-6;
  Table u({"model", "MACs G", "mult fp32 G", "add fp32 G", "shift G", "add int32 G", "special M", "DRAM Mword",
           "compute uJ", "DRAM uJ", "buffer+NoC uJ", "RF uJ", "total uJ"});
  auto line = [&](const char* name, const EnergyRow& r) {
    u.add({name, fmt(r.macs * g, 3), fmt(r.mult_fp32 * g, 3), fmt(r.add_fp32 * g, 3), fmt(r.shift * g, 3),
           fmt(r.add_int32 * g, 3), fmt(r.special * mw, 3), fmt(r.dram_words * mw, 3), fmt(r.compute_pj * uj, 1),
           fmt(r.dram_pj * uj, 1), fmt((r.gb_pj + r.noc_pj) * uj, 1), fmt(r.rf_pj * uj, 1),
           fmt(r.total_pj() * uj, 1)});
  };
  line("dense", A);
  line("converted", B);
  os << "\n";
  u.print(os);
}

std::string energy_csv(const EnergyReport& report) {
  std::ostringstream os;
  os << std::setprecision(std::numeric_limits<double>::max_digits10);
  os << "name,kind,group";
  for (const Field& f : kFields) os << "," << f.name;
  os << "\n";
  auto row = [&](const EnergyRow& r) {
    os << csv_text(r.name) << "," << csv_text(r.kind) << "," << csv_text(r.group);
    for (const Field& f : kFields) os << "," << f.get(r);
    os << "\n";
  };
  for (const EnergyRow& r : report.layers) row(r);
  row(report.total);
  return os.str();
}

std::string energy_json(const EnergyReport& report) {
  const EnergyOptions& o = report.options;
  nlohmann::ordered_json j;
  j["options"] = {{"fp32_mult_pj", o.fp32_mult_pj},
                  {"fp32_add_pj", o.fp32_add_pj},
                  {"shift_pj", o.shift_pj},
                  {"int32_add_pj", o.int32_add_pj},
                  {"int32_mult_pj", o.int32_mult_pj},
                  {"int8_mult_pj", o.int8_mult_pj},
                  {"int8_add_pj", o.int8_add_pj},
                  {"int8_shift_pj", o.int8_shift_pj},
                  {"price_8bit", o.price_8bit},
                  {"special_pj", o.special_pj},
                  {"mem_unit_pj", o.mem_unit_pj},
                  {"dram_units", o.dram_units},
                  {"gb_units", o.gb_units},
                  {"noc_units", o.noc_units},
                  {"rf_units", o.rf_units},
                  {"act_bits", o.act_bits},
                  {"dense_weight_bits", o.dense_weight_bits},
                  {"shift_weight_bits", o.shift_weight_bits},
                  {"code_bits", o.code_bits},
                  {"weights_from_dram", o.weights_from_dram},
                  {"acts_in_dram", o.acts_in_dram},
                  {"matadd_density", o.matadd_density}};
  j["layers"] = nlohmann::ordered_json::array();
  for (const EnergyRow& r : report.layers) j["layers"].push_back(row_json(r));
  j["total"] = row_json(report.total);
  return j.dump(1);
}

std::vector<LayerDesc> vit_dense_layers(int img, int patch, int in_chans, int dim, int depth, int heads,
                                        int mlp_hidden, int classes) {
  SAV_CHECK(img > 0 && patch > 0 && img % patch == 0,
            "vit_dense_layers: img must be a positive multiple of patch, got " << img << " / " << patch);
  SAV_CHECK(in_chans > 0 && dim > 0 && depth > 0 && heads > 0 && mlp_hidden > 0 && classes > 0,
            "vit_dense_layers: sizes must be positive (in_chans " << in_chans << ", dim " << dim << ", depth "
                                                                  << depth << ", heads " << heads << ", mlp "
                                                                  << mlp_hidden << ", classes " << classes << ")");
  SAV_CHECK(dim % heads == 0, "vit_dense_layers: dim " << dim << " is not a multiple of heads " << heads);
  const int64_t patches = int64_t(img / patch) * (img / patch), N = patches + 1;  // + class token
  std::vector<LayerDesc> v;
  LayerDesc pe = lin("patch_embed", patches, int64_t(in_chans) * patch * patch, dim);
  pe.kind = LayerKind::patch_embed;
  v.push_back(pe);
  for (int i = 0; i < depth; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    v.push_back(elem(p + "norm1", LayerKind::layernorm, N, dim));
    v.push_back(lin(p + "attn.qkv", N, dim, 3 * int64_t(dim)));
    v.push_back(attn_core(p + "attn.core", N, dim, heads));
    v.push_back(lin(p + "attn.proj", N, dim, dim));
    v.push_back(elem(p + "add1", LayerKind::residual_add, N, dim));
    v.push_back(elem(p + "norm2", LayerKind::layernorm, N, dim));
    v.push_back(lin(p + "mlp.fc1", N, dim, mlp_hidden));
    v.push_back(elem(p + "mlp.act", LayerKind::gelu, N, mlp_hidden));
    v.push_back(lin(p + "mlp.fc2", N, mlp_hidden, dim));
    v.push_back(elem(p + "add2", LayerKind::residual_add, N, dim));
  }
  v.push_back(elem("norm", LayerKind::layernorm, N, dim));  // timm normalises every token
  v.push_back(lin("head", 1, dim, classes));                // on the class token only
  return v;
}

std::vector<LayerDesc> vit_convert_layers(const std::vector<LayerDesc>& dense,
                                          const std::vector<BlockChoice>& blocks) {
  SAV_CHECK(!blocks.empty(), "vit_convert_layers: give one BlockChoice per block, or one for all blocks");
  int depth = 0;
  for (const LayerDesc& L : dense) {
    int i;
    std::string rest;
    if (split_block_name(L.name, i, rest)) depth = std::max(depth, i + 1);
  }
  SAV_CHECK(depth > 0, "vit_convert_layers: no 'blocks.{i}.' layers in the list (use vit_dense_layers)");
  SAV_CHECK(blocks.size() == 1 || int(blocks.size()) == depth,
            "vit_convert_layers: " << blocks.size() << " block choices for " << depth << " blocks");
  std::vector<LayerDesc> out;
  out.reserve(dense.size() + depth);
  for (const LayerDesc& L : dense) {
    int i;
    std::string rest;
    if (!split_block_name(L.name, i, rest)) {
      out.push_back(L);
      continue;
    }
    const BlockChoice& ch = blocks.size() == 1 ? blocks[0] : blocks[size_t(i)];
    SAV_CHECK(ch.attn == LayerKind::attn_softmax || ch.attn == LayerKind::attn_hamming,
              "vit_convert_layers: block " << i << " attention must be attn_softmax|attn_hamming, got "
                                           << layer_kind_name(ch.attn));
    const std::string p = "blocks." + std::to_string(i) + ".";
    if (rest == "attn.qkv") {
      SAV_CHECK(is_linear(L.kind) && L.out == 3 * L.in,
                "vit_convert_layers: '" << L.name << "' must be a C -> 3C linear, got " << L.in << " -> " << L.out);
      if (ch.attn == LayerKind::attn_hamming) {
        // Hamming attention shares one query/key projection: qkv (C -> 3C) becomes to_qk and to_v.
        LayerDesc qk = L, vv = L;
        qk.name = p + "attn.to_qk";
        vv.name = p + "attn.to_v";
        qk.out = vv.out = L.in;
        out.push_back(convert_linear(qk, ch.qkv));
        out.push_back(convert_linear(vv, ch.qkv));
      } else {
        out.push_back(convert_linear(L, ch.qkv));
      }
    } else {
      out.push_back(convert_block_layer(L, rest, ch));
    }
  }
  return out;
}

std::vector<LayerDesc> vit_converted_layers(const std::vector<LayerDesc>& dense, const std::string& attn,
                                            const std::string& mlp, double shift_share,
                                            const std::string& attn_linears) {
  SAV_CHECK(shift_share >= 0 && shift_share <= 1,
            "vit_converted_layers: shift_share is a fraction in [0,1], got " << shift_share);
  BlockChoice ch;
  if (attn == "hamming")
    ch.attn = LayerKind::attn_hamming;
  else if (attn == "softmax")
    ch.attn = LayerKind::attn_softmax;
  else
    SAV_THROW("vit_converted_layers: attn must be hamming|softmax, got '" << attn << "'");
  ch.fc1 = ch.fc2 = parse_linear_choice(mlp, shift_share, "mlp");
  ch.qkv = ch.proj = parse_linear_choice(attn_linears, shift_share, "attn_linears");
  return vit_convert_layers(dense, {ch});
}

std::vector<LayerDesc> pvt_dense_layers(const PvtGeometry& g) {
  const size_t S = g.dims.size();
  SAV_CHECK(S > 0 && g.heads.size() == S && g.depths.size() == S && g.sr.size() == S && g.mlp_ratios.size() == S,
            "pvt_dense_layers: dims, heads, depths, sr and mlp_ratios need one entry per stage");
  SAV_CHECK(g.img > 0 && g.in_chans > 0 && g.classes > 0 && g.stem_patch > 0 && g.stem_stride > 0,
            "pvt_dense_layers: sizes must be positive");
  std::vector<LayerDesc> v;
  int side = g.img, cin = g.in_chans;
  for (size_t s = 0; s < S; ++s) {
    const int C = g.dims[s], k = s == 0 ? g.stem_patch : 3, st = s == 0 ? g.stem_stride : 2;
    SAV_CHECK(C > 0 && g.heads[s] > 0 && C % g.heads[s] == 0 && g.sr[s] >= 1 && g.mlp_ratios[s] > 0,
              "pvt_dense_layers: impossible stage " << s);
    const int grid = conv_out(side, k, st, k / 2);
    SAV_CHECK(grid >= 1, "pvt_dense_layers: image too small for stage " << s);
    const int64_t N = int64_t(grid) * grid, F = int64_t(C) * g.mlp_ratios[s];
    const std::string e = s == 0 ? "patch_embed." : "stages." + std::to_string(s) + ".downsample.";
    v.push_back(lin(e + "proj", N, int64_t(cin) * k * k, C));  // overlapping conv == linear on im2col rows
    v.push_back(elem(e + "norm", LayerKind::layernorm, N, C));
    const int r = g.sr[s], kvg = r > 1 ? conv_out(grid, r, r, 0) : grid;
    SAV_CHECK(kvg >= 1, "pvt_dense_layers: stage " << s << " grid " << grid << " is smaller than sr " << r);
    const int64_t Nk = int64_t(kvg) * kvg;
    for (int i = 0; i < g.depths[s]; ++i) {
      const std::string p = "stages." + std::to_string(s) + ".blocks." + std::to_string(i) + ".";
      v.push_back(elem(p + "norm1", LayerKind::layernorm, N, C));
      v.push_back(lin(p + "attn.q", N, C, C));
      if (r > 1) {
        v.push_back(lin(p + "attn.sr", Nk, int64_t(C) * r * r, C));
        v.push_back(elem(p + "attn.norm", LayerKind::layernorm, Nk, C));
      }
      v.push_back(lin(p + "attn.kv", Nk, C, 2 * int64_t(C)));
      LayerDesc a = attn_core(p + "attn.core", N, C, g.heads[s]);
      a.kv_tokens = Nk;
      v.push_back(a);
      v.push_back(lin(p + "attn.proj", N, C, C));
      v.push_back(elem(p + "add1", LayerKind::residual_add, N, C));
      v.push_back(elem(p + "norm2", LayerKind::layernorm, N, C));
      v.push_back(lin(p + "mlp.fc1", N, C, F));
      LayerDesc dw = elem(p + "mlp.dwconv", LayerKind::dwconv, N, F);
      dw.out = 9;
      v.push_back(dw);
      v.push_back(elem(p + "mlp.act", LayerKind::gelu, N, F));
      v.push_back(lin(p + "mlp.fc2", N, F, C));
      v.push_back(elem(p + "add2", LayerKind::residual_add, N, C));
    }
    v.push_back(elem("stages." + std::to_string(s) + ".norm", LayerKind::layernorm, N, C));
    if (s + 1 == S) {
      v.push_back(elem("pool", LayerKind::mean_pool, N, C));
      v.push_back(lin("head", 1, C, g.classes));
    }
    side = grid, cin = C;
  }
  return v;
}

std::vector<LayerDesc> pvt_convert_layers(const std::vector<LayerDesc>& dense, const std::vector<BlockChoice>& stages) {
  SAV_CHECK(!stages.empty(), "pvt_convert_layers: give one BlockChoice per stage, or one for all stages");
  std::vector<LayerDesc> out;
  for (const LayerDesc& L : dense) {
    // "stages.{s}.blocks.{i}.rest"
    int s = -1;
    std::string rest;
    const std::string pre = "stages.";
    if (L.name.rfind(pre, 0) == 0) {
      const size_t dot = L.name.find('.', pre.size());
      const size_t blk = L.name.find(".blocks.", pre.size());
      if (dot != std::string::npos && blk == dot) {
        s = std::stoi(L.name.substr(pre.size(), dot - pre.size()));
        const size_t after = L.name.find('.', blk + 8);
        rest = after == std::string::npos ? "" : L.name.substr(after + 1);
      }
    }
    if (s < 0) {
      out.push_back(L);
      continue;
    }
    SAV_CHECK(stages.size() == 1 || size_t(s) < stages.size(),
              "pvt_convert_layers: no choice for stage " << s << " (" << stages.size() << " given)");
    const BlockChoice& ch = stages.size() == 1 ? stages[0] : stages[size_t(s)];
    const bool ham = ch.attn == LayerKind::attn_hamming;
    const std::string p = L.name.substr(0, L.name.size() - rest.size());
    if (rest == "attn.q") {
      LayerDesc q = L;
      if (ham) q.name = p + "attn.to_qk";
      out.push_back(convert_linear(q, ch.qkv));
    } else if (rest == "attn.sr" || rest == "attn.norm") {
      if (!ham) out.push_back(L);  // Hamming attention runs over all tokens: no spatial reduction
    } else if (rest == "attn.kv") {
      if (ham) {
        LayerDesc vv = L;  // only the value half survives, on all N tokens
        vv.name = p + "attn.to_v";
        vv.out = L.in;
        vv.tokens = out.back().tokens;  // the to_qk row count (N)
        out.push_back(convert_linear(vv, ch.qkv));
      } else {
        out.push_back(convert_linear(L, ch.qkv));
      }
    } else {
      out.push_back(convert_block_layer(L, rest, ch));
    }
  }
  return out;
}

}  // namespace sav
