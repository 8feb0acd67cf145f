#include "reparam/routing.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "io/image.h"
#include "nn/linear_layer.h"

namespace sav {

std::vector<LayerShares> routing_shares(Vit& model, const Dataset& ds, const Normalize& norm, int64_t limit,
                                        int batch) {
  const int64_t n = limit > 0 ? std::min<int64_t>(limit, ds.n) : ds.n;
  auto layers = model.moe_layers();
  std::vector<LayerShares> out(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) out[i].name = layers[i].first;
  std::vector<float> x(size_t(batch) * ds.image_size());
  std::vector<int> idx(batch), labels(batch);
  for (int64_t s = 0; s < n; s += batch) {
    const int B = static_cast<int>(std::min<int64_t>(batch, n - s));
    std::iota(idx.begin(), idx.begin() + B, static_cast<int>(s));
    make_batch(ds, idx.data(), B, norm, Augment{}, nullptr, x.data(), labels.data());
    model.forward(x.data(), B, false);
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& c = layers[i].second->expert_counts();
      out[i].tokens[0] += c[0];
      out[i].tokens[1] += c[1];
    }
  }
  return out;
}

double ExpertProfile::alpha_mult() const {
  return mult_us_per_token / std::min(mult_us_per_token, shift_us_per_token);
}
double ExpertProfile::alpha_shift() const {
  return shift_us_per_token / std::min(mult_us_per_token, shift_us_per_token);
}

ExpertProfile profile_experts(int K, int F, int tokens, bool int_kernel, int iters) {
  SAV_CHECK(K > 0 && F > 0 && tokens > 0 && iters > 0, "profile sizes must be positive");
  ReparamOptions ro;
  ro.int_kernel = int_kernel;
  LinearLayer dense("dense", K, F, LinearKind::dense, &ro), shift("shift", K, F, LinearKind::shift, &ro);
  ParamSet ps;
  dense.declare(ps);
  shift.declare(ps);
  ps.allocate();
  ParamSet gs = ps.like();
  dense.bind(ps, gs);
  shift.bind(ps, gs);
  Rng rng(7);
  std::vector<float> w(size_t(F) * K), b(F), x(size_t(tokens) * K), y(size_t(tokens) * F);
  for (float& v : w) v = 0.05f * rng.normal();
  for (float& v : b) v = 0.1f * rng.normal();
  for (float& v : x) v = rng.normal();
  dense.init_from_dense(w.data(), b.data());
  shift.init_from_dense(w.data(), b.data());
  // Interleaved timing (dense, shift, dense, ...) so that load from other processes hits both alike.
  for (int i = 0; i < 3; ++i) {
    dense.forward(y.data(), x.data(), tokens, false, nullptr);
    shift.forward(y.data(), x.data(), tokens, false, nullptr);
  }
  std::vector<double> td, ts;
  auto once = [&](LinearLayer& l) {
    auto a = std::chrono::steady_clock::now();
    l.forward(y.data(), x.data(), tokens, false, nullptr);
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() / tokens;
  };
  for (int i = 0; i < iters; ++i) {
    td.push_back(once(dense));
    ts.push_back(once(shift));
  }
  std::sort(td.begin(), td.end());
  std::sort(ts.begin(), ts.end());
  ExpertProfile p;
  p.K = K, p.F = F, p.tokens = tokens, p.int_kernel = int_kernel;
  p.mult_us_per_token = td[td.size() / 2];
  p.shift_us_per_token = ts[ts.size() / 2];
  p.shift_isa = int_kernel ? cpu::shift_int_isa_name() : "float (BLAS on decoded weights)";
  return p;
}

std::vector<LayerShares> route_picture(Vit& model, const float* image, const uint8_t* pixels,
                                       const std::string& png_path) {
  const VitConfig& c = model.config();
  model.forward(image, 1, false);
  auto layers = model.moe_layers();
  SAV_CHECK(!layers.empty(), "model " << c.name << " has no MoE layer to picture");
  const int g = c.grid(), S = c.img_size;
  const int scale = std::max(1, (160 + S - 1) / S), P = S * scale, gap = 8;
  const int cols = std::min<int>(4, static_cast<int>(layers.size()));
  const int rows = (static_cast<int>(layers.size()) + cols - 1) / cols;
  Image out(3, rows * (P + gap) + gap, cols * (P + gap) + gap, 255);
  std::vector<LayerShares> shares;
  for (size_t li = 0; li < layers.size(); ++li) {
    const auto& choice = layers[li].second->last_choice();  // (N): class token first
    LayerShares ls;
    ls.name = layers[li].first;
    for (int t = 1; t < static_cast<int>(choice.size()); ++t) ls.tokens[choice[t]]++;
    shares.push_back(ls);
    const int ox = gap + static_cast<int>(li % cols) * (P + gap), oy = gap + static_cast<int>(li / cols) * (P + gap);
    for (int y = 0; y < P; ++y)
      for (int x = 0; x < P; ++x) {
        const int sy = y / scale, sx = x / scale;
        float gray = 0;
        for (int ch = 0; ch < c.in_chans; ++ch) gray += pixels[(size_t(ch) * S + sy) * S + sx];
        gray /= c.in_chans;
        const int tok = 1 + (sy / c.patch) * g + (sx / c.patch);
        const bool shift = choice[tok] == 1;
        // tint: mult = blue (60,110,230), shift = orange (245,150,30); 55% image, 45% tint
        const float tint[3] = {shift ? 245.f : 60.f, shift ? 150.f : 110.f, shift ? 30.f : 230.f};
        const bool edge = (x % (c.patch * scale) == 0) || (y % (c.patch * scale) == 0);
        for (int ch = 0; ch < 3; ++ch) {
          float v = 0.55f * gray + 0.45f * tint[ch];
          if (edge) v *= 0.8f;
          out.at(ch, oy + y, ox + x) = static_cast<uint8_t>(std::clamp(v, 0.0f, 255.0f));
        }
      }
  }
  save_png(png_path, out);
  return shares;
}

}  // namespace sav
