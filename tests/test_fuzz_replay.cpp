// Replays the fuzz seed corpus (fuzz/corpus/<target>/) and the saved crash inputs (fuzz/regressions/<target>/)
// through the fuzz entry functions, without libFuzzer, in the normal test build. A failure names the file;
// rerun it under the sanitizers with build-fuzz/fuzz_<target> FILE (see fuzz/README.md).
//
// The entry functions are compiled here: the main CMakeLists globs only src/ into the library and
// tests/test_*.cpp into the test binary, so this file includes their implementation.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "../fuzz/targets.cpp"

namespace {

template <class F>
std::string error_text(F&& f) {
  try {
    f();
  } catch (const sav::Error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

namespace {

namespace fs = std::filesystem;

fs::path fuzz_root() { return fs::path(SAV_TEST_DATA) / ".." / "fuzz"; }

std::vector<fs::path> files_in(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename().string()[0] != '.') out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Runs every file of fuzz/<kind>/<target>/ through the target; returns how many ran.
size_t replay(const sav::fuzz::FuzzTarget& t, const char* kind) {
  size_t n = 0;
  for (const fs::path& p : files_in(fuzz_root() / kind / t.name)) {
    SCOPED_TRACE(p.string());
    const std::vector<uint8_t> bytes = read_bytes(p);
    EXPECT_NO_THROW(t.fn(bytes.data(), bytes.size())) << "fuzz input " << p;
    ++n;
  }
  return n;
}

TEST(FuzzReplay, CorpusOfEveryTarget) {
  ASSERT_EQ(sav::fuzz::fuzz_targets().size(), 5u);
  for (const auto& t : sav::fuzz::fuzz_targets()) {
    SCOPED_TRACE(t.name);
    // A missing or empty corpus folder would make the replay pass vacuously.
    EXPECT_GE(replay(t, "corpus"), 3u) << "too few seeds in " << (fuzz_root() / "corpus" / t.name);
  }
}

TEST(FuzzReplay, Regressions) {
  for (const auto& t : sav::fuzz::fuzz_targets()) {
    SCOPED_TRACE(t.name);
    replay(t, "regressions");
  }
}

TEST(FuzzReplay, EmptyAndTinyInputs) {
  const uint8_t bytes[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  for (const auto& t : sav::fuzz::fuzz_targets())
    for (size_t n : {0, 1, 8, 9}) EXPECT_NO_THROW(t.fn(bytes, n)) << t.name << " on " << n << " bytes";
}

TEST(FuzzReplay, SplitAndInvariantsCanFail) {
  const std::string s = "ab#SAVSPLIT#cd#SAVSPLIT#ef";
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto parts = sav::fuzz::fuzz_split(p, s.size(), 3);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0], "ab");
  EXPECT_EQ(parts[1], "cd");
  EXPECT_EQ(parts[2], "ef");
  const auto two = sav::fuzz::fuzz_split(p, s.size(), 2);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[1], "cd#SAVSPLIT#ef");
  // The harness's own checks fire: a missing name that did not throw is an InvariantError.
  EXPECT_THROW(sav::fuzz::require_error([] {}, "a lookup"), sav::fuzz::InvariantError);
}

// The CLI value parsers (src/core/parse.h) the fuzzer checks, on the cases it found and a few more.
TEST(CliValues, ParseIntList) {
  EXPECT_EQ(sav::parse_int_list("1,64", "--batch"), (std::vector<int>{1, 64}));
  EXPECT_EQ(sav::parse_int_list("7", "--batch"), (std::vector<int>{7}));
  for (const char* bad : {"", ",", "0", "-1", "1,,2", "1x", "2147483648", "1.5", "a", "1,", " 1", "1e2", "0x10"})
    EXPECT_THROW(sav::parse_int_list(bad, "--batch"), sav::Error) << "'" << bad << "'";
  EXPECT_NE(error_text([] { sav::parse_int_list("1,x", "--batch"); }).find("--batch"), std::string::npos);
}

TEST(CliValues, ParseAlpha) {
  const std::array<float, 2> a = sav::parse_alpha("1,0.55");
  EXPECT_EQ(a[0], 1.0f);
  EXPECT_EQ(a[1], 0.55f);
  for (const char* bad : {"", "1", "1,2,3", "abc", "1,inf", "nan,1", "1e-50,1", "1e39,1", "1x,2", "0,1", "-1,1", "1,"})
    EXPECT_THROW(sav::parse_alpha(bad), sav::Error) << "'" << bad << "'";
}

TEST(CliValues, ParseFloatRules) {
  using R = sav::FloatRule;
  EXPECT_EQ(sav::parse_float("3e-4", "--lr", R::positive), 3e-4f);
  EXPECT_EQ(sav::parse_float("0", "--wd", R::non_negative), 0.0f);
  EXPECT_EQ(sav::parse_float("0.1", "--smoothing", R::fraction), 0.1f);
  EXPECT_EQ(sav::parse_float("-2.5", "--x", R::any), -2.5f);
  for (const char* bad : {"", "nan", "inf", "-inf", "0", "-1", "1e-60", "1e39", "1x", " 1", "0x"})
    EXPECT_THROW(sav::parse_float(bad, "--lr", R::positive), sav::Error) << "'" << bad << "'";
  for (const char* bad : {"-1e-9", "nan", "1e39"}) EXPECT_THROW(sav::parse_float(bad, "--wd", R::non_negative), sav::Error);
  for (const char* bad : {"1", "1.5", "-0.1"}) EXPECT_THROW(sav::parse_float(bad, "--smoothing", R::fraction), sav::Error);
  const std::string msg = error_text([] { sav::parse_float("nan", "--lr", R::positive); });
  EXPECT_NE(msg.find("--lr must be a positive finite number, got 'nan'"), std::string::npos) << msg;
  // The CLI11 validator says the same and leaves good values alone.
  std::string good = "0.5", nan = "nan";
  EXPECT_EQ(sav::cli_float(R::positive)(good), "");
  EXPECT_NE(sav::cli_float(R::positive)(nan), "");
}

}  // namespace
