// Training survives being stopped: a run interrupted (cleanly with --max-steps, or by SIGKILL at any moment,
// including during a checkpoint write) and resumed ends bit-identical to an uninterrupted run, and no
// checkpoint is ever left half-written.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "core/error.h"
#include "io/safetensors.h"

using namespace sav;
namespace fs = std::filesystem;

namespace {

void write_idx(const std::string& path, uint32_t magic, const std::vector<uint32_t>& dims,
               const std::vector<uint8_t>& data) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  auto be = [&](uint32_t v) {
    unsigned char b[4] = {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
    gzwrite(f, b, 4);
  };
  be(magic);
  for (uint32_t d : dims) be(d);
  gzwrite(f, data.data(), static_cast<unsigned>(data.size()));
  gzclose(f);
}

// A small Fashion-MNIST-shaped data set: class c is a bright bar at row 2c plus noise.
void make_dataset(const fs::path& dir, int n_train, int n_test) {
  fs::create_directories(dir);
  Rng rng(42);
  for (auto [prefix, n] : {std::pair{std::string("train"), n_train}, std::pair{std::string("t10k"), n_test}}) {
    std::vector<uint8_t> px(size_t(n) * 28 * 28), lb(n);
    for (int i = 0; i < n; ++i) {
      lb[i] = static_cast<uint8_t>(rng.below(10));
      for (int p = 0; p < 28 * 28; ++p) px[size_t(i) * 784 + p] = static_cast<uint8_t>(rng.below(60));
      for (int x = 0; x < 28; ++x) px[size_t(i) * 784 + (2 * lb[i] + 3) * 28 + x] = 250;
    }
    write_idx((dir / (prefix + "-images-idx3-ubyte.gz")).string(), 0x803, {uint32_t(n), 28, 28}, px);
    write_idx((dir / (prefix + "-labels-idx1-ubyte.gz")).string(), 0x801, {uint32_t(n)}, lb);
  }
}

int run(const std::string& args) {
  std::string cmd = std::string(SAV_CLI) + " --threads 1 " + args + " > /dev/null 2>&1";
  int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::vector<float> final_params(const std::string& path) {
  Checkpoint ck = Checkpoint::open(path);
  std::vector<float> all;
  for (const auto& n : ck.names()) {
    auto v = ck.get(n).to_vector();
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

class ResumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("sav_resume_" + std::to_string(::getpid()));
    make_dataset(dir / "data", 320, 64);
    train = "train --data " + (dir / "data").string() +
            " --data-format fmnist --dim 16 --depth 2 --heads 2 --mlp-hidden 32 --epochs 3 --batch 32 --lr 2e-3"
            " --pad-crop 2 --hflip --seed 5 --no-progress --save-every 3 ";
  }
  void TearDown() override { fs::remove_all(dir); }
  fs::path dir;
  std::string train;
};

}  // namespace

TEST_F(ResumeTest, StoppedAndResumedRunIsBitIdentical) {
  ASSERT_EQ(run(train + "--out " + (dir / "a").string()), 0);
  const auto ref = final_params((dir / "a/model.safetensors").string());
  // stop after 7 steps, then after 9 more (mid-epoch both times), then finish
  ASSERT_EQ(run(train + "--out " + (dir / "b").string() + " --max-steps 7"), 0);
  EXPECT_FALSE(fs::exists(dir / "b/model.safetensors"));
  ASSERT_EQ(run(train + "--out " + (dir / "b").string() + " --max-steps 9 --resume"), 0);
  ASSERT_EQ(run(train + "--out " + (dir / "b").string() + " --resume"), 0);
  const auto got = final_params((dir / "b/model.safetensors").string());
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), got.size() * sizeof(float))) << "resumed run diverged";
}

TEST_F(ResumeTest, SigkillAtAnyMomentLeavesALoadableCheckpointAndResumes) {
  ASSERT_EQ(run(train + "--out " + (dir / "a").string()), 0);
  const auto ref = final_params((dir / "a/model.safetensors").string());
  const std::string out = (dir / "k").string();
  // Kill repeatedly at staggered times (checkpoints are written every 3 steps, so some kills land in writes).
  for (int attempt = 0; attempt < 6 && !fs::exists(out + "/model.safetensors"); ++attempt) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      std::string cmd = std::string(SAV_CLI) + " --threads 1 " + train + "--out " + out + " --resume";
      execl("/bin/sh", "sh", "-c", ("exec " + cmd + " > /dev/null 2>&1").c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(40 + 23 * attempt));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    // whatever is on disk must load: never a half-written checkpoint under the real name
    if (fs::exists(out + "/last.safetensors")) {
      EXPECT_NO_THROW(Checkpoint::open(out + "/last.safetensors"));
    }
    if (attempt == 0) {
      EXPECT_FALSE(fs::exists(out + "/model.safetensors")) << "the first kill came too late to test";
    }
  }
  ASSERT_EQ(run(train + "--out " + out + " --resume"), 0);
  const auto got = final_params(out + "/model.safetensors");
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), got.size() * sizeof(float))) << "resumed run diverged";
  for (auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << "stray temp file " << e.path();
}

#include "io/dataset.h"
#include "models/registry.h"
#include "models/vit.h"
#include "train/trainer.h"

// A NaN in training stops the step with a report naming what and when, and the last good checkpoint stays.
TEST(NumericFaults, NanLossStopsTrainingAndKeepsTheLastCheckpoint) {
  Dataset ds;
  ds.n = 64, ds.channels = 1, ds.height = 28, ds.width = 28, ds.num_classes = 10;
  ds.pixels.resize(size_t(64) * 784);
  Rng rng(3);
  for (auto& p : ds.pixels) p = static_cast<uint8_t>(rng.below(256));
  for (int i = 0; i < 64; ++i) ds.labels.push_back(i % 10);
  auto model = create_model("vit_fmnist", {{"dim", 16}, {"depth", 1}, {"heads", 2}, {"mlp_hidden", 16}});
  Rng init(1);
  static_cast<Vit*>(model.get())->init_random(init);
  const fs::path dir = fs::temp_directory_path() / ("sav_nan_" + std::to_string(::getpid()));
  TrainOptions opt;
  opt.epochs = 1, opt.batch = 16, opt.out_dir = dir.string(), opt.progress = false;
  Trainer(*model, ds, ds, opt).run();
  const auto good = final_params((dir / "last.safetensors").string());
  model->params().get("head.weight").f32()[3] = std::nanf("");
  opt.epochs = 2;
  opt.resume = false;
  try {
    Trainer(*model, ds, ds, opt).run();
    FAIL() << "training on a NaN parameter did not stop";
  } catch (const sav::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not finite at step"), std::string::npos) << e.what();
  }
  EXPECT_EQ(final_params((dir / "last.safetensors").string()), good) << "the last good checkpoint was overwritten";
  fs::remove_all(dir);
}
