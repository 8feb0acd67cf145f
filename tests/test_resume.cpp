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
    if (fs::exists(out + "/last.safetensors")) EXPECT_NO_THROW(Checkpoint::open(out + "/last.safetensors"));
    if (attempt == 0) EXPECT_FALSE(fs::exists(out + "/model.safetensors")) << "the first kill came too late to test";
  }
  ASSERT_EQ(run(train + "--out " + out + " --resume"), 0);
  const auto got = final_params(out + "/model.safetensors");
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), got.size() * sizeof(float))) << "resumed run diverged";
  for (auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().string().find(".tmp."), std::string::npos) << "stray temp file " << e.path();
}
