// GPU copies of CPU models behind one interface for the command-line program. See gpu_model.h.
#include "models/gpu_model.h"

#include "core/error.h"
#include "models/pvt_cuda.h"
#include "models/vit_cuda.h"
#include "models/pvt_cuda_train.h"
#include "models/vit_cuda_train.h"
#include "ops/cuda/common.h"

namespace sav {

namespace {

class VitGpu final : public GpuClassifier {
 public:
  explicit VitGpu(const Vit& m) : net_(m) {}
  void forward_host(const float* x, float* y, int B) override { net_.forward_host(x, y, B); }
  double median_ms(int batch, int iters) override { return vit_cuda_median_ms(net_, batch, iters); }
  std::string precision() const override { return "bf16"; }

 private:
  ViTCuda net_;
};

class PvtGpu final : public GpuClassifier {
 public:
  PvtGpu(const Pvt& m, bool tf32) : net_(m, PvtCudaOptions{tf32 ? cuda::F32Math::tf32 : cuda::F32Math::f32}), tf32_(tf32) {}
  void forward_host(const float* x, float* y, int B) override { net_.forward_host(x, y, B); }
  double median_ms(int batch, int iters) override { return pvt_cuda_median_ms(net_, batch, iters); }
  std::string precision() const override { return tf32_ ? "tf32" : "f32"; }

 private:
  PvtCuda net_;
  bool tf32_;
};

}  // namespace

std::unique_ptr<GpuClassifier> make_gpu_model(ImageClassifier& model, bool tf32) {
  SAV_CHECK(cuda::device_available(), "--device cuda: no usable CUDA device on this machine (use --device cpu)");
  if (auto* p = dynamic_cast<Pvt*>(&model)) return std::make_unique<PvtGpu>(*p, tf32);
  if (auto* v = dynamic_cast<Vit*>(&model)) return std::make_unique<VitGpu>(*v);
  SAV_THROW("--device cuda: " << model.arch() << " has no CUDA implementation");
}

std::unique_ptr<ImageClassifier> make_gpu_trainer(ImageClassifier& model, const std::string& precision) {
  SAV_CHECK(precision == "f32" || precision == "tf32" || precision == "bf16",
            "GPU training precision '" << precision << "' is not one of f32, tf32, bf16");
  SAV_CHECK(cuda::device_available(), "--device cuda: no usable CUDA device on this machine (use --device cpu)");
  const cuda::F32Math math = precision == "tf32"   ? cuda::F32Math::tf32
                             : precision == "bf16" ? cuda::F32Math::bf16
                                                   : cuda::F32Math::f32;
  if (auto* v = dynamic_cast<Vit*>(&model)) return std::make_unique<VitCudaTrain>(*v, math);
  if (auto* p = dynamic_cast<Pvt*>(&model)) return std::make_unique<PvtCudaTrain>(*p, math);
  SAV_THROW("--device cuda: training " << model.arch() << " on the GPU is not implemented; use --device cpu");
}

}  // namespace sav
