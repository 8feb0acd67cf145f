// shiftaddvit: operation counts and the energy model (METHOD.md section 5; the paper's "42.9% less energy").
//
// Works on a plain description of the layers (no model classes): per layer and per image it counts
// multiplications, additions, shifts and special functions by precision, the bytes of weights and
// activations moved, and prices them with 45 nm unit energies (Horowitz, ISSCC 2014) and an Eyeriss-style
// memory hierarchy. All formulas are written next to their code in energy.cpp.
//
//   auto dense = sav::vit_dense_layers(224, 16, 3, 192, 12, 3, 768, 1000);      // deit_tiny_patch16_224
//   auto conv  = sav::vit_converted_layers(dense, "hamming", "moe", 0.5);       // ShiftAddViT
//   sav::EnergyReport a = sav::energy_report(dense), b = sav::energy_report(conv);
//   sav::print_energy_table(std::cout, a, b);          // per group and total, compute-only and with memory
//   std::string js = sav::energy_json(b), cs = sav::energy_csv(b);
//
// Shape legend: M = LayerDesc::tokens rows (tokens of ONE image: every count is per image), K = in,
// F = out, C = width (layernorm/gelu/add: in), N tokens, H heads, d head_dim, b hash_bits, m anchors.
//
// Counting conventions (full list in energy.cpp):
//  - a dot product of length K with a bias costs K mults and K adds (K-1 accumulations + the bias add);
//    without a bias K mults and K-1 adds. Float<->fixed-point conversions at a shift layer's edges and
//    index bookkeeping (token gather/scatter, reshapes, class-token concat) are free.
//  - "special" counts transcendental or divide-like functions (exp, erf, sqrt, reciprocal/divide), each
//    priced at special_pj (default: a degree-4 polynomial, 4 fp32 mults + 4 fp32 adds = 18.4 pJ).
//  - compares (max, argmax) count as fp32 adds; a sign test (code = y > 0) is free (the sign bit).
//  - dense engine: fp32 arithmetic. Shift layers (the MatShift kernel, the MoE shift expert): one shift
//    and one int32 add per weight on Q16.16 fixed-point activations, the bias added as an int32.
//    MatAdd (Hamming attention's code^T V and code KV): fp32 additions only (V stays fp32).
//
// Memory model (explicit, simple; word = 16 bits, one unit = one fp32 mult = mem_unit_pj):
//  - weights (and biases, KSH buffers, position table) are read from DRAM once per image: DRAM 200 units
//    per word; dense weights 32-bit, shift weights 5-bit codes (sign + exponent, packed), biases 32-bit;
//  - activations: every layer reads its inputs from and writes its outputs to the global buffer (6 units
//    per word), 32-bit (fp32, or Q16.16 int32 for shift layers); an intermediate tensor the layer
//    materialises (softmax attention's H*N*N probabilities; Hamming attention's 1-bit codes and its
//    (H,b,d) KV) is written to and read back from the global buffer once;
//    with acts_in_dram = true inputs/outputs go to DRAM instead (intermediates stay in the buffer);
//  - everything moved between a buffer/DRAM and the PE array crosses the NoC once (2 units per word);
//  - the register file (1 unit per word) supplies the operands: each product of a dot product (MAC, shift-
//    accumulate) reads its two operands (activation + weight/code, or two activations); a MatAdd addition
//    reads one 32-bit value and one code bit; every other binary op reads two operands of its precision,
//    every special function one. Partial sums stay in the PE's accumulator (not priced).
//  The release (pvt/hw_utils.py) instead searches Eyeriss tilings per layer, prices DRAM at 200 pJ per
//  word (not 200 x 3.7), gives MatAdd no DRAM/buffer traffic, and prices ALL memory traffic of a shift
//  layer (activations too) at (16+5)//2 = 10 bits per value; its compute prices a MAC at the mult's (or
//  shift's, or add's) energy alone, and ignores layernorm, GELU and softmax energy. We follow the
//  explicit model above (5-bit weight codes, 32-bit activations, every op priced); see energy.cpp.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace sav {

enum class LayerKind {
  linear_dense,   // y = x W^T + b, fp32: (M,K) -> (M,F)
  linear_shift,   // MatShift: W = sign * 2^p (5-bit), shifts + int32 adds on fixed-point activations
  linear_moe,     // top-1 mixture of a dense and a shift expert (+ optional router)
  attn_softmax,   // softmax(q k^T * d^-0.5) v core, q k v (N,C) from a fused qkv linear -> (N,C)
  attn_hamming,   // METHOD.md section 1 core: KSH hash + two MatAdds + normalisations + DWConv9 -> (N,C)
  layernorm,      // (M,C) -> (M,C), affine
  gelu,           // (M,C) -> (M,C), erf form
  residual_add,   // (M,C) + (M,C) -> (M,C)
  patch_embed,    // conv p x p stride p == linear on patches: tokens = patches, in = in_chans*p*p, out = C
  softmax_head,   // optional: softmax over in (= out) classes for each of the M rows
  dwconv,         // depthwise k x k conv with bias over a token grid: M tokens, in = channels, out = k*k taps
  mean_pool,      // mean over the M tokens of width in -> one row (PVT's head input)
};

const char* layer_kind_name(LayerKind kind);  // "linear_dense", ...
LayerKind layer_kind_from_name(const std::string& name);  // throws on an unknown name

struct LayerDesc {
  std::string name;         // e.g. "blocks.3.mlp.fc1"
  LayerKind kind = LayerKind::linear_dense;
  int64_t tokens = 0;       // rows M (tokens per image: the energy is per image)
  int64_t in = 0, out = 0;  // linear K, F; layernorm/gelu/add/softmax_head: width C (in; out ignored)
  int heads = 0, head_dim = 0, hash_bits = 16, anchors = 25;  // attention
  int64_t kv_tokens = 0;    // attn_softmax: keys/values after a spatial reduction (0: = tokens)
  double shift_share = 0;   // linear_moe: fraction of tokens routed to the shift expert (0..1)
  bool router = false;      // linear_moe: count the router (K->2 linear + softmax + argmax + gate scale)
};

struct EnergyOptions {
  // Compute, pJ per operation (45 nm; Horowitz ISSCC 2014; the shift from DeepShift/ShiftAddNet).
  double fp32_mult_pj = 3.7, fp32_add_pj = 0.9, shift_pj = 0.13;
  double int32_add_pj = 0.1, int32_mult_pj = 3.1;
  double int8_mult_pj = 0.2, int8_add_pj = 0.03, int8_shift_pj = 0.024;
  bool price_8bit = false;            // price every mult/add/shift at the 8-bit energies (release num_bits=8)
  double special_pj = 4 * 3.7 + 4 * 0.9;  // exp/erf/sqrt/divide: degree-4 polynomial (Horner) = 18.4 pJ
  // Memory: energy per 16-bit word = units * mem_unit_pj (one unit = one fp32 mult).
  double mem_unit_pj = 3.7;
  double dram_units = 200, gb_units = 6, noc_units = 2, rf_units = 1;
  int act_bits = 32;                  // activations (fp32, or Q16.16 int32 in shift layers)
  int dense_weight_bits = 32;         // dense weights, biases, KSH buffers, position table
  int shift_weight_bits = 5;          // packed shift weight codes (sign + exponent)
  int code_bits = 1;                  // Hamming codes
  bool weights_from_dram = true;      // weights read from DRAM once per image (false: not priced)
  bool acts_in_dram = false;          // layer inputs/outputs in DRAM instead of the global buffer
  double matadd_density = 1.0;        // fraction of code bits that are 1 (an ungated MatAdd array: 1.0)
};

// Counts and energies of one layer (or a total), per image. Counts are doubles: MoE shares are expected
// token counts, and a deit_base image needs more than 2^31 ops.
struct EnergyRow {
  std::string name, kind, group;  // group: energy_group(); totals: kind = group = "total"
  double mult_fp32 = 0, add_fp32 = 0, mult_int32 = 0, add_int32 = 0, shift = 0, special = 0;
  double macs = 0;                // products in dot products (mult- or shift-accumulate), dense or shift
  double weight_bytes = 0, act_in_bytes = 0, act_out_bytes = 0, inter_bytes = 0;  // inter: written once
  double dram_words = 0, gb_words = 0, noc_words = 0, rf_words = 0;               // 16-bit words moved
  double compute_pj = 0, dram_pj = 0, gb_pj = 0, noc_pj = 0, rf_pj = 0;
  double memory_pj() const { return dram_pj + gb_pj + noc_pj + rf_pj; }
  double total_pj() const { return compute_pj + memory_pj(); }
};

struct EnergyReport {
  EnergyOptions options;
  std::vector<EnergyRow> layers;
  EnergyRow total;  // sum over layers
};

// Counts and prices every layer; throws on an invalid layer or option (sizes <= 0, share outside [0,1]).
EnergyReport energy_report(const std::vector<LayerDesc>& layers, const EnergyOptions& opt = {});
// Counts and prices one layer.
EnergyRow energy_layer(const LayerDesc& layer, const EnergyOptions& opt = {});

// Group used in the comparison table: "patch embed", "attn linears", "attention", "mlp linears",
// "mlp dwconv", "layernorm", "gelu", "residual add", "head".
std::string energy_group(const LayerDesc& layer);

// Per-group and total comparison, compute-only and with memory, savings vs `dense` in %.
void print_energy_table(std::ostream& os, const EnergyReport& dense, const EnergyReport& converted);
// One header line, one line per layer, a last line named "total". Numbers round-trip (17 digits).
std::string energy_csv(const EnergyReport& report);
// {"options": {...}, "layers": [{...}], "total": {...}}; a row's fields as EnergyRow (+ memory_pj, total_pj).
std::string energy_json(const EnergyReport& report);

// Dense DeiT/ViT geometry (class token, learned position table, pre-norm blocks, head on the class token),
// timm names: patch_embed, pos_embed, blocks.{i}.{norm1, attn.qkv, attn.core, attn.proj, add1, norm2,
// mlp.fc1, mlp.act, mlp.fc2, add2}, norm, head. deit_tiny_patch16_224: (224, 16, 3, 192, 12, 3, 768, 1000).
std::vector<LayerDesc> vit_dense_layers(int img, int patch, int in_chans, int dim, int depth, int heads,
                                        int mlp_hidden, int classes);

// How one linear of a block is converted.
struct LinearChoice {
  LayerKind kind = LayerKind::linear_dense;  // linear_dense | linear_shift | linear_moe
  double shift_share = 0;                    // linear_moe only
  bool router = true;                        // linear_moe only
};
// Per-block choices. With attn = attn_hamming the fused qkv (C -> 3C) becomes to_qk and to_v (C -> C each,
// both converted as `qkv`), and the core becomes Hamming attention with hash_bits / anchors.
struct BlockChoice {
  LayerKind attn = LayerKind::attn_softmax;  // attn_softmax | attn_hamming
  LinearChoice qkv, proj, fc1, fc2;
  int hash_bits = 16, anchors = 25;
};
// Converts the blocks of a vit_dense_layers() list; `blocks` has one entry per block, or one for all.
std::vector<LayerDesc> vit_convert_layers(const std::vector<LayerDesc>& dense,
                                          const std::vector<BlockChoice>& blocks);
// Same choice for every block: attn "hamming"|"softmax"; mlp (fc1, fc2) and attn_linears (qkv or
// to_qk/to_v, proj) each "dense"|"shift"|"moe"; shift_share for every MoE linear (router counted).
std::vector<LayerDesc> vit_converted_layers(const std::vector<LayerDesc>& dense, const std::string& attn,
                                            const std::string& mlp, double shift_share,
                                            const std::string& attn_linears = "dense");

// Dense PVTv2 geometry, timm names: patch_embed.proj (conv k7 s4 as a linear on im2col rows, stage 0) or
// stages.{s}.downsample.proj (k3 s2), .norm; stages.{s}.blocks.{i}.{norm1, attn.q, attn.sr (conv k=s=sr as
// a linear), attn.norm, attn.kv, attn.core (softmax over the reduced tokens), attn.proj, add1, norm2,
// mlp.fc1, mlp.dwconv, mlp.act, mlp.fc2, add2}; stages.{s}.norm; pool; head. Square images.
struct PvtGeometry {
  int img = 224, in_chans = 3, classes = 1000, stem_patch = 7, stem_stride = 4;
  std::vector<int> dims, heads, depths, sr, mlp_ratios;
};
std::vector<LayerDesc> pvt_dense_layers(const PvtGeometry& g);
// Per stage (one entry per stage, or one for all): Hamming attention takes to_qk (from q) and to_v (the
// value half of kv) over all tokens and drops attn.sr, attn.norm and the key half; linears as for ViT
// (BlockChoice::qkv applies to q/kv or to_qk/to_v).
std::vector<LayerDesc> pvt_convert_layers(const std::vector<LayerDesc>& dense, const std::vector<BlockChoice>& stages);

}  // namespace sav
