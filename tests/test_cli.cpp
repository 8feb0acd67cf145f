// The command-line program as a user meets it: bad inputs give a one-line error naming the problem and a
// non-zero exit (never a crash), and `infer` reproduces the library's forward pass.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include "core/rng.h"
#include "io/safetensors.h"
#include "models/registry.h"
#include "models/vit.h"
#include "train/trainer.h"

using namespace sav;
namespace fs = std::filesystem;

namespace {

struct RunResult {
  int code;
  std::string out;
};

RunResult run_cli(const std::string& args) {
  std::string cmd = std::string(SAV_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  EXPECT_NE(p, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int status = pclose(p);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return {code, out};
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("sav_cli_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    auto model = create_model("vit_fmnist", {{"depth", 1}, {"dim", 16}, {"heads", 2}, {"mlp_hidden", 24}});
    Rng rng(1);
    static_cast<Vit*>(model.get())->init_random(rng);
    good = (dir / "good.safetensors").string();
    save_model(*model, good);
  }
  void TearDown() override { fs::remove_all(dir); }
  // B random (1,28,28) images, also written to dir/in.safetensors as the tensor `input`.
  Tensor random_input(int B, uint64_t seed) {
    Tensor x = Tensor::empty({B, 1, 28, 28});
    Rng rng(seed);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = rng.normal();
    save_safetensors((dir / "in.safetensors").string(), {{"input", x}});
    return x;
  }
  fs::path dir;
  std::string good;
};

}  // namespace

TEST_F(CliTest, UnknownFlagIsOneLineErrorAndNonZeroExit) {
  RunResult r = run_cli("train --no-such-flag 3");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("no-such-flag"), std::string::npos) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

// Impossible values and a mistyped subcommand: one line naming the flag (or word) and the value.
TEST_F(CliTest, BadValuesAndUnknownSubcommandAreNamed) {
  const std::pair<const char*, const char*> cases[] = {
      {"train --batch 0", "--batch: must be a positive integer, got '0'"},
      {"train --lr nan", "--lr: must be a positive finite number, got 'nan'"},
      {"train --lr 1e-60", "--lr: must be a positive finite number, got '1e-60'"},
      {"finetune --smoothing 1", "--smoothing: must be a number in [0, 1), got '1'"},
      {"bench --batch 1,x", "--batch: must be a comma-separated list of positive integers, got '1,x'"},
      {"trian --epochs 1", "unknown subcommand 'trian'; known: train, eval"},
  };
  for (const auto& [args, want] : cases) {
    RunResult r = run_cli(args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_NE(r.out.find(want), std::string::npos) << args << ": " << r.out;
    EXPECT_EQ(count_lines(r.out), 1) << args << ": " << r.out;
  }
}

TEST_F(CliTest, TruncatedCheckpointIsOneLineError) {
  std::string bad = (dir / "trunc.safetensors").string();
  fs::copy_file(good, bad);
  fs::resize_file(bad, fs::file_size(bad) / 2);
  RunResult r = run_cli("eval --weights " + bad);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("trunc.safetensors"), std::string::npos) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST_F(CliTest, CorruptHeaderIsOneLineError) {
  std::string bad = (dir / "corrupt.safetensors").string();
  fs::copy_file(good, bad);
  std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(12);
  f.write("\x01\x02{{{", 5);
  f.close();
  RunResult r = run_cli("eval --weights " + bad);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST_F(CliTest, WrongShapeNamesTheTensor) {
  Checkpoint ck = Checkpoint::open(good);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& n : ck.names())
    ts.emplace_back(n, n == "blocks.0.mlp.fc1.weight" ? Tensor::zeros({25, 16}) : ck.get(n).clone());
  std::string bad = (dir / "shape.safetensors").string();
  save_safetensors(bad, ts, ck.metadata());
  RunResult r = run_cli("eval --weights " + bad);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("blocks.0.mlp.fc1.weight"), std::string::npos) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST_F(CliTest, WrongArchForATimmCheckpointNamesMissingTensors) {
  RunResult r = run_cli("infer --arch deit_tiny_patch16_224 --weights " + good + " --input x --output y");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("vit_fmnist"), std::string::npos) << r.out;  // names the arch the file holds
}

TEST_F(CliTest, MissingDatasetIsOneLineError) {
  RunResult r = run_cli("eval --weights " + good + " --data " + (dir / "nowhere").string() + " --data-format fmnist");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("nowhere"), std::string::npos) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST_F(CliTest, InferMatchesTheLibraryForward) {
  auto model = load_model(good);
  const int B = 3;
  const Tensor x = random_input(B, 9);
  const std::string in = (dir / "in.safetensors").string(), out = (dir / "out.safetensors").string();
  RunResult r = run_cli("infer --weights " + good + " --input " + in + " --output " + out + " --batch 2");
  ASSERT_EQ(r.code, 0) << r.out;
  Checkpoint res = Checkpoint::open(out);
  Tensor logits = res.get("logits");
  ASSERT_EQ(logits.shape(), (Shape{B, 10}));
  model->forward(x.f32(), B, false);
  for (int i = 0; i < B * 10; ++i) EXPECT_NEAR(logits.f32()[i], model->logits()[i], 1e-5f);
}

// --device cuda: on a machine with a GPU (and a CUDA build) the logits match the CPU's within bf16 rounding;
// elsewhere the program says why in one line and exits 1.
TEST_F(CliTest, InferOnCudaMatchesTheCpuOrSaysWhyNot) {
  auto model = load_model(good);
  const int B = 2;
  const Tensor x = random_input(B, 4);
  const std::string in = (dir / "in.safetensors").string(), out = (dir / "out.safetensors").string();
  RunResult r = run_cli("infer --device cuda --weights " + good + " --input " + in + " --output " + out);
  if (r.code != 0) {
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_TRUE(r.out.find("no usable CUDA device") != std::string::npos ||
                r.out.find("no CUDA backend") != std::string::npos)
        << r.out;
    EXPECT_EQ(r.out.find("error:"), r.out.rfind("error:")) << "one error line: " << r.out;
    return;
  }
  Tensor logits = Checkpoint::open(out).get("logits");
  model->forward(x.f32(), B, false);
  float mx = 0;
  for (int i = 0; i < B * 10; ++i) mx = std::max(mx, std::fabs(model->logits()[i]));
  for (int i = 0; i < B * 10; ++i) EXPECT_NEAR(logits.f32()[i], model->logits()[i], 2e-2f * mx + 1e-3f);
}

TEST_F(CliTest, InferRejectsWrongInputShape) {
  std::string in = (dir / "in.safetensors").string();
  save_safetensors(in, {{"input", Tensor::zeros({2, 3, 28, 28})}});
  RunResult r = run_cli("infer --weights " + good + " --input " + in + " --output " + (dir / "o").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("(2, 3, 28, 28)"), std::string::npos) << r.out;
}

TEST_F(CliTest, HelpExplainsEverySubcommand) {
  for (const char* sub : {"train", "eval", "infer", "bench"}) {
    RunResult r = run_cli(std::string(sub) + " --help");
    EXPECT_EQ(r.code, 0) << sub;
    EXPECT_NE(r.out.find("--"), std::string::npos) << sub;
  }
}
