// Tests of the op-count and energy model (src/energy/energy.h): hand-computed counts for small layers,
// MoE limits, savings, CSV/JSON round trips and the deit_tiny MAC count.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "energy/energy.h"

namespace {

using sav::EnergyOptions;
using sav::EnergyRow;
using sav::LayerDesc;
using sav::LayerKind;

LayerDesc linear(LayerKind kind, int64_t M, int64_t K, int64_t F, double share = 0, bool router = false) {
  LayerDesc L;
  L.name = "blocks.0.mlp.fc1";
  L.kind = kind;
  L.tokens = M;
  L.in = K;
  L.out = F;
  L.shift_share = share;
  L.router = router;
  return L;
}

LayerDesc attention(LayerKind kind, int64_t N, int H, int d, int b = 16, int m = 25) {
  LayerDesc L;
  L.name = "blocks.0.attn.core";
  L.kind = kind;
  L.tokens = N;
  L.heads = H;
  L.head_dim = d;
  L.hash_bits = b;
  L.anchors = m;
  return L;
}

// Relative comparison for counts/energies that are sums of doubles (exact integers in most cases).
void expect_close(double got, double want, const char* what, double rel = 1e-12) {
  EXPECT_NEAR(got, want, rel * std::max(1.0, std::fabs(want))) << what;
}

void expect_same_counts(const EnergyRow& a, const EnergyRow& b, const char* what) {
  expect_close(a.mult_fp32, b.mult_fp32, what);
  expect_close(a.add_fp32, b.add_fp32, what);
  expect_close(a.mult_int32, b.mult_int32, what);
  expect_close(a.add_int32, b.add_int32, what);
  expect_close(a.shift, b.shift, what);
  expect_close(a.special, b.special, what);
  expect_close(a.macs, b.macs, what);
  expect_close(a.weight_bytes, b.weight_bytes, what);
  expect_close(a.act_in_bytes, b.act_in_bytes, what);
  expect_close(a.act_out_bytes, b.act_out_bytes, what);
  expect_close(a.rf_words, b.rf_words, what);
  expect_close(a.compute_pj, b.compute_pj, what);
  expect_close(a.total_pj(), b.total_pj(), what);
}

// Linear M=3, K=5, F=7 with bias: 21 outputs, each 5 products, 4 accumulations + 1 bias add.
TEST(EnergyLinear, DenseHandCounts) {
  EnergyRow r = sav::energy_layer(linear(LayerKind::linear_dense, 3, 5, 7));
  EXPECT_EQ(r.mult_fp32, 105);  // 3*7*5
  EXPECT_EQ(r.add_fp32, 105);   // 3*7*(4+1)
  EXPECT_EQ(r.shift, 0);
  EXPECT_EQ(r.add_int32, 0);
  EXPECT_EQ(r.special, 0);
  EXPECT_EQ(r.macs, 105);
  EXPECT_EQ(r.weight_bytes, (35 + 7) * 4);  // W (7,5) + bias, fp32
  EXPECT_EQ(r.act_in_bytes, 15 * 4);
  EXPECT_EQ(r.act_out_bytes, 21 * 4);
  EXPECT_EQ(r.dram_words, 84);             // 42 fp32 weights = 84 16-bit words
  EXPECT_EQ(r.gb_words, (15 + 21) * 2);    // activations in + out
  EXPECT_EQ(r.noc_words, 84 + 72);
  EXPECT_EQ(r.rf_words, 105 * 4 + 21 * 2);  // 2 fp32 operands per product + the bias per output
  expect_close(r.compute_pj, 105 * 3.7 + 105 * 0.9, "compute");
  expect_close(r.memory_pj(), 3.7 * (200 * 84 + 6 * 72 + 2 * 156 + 1 * 462), "memory");  // 66622.2
}

TEST(EnergyLinear, ShiftHandCounts) {
  EnergyRow r = sav::energy_layer(linear(LayerKind::linear_shift, 3, 5, 7));
  EXPECT_EQ(r.mult_fp32, 0);
  EXPECT_EQ(r.add_fp32, 0);
  EXPECT_EQ(r.shift, 105);
  EXPECT_EQ(r.add_int32, 105);
  EXPECT_EQ(r.macs, 105);
  EXPECT_EQ(r.weight_bytes, (35 * 5 + 7 * 32) / 8.0);  // 5-bit codes + fp32 bias
  EXPECT_EQ(r.dram_words, (35 * 5 + 7 * 32) / 16.0);
  EXPECT_EQ(r.rf_words, 105 * (2 + 5.0 / 16) + 21 * 2);
  expect_close(r.compute_pj, 105 * 0.13 + 105 * 0.1, "compute");
  // 8-bit pricing swaps the unit energies only.
  EnergyOptions o8;
  o8.price_8bit = true;
  expect_close(sav::energy_layer(linear(LayerKind::linear_shift, 3, 5, 7), o8).compute_pj,
               105 * 0.024 + 105 * 0.03, "8-bit compute");
}

// Softmax attention, N=4 tokens, H=2 heads, d=3.
TEST(EnergyAttention, SoftmaxHandCounts) {
  EnergyRow r = sav::energy_layer(attention(LayerKind::attn_softmax, 4, 2, 3));
  // q scale 2*4*3 = 24 mults; q k^T 2*4*4 outputs x 3 = 96 mults, x 2 = 64 adds;
  // softmax 8 rows of 4: adds 8*(3*4-2) = 80, mults 8*4 = 32, special 8*(4+1) = 40;
  // P v 2*4*3 outputs x 4 = 96 mults, x 3 = 72 adds.
  EXPECT_EQ(r.mult_fp32, 24 + 96 + 32 + 96);
  EXPECT_EQ(r.add_fp32, 64 + 80 + 72);
  EXPECT_EQ(r.special, 40);
  EXPECT_EQ(r.macs, 96 + 96);
  EXPECT_EQ(r.act_in_bytes, 3 * 4 * 6 * 4);  // q, k, v (4 tokens x 6 channels)
  EXPECT_EQ(r.act_out_bytes, 4 * 6 * 4);
  EXPECT_EQ(r.inter_bytes, 2 * 4 * 4 * 4);   // probabilities (2,4,4) fp32
  EXPECT_EQ(r.weight_bytes, 0);
  EXPECT_EQ(r.gb_words, (72 + 24) * 2 + 2 * 32 * 2);
  // RF: scale 24*4, q k^T 96*4, softmax adds 80*4 + mults 32*4 + special 40*2, P v 96*4.
  EXPECT_EQ(r.rf_words, 96 + 384 + 320 + 128 + 80 + 384);
  expect_close(r.compute_pj, 248 * 3.7 + 216 * 0.9 + 40 * (4 * 3.7 + 4 * 0.9), "compute");
}

// Hamming attention, N=4, H=2, d=3, b=2 bits, m=3 anchors, every code bit set (density 1).
TEST(EnergyAttention, HammingHandCounts) {
  EnergyRow r = sav::energy_layer(attention(LayerKind::attn_hamming, 4, 2, 3, 2, 3));
  // Per step (H*N = 8 rows of d = 3; H*N*m = 24 (token, anchor) pairs; H*N*b = 16 (token, bit) pairs):
  //  q normalise:   mults 8*6 = 48,  adds 8*2 = 16,           special 16
  //  D:             mults 24*3 = 72, adds 24*(3+2) = 120
  //  sigma:         mults 2,         adds 2*(4*3-1) = 22,      special 2
  //  k:             mults 24,        adds 24,                  special 24 (exp)
  //  y = A k:       mults 16*3 = 48, adds 16*2 = 32
  //  KV = code^T V:                  adds 2*2*3*4 = 48
  //  code KV:                        adds 2*4*3*2 = 48
  //  z:             mults 2*24 = 48, adds 24
  //  z normalise:   mults 48,        adds 16,                  special 16
  //  DWConv9 + add: mults 24*9 = 216, adds 24*8 + 24 = 216
  EXPECT_EQ(r.mult_fp32, 48 + 72 + 2 + 24 + 48 + 48 + 48 + 216);
  EXPECT_EQ(r.add_fp32, 16 + 120 + 22 + 24 + 32 + 48 + 48 + 24 + 16 + 216);
  EXPECT_EQ(r.special, 16 + 2 + 24 + 16);
  EXPECT_EQ(r.shift, 0);
  EXPECT_EQ(r.macs, 48 + 216);  // KSH projection + DWConv products
  // anchors 2*3*3 + mu 2*3 + A 2*2*3 + conv 2*9 = 54 fp32 values.
  EXPECT_EQ(r.weight_bytes, 54 * 4);
  EXPECT_EQ(r.act_in_bytes, 2 * 4 * 6 * 4);
  EXPECT_EQ(r.act_out_bytes, 4 * 6 * 4);
  EXPECT_EQ(r.inter_bytes, 2 * 4 * 2 / 8.0 + 2 * 2 * 3 * 4);  // 1-bit codes + KV fp32
  // Half the code bits set: the two MatAdds cost half.
  EnergyOptions half;
  half.matadd_density = 0.5;
  EXPECT_EQ(sav::energy_layer(attention(LayerKind::attn_hamming, 4, 2, 3, 2, 3), half).add_fp32,
            r.add_fp32 - 48);
}

// MoE at share 0 is the dense linear plus the router; at share 1 the shift linear plus the router.
TEST(EnergyMoe, LimitsAreDenseOrShiftPlusRouter) {
  const int64_t M = 13, K = 7, F = 5;
  EnergyRow dense = sav::energy_layer(linear(LayerKind::linear_dense, M, K, F));
  EnergyRow shift = sav::energy_layer(linear(LayerKind::linear_shift, M, K, F));
  expect_same_counts(sav::energy_layer(linear(LayerKind::linear_moe, M, K, F, 0.0, false)), dense, "moe s=0");
  expect_same_counts(sav::energy_layer(linear(LayerKind::linear_moe, M, K, F, 1.0, false)), shift, "moe s=1");

  // Router by hand: logits 2MK mults + 2MK adds; softmax over 2: 2 mults, 4 adds, 3 specials per token;
  // argmax 1 add per token; gate scaling MF mults. Weights (2K + 2) fp32.
  const double r_mult = 2 * M * K + 2 * M + M * F, r_add = 2 * M * K + 4 * M + M, r_special = 3 * M;
  for (double s : {0.0, 1.0}) {
    const EnergyRow& base = s == 0 ? dense : shift;
    EnergyRow moe = sav::energy_layer(linear(LayerKind::linear_moe, M, K, F, s, true));
    expect_close(moe.mult_fp32, base.mult_fp32 + r_mult, "router mults");
    expect_close(moe.add_fp32, base.add_fp32 + r_add, "router adds");
    expect_close(moe.special, base.special + r_special, "router specials");
    expect_close(moe.shift, base.shift, "shifts");
    expect_close(moe.add_int32, base.add_int32, "int adds");
    expect_close(moe.weight_bytes, base.weight_bytes + (2 * K + 2) * 4, "router weights");
    expect_close(moe.act_in_bytes, base.act_in_bytes, "input read once");
  }
  // In between: both experts' weights are read, arithmetic interpolates linearly.
  EnergyRow mid = sav::energy_layer(linear(LayerKind::linear_moe, M, K, F, 0.3, false));
  expect_close(mid.mult_fp32, 0.7 * dense.mult_fp32, "mid mults");
  expect_close(mid.shift, 0.3 * shift.shift, "mid shifts");
  expect_close(mid.compute_pj, 0.7 * dense.compute_pj + 0.3 * shift.compute_pj, "mid compute");
  expect_close(mid.weight_bytes, dense.weight_bytes + shift.weight_bytes, "mid weights");
}

TEST(EnergyModel, DenseVsAllShiftSavings) {
  auto dense = sav::vit_dense_layers(32, 8, 3, 48, 2, 3, 96, 10);
  auto shift = sav::vit_converted_layers(dense, "softmax", "shift", 0.0, "shift");
  auto a = sav::energy_report(dense), b = sav::energy_report(shift);
  const double sc = 1 - b.total.compute_pj / a.total.compute_pj;
  const double st = 1 - b.total.total_pj() / a.total.total_pj();
  EXPECT_GT(sc, 0.0);
  EXPECT_LT(sc, 1.0);
  EXPECT_GT(st, 0.0);
  EXPECT_LT(st, 1.0);
  // Same geometry: the same number of products, moved to shifts (all linears but the patch embed and
  // the head, which stay dense).
  EXPECT_EQ(a.total.macs, b.total.macs);
  EXPECT_GT(b.total.shift, 0);
  EXPECT_LT(b.total.weight_bytes, a.total.weight_bytes);
}

TEST(EnergyModel, ConvertedStructure) {
  auto dense = sav::vit_dense_layers(32, 8, 3, 48, 2, 3, 96, 10);
  auto conv = sav::vit_converted_layers(dense, "hamming", "moe", 0.7);
  ASSERT_EQ(conv.size(), dense.size() + 2);  // qkv -> to_qk + to_v in each of 2 blocks
  int hamming = 0, moe = 0, to_qk = 0;
  for (const LayerDesc& L : conv) {
    hamming += L.kind == LayerKind::attn_hamming;
    if (L.kind == LayerKind::linear_moe) {
      ++moe;
      EXPECT_EQ(L.shift_share, 0.7);
      EXPECT_TRUE(L.router);
      EXPECT_NE(L.name.find(".mlp."), std::string::npos) << L.name;
    }
    if (L.name == "blocks.1.attn.to_qk") {
      ++to_qk;
      EXPECT_EQ(L.in, 48);
      EXPECT_EQ(L.out, 48);
      EXPECT_EQ(L.kind, LayerKind::linear_dense);
    }
  }
  EXPECT_EQ(hamming, 2);
  EXPECT_EQ(moe, 4);
  EXPECT_EQ(to_qk, 1);
  // Per-block choices: block 0 keeps softmax, block 1 Hamming with a shift proj.
  sav::BlockChoice b0, b1;
  b1.attn = LayerKind::attn_hamming;
  b1.proj.kind = LayerKind::linear_shift;
  auto mixed = sav::vit_convert_layers(dense, {b0, b1});
  EXPECT_EQ(mixed.size(), dense.size() + 1);
  for (const LayerDesc& L : mixed) {
    if (L.name == "blocks.0.attn.core") {
      EXPECT_EQ(L.kind, LayerKind::attn_softmax);
    }
    if (L.name == "blocks.1.attn.core") {
      EXPECT_EQ(L.kind, LayerKind::attn_hamming);
    }
    if (L.name == "blocks.1.attn.proj") {
      EXPECT_EQ(L.kind, LayerKind::linear_shift);
    }
    if (L.name == "blocks.0.attn.proj") {
      EXPECT_EQ(L.kind, LayerKind::linear_dense);
    }
  }
  EXPECT_THROW(sav::vit_convert_layers(dense, {b0, b1, b0}), sav::Error);
  EXPECT_THROW(sav::vit_converted_layers(dense, "linear", "moe", 0.5), sav::Error);
  EXPECT_THROW(sav::vit_converted_layers(dense, "hamming", "half", 0.5), sav::Error);
  EXPECT_THROW(sav::vit_converted_layers(dense, "hamming", "moe", 1.5), sav::Error);
}

TEST(EnergyIO, JsonAndCsvRoundTripTotals) {
  auto dense = sav::vit_dense_layers(32, 8, 3, 48, 2, 3, 96, 10);
  auto rep = sav::energy_report(sav::vit_converted_layers(dense, "hamming", "moe", 0.5));

  auto j = nlohmann::json::parse(sav::energy_json(rep));
  ASSERT_EQ(j["layers"].size(), rep.layers.size());
  EXPECT_EQ(j["total"]["compute_pj"].get<double>(), rep.total.compute_pj);
  EXPECT_EQ(j["total"]["total_pj"].get<double>(), rep.total.total_pj());
  EXPECT_EQ(j["total"]["shift"].get<double>(), rep.total.shift);
  EXPECT_EQ(j["total"]["macs"].get<double>(), rep.total.macs);
  EXPECT_EQ(j["layers"][3]["name"].get<std::string>(), rep.layers[3].name);
  EXPECT_EQ(j["options"]["shift_weight_bits"].get<int>(), 5);

  // CSV: header, one line per layer, "total" last; numbers parse back exactly.
  std::istringstream is(sav::energy_csv(rep));
  std::string line, header, last;
  std::getline(is, header);
  size_t n = 0;
  while (std::getline(is, line)) {
    last = line;
    ++n;
  }
  EXPECT_EQ(n, rep.layers.size() + 1);
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string cell;
    while (std::getline(ss, cell, ',')) out.push_back(cell);
    return out;
  };
  auto h = split(header), t = split(last);
  ASSERT_EQ(h.size(), t.size());
  EXPECT_EQ(t[0], "total");
  auto col = [&](const std::string& name) {
    for (size_t i = 0; i < h.size(); ++i)
      if (h[i] == name) return std::stod(t[i]);
    ADD_FAILURE() << "no column " << name;
    return -1.0;
  };
  EXPECT_EQ(col("compute_pj"), rep.total.compute_pj);
  EXPECT_EQ(col("memory_pj"), rep.total.memory_pj());
  EXPECT_EQ(col("total_pj"), rep.total.total_pj());
  EXPECT_EQ(col("add_fp32"), rep.total.add_fp32);
}

// deit_tiny_patch16_224 is ~1.26 GMAC per image (fvcore / timm tables); the linears + attention
// products must land within 2%.
TEST(EnergyModel, DeitTinyDenseMacs) {
  auto rep = sav::energy_report(sav::vit_dense_layers(224, 16, 3, 192, 12, 3, 768, 1000));
  EXPECT_NEAR(rep.total.macs / 1.26e9, 1.0, 0.02) << rep.total.macs;
  // Parameters: 5.72M (timm deit_tiny); weights are fp32 so 4 bytes each (+ layernorms, biases).
  EXPECT_NEAR(rep.total.weight_bytes / 4 / 5.717e6, 1.0, 0.01) << rep.total.weight_bytes / 4;
}

TEST(EnergyModel, PrintTableHasGroupsAndTotal) {
  auto dense = sav::vit_dense_layers(32, 8, 3, 48, 2, 3, 96, 10);
  auto a = sav::energy_report(dense);
  auto b = sav::energy_report(sav::vit_converted_layers(dense, "hamming", "moe", 0.5));
  std::ostringstream os;
  sav::print_energy_table(os, a, b);
  const std::string s = os.str();
  for (const char* g : {"patch embed", "attn linears", "attention", "mlp linears", "layernorm", "total", "%"})
    EXPECT_NE(s.find(g), std::string::npos) << g << "\n" << s;
}

TEST(EnergyErrors, InvalidInputsThrow) {
  EXPECT_THROW(sav::energy_layer(linear(LayerKind::linear_dense, 0, 5, 7)), sav::Error);
  EXPECT_THROW(sav::energy_layer(linear(LayerKind::linear_dense, 3, 0, 7)), sav::Error);
  EXPECT_THROW(sav::energy_layer(linear(LayerKind::linear_moe, 3, 5, 7, 1.2)), sav::Error);
  EXPECT_THROW(sav::energy_layer(attention(LayerKind::attn_hamming, 4, 0, 3)), sav::Error);
  EXPECT_THROW(sav::energy_layer(attention(LayerKind::attn_hamming, 4, 2, 3, 0, 3)), sav::Error);
  EnergyOptions bad;
  bad.matadd_density = 2;
  EXPECT_THROW(sav::energy_layer(linear(LayerKind::linear_dense, 3, 5, 7), bad), sav::Error);
  EXPECT_THROW(sav::vit_dense_layers(225, 16, 3, 192, 12, 3, 768, 1000), sav::Error);
  EXPECT_THROW(sav::layer_kind_from_name("conv"), sav::Error);
  EXPECT_EQ(sav::layer_kind_from_name("attn_hamming"), LayerKind::attn_hamming);
}

}  // namespace

namespace {
sav::PvtGeometry pvt_b0() {
  sav::PvtGeometry g;
  g.dims = {32, 64, 160, 256}, g.heads = {1, 2, 5, 8}, g.depths = {2, 2, 2, 2}, g.sr = {8, 4, 2, 1};
  g.mlp_ratios = {8, 8, 4, 4};
  return g;
}
}  // namespace

TEST(EnergyPvt, DenseB0HasTimmsMacCountAndStructure) {
  const auto dense = sav::pvt_dense_layers(pvt_b0());
  const EnergyRow t = sav::energy_report(dense).total;
  // timm / fvcore report 0.57 GMACs for pvt_v2_b0 at 224 (convs, linears, attention products)
  EXPECT_NEAR(t.macs / 1e9, 0.57, 0.01);
  int sr = 0, dw = 0;
  for (const LayerDesc& L : dense) {
    if (L.name.find("attn.sr") != std::string::npos) ++sr;
    if (L.kind == LayerKind::dwconv) {
      ++dw;
      EXPECT_EQ(L.out, 9);
    }
    if (L.name == "stages.0.blocks.0.attn.core") {
      EXPECT_EQ(L.tokens, 3136);
      EXPECT_EQ(L.kv_tokens, 49);  // 56x56 grid reduced by 8
    }
  }
  EXPECT_EQ(sr, 6);  // stages 0-2, two blocks each (stage 3 has sr 1)
  EXPECT_EQ(dw, 8);
}

TEST(EnergyPvt, HammingStagesDropTheSpatialReductionAndSave) {
  const auto dense = sav::pvt_dense_layers(pvt_b0());
  std::vector<sav::BlockChoice> st(4);
  for (int s = 0; s < 3; ++s) st[s].attn = LayerKind::attn_hamming;
  for (auto& c : st) c.fc1.kind = c.fc2.kind = LayerKind::linear_shift;
  const auto conv = sav::pvt_convert_layers(dense, st);
  int ham = 0;
  for (const LayerDesc& L : conv) {
    EXPECT_EQ(L.name.find("stages.0.blocks.0.attn.sr"), std::string::npos);
    if (L.kind == LayerKind::attn_hamming) ++ham;
    if (L.name == "stages.1.blocks.0.attn.to_v") {
      EXPECT_EQ(L.tokens, 784);  // all tokens, not the reduced ones
      EXPECT_EQ(L.out, 64);
    }
    if (L.name.find("mlp.fc") != std::string::npos) {
      EXPECT_EQ(L.kind, LayerKind::linear_shift) << L.name;
    }
  }
  EXPECT_EQ(ham, 6);
  const double d = sav::energy_report(dense).total.compute_pj, c = sav::energy_report(conv).total.compute_pj;
  EXPECT_LT(c, 0.8 * d);
  EXPECT_THROW(sav::pvt_convert_layers(dense, {}), sav::Error);
}
