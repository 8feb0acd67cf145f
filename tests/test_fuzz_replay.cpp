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

// Inputs that crashed a target through code the fuzz folder does not own, with the fix still to be made
// there (fuzz/README.md, "Known issues"). They pass only because the harness skips them (its guards K1-K8);
// once the owner's fix is in, the guard goes and the file moves to fuzz/regressions/.
TEST(FuzzReplay, PendingBehindGuards) {
  for (const auto& t : sav::fuzz::fuzz_targets()) {
    SCOPED_TRACE(t.name);
    replay(t, "pending");
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

// The CLI value parsers the fuzzer checks (fuzz/cli_values.h), on the cases it found and a few more.
TEST(FuzzCliValues, ParseIntList) {
  EXPECT_EQ(sav::fuzz::parse_int_list("1,64", "--batch"), (std::vector<int>{1, 64}));
  EXPECT_EQ(sav::fuzz::parse_int_list("7", "--batch"), (std::vector<int>{7}));
  for (const char* bad : {"", ",", "0", "-1", "1,,2", "1x", "2147483648", "1.5", "a"})
    EXPECT_THROW(sav::fuzz::parse_int_list(bad, "--batch"), sav::Error) << "'" << bad << "'";
}

TEST(FuzzCliValues, ParseAlpha) {
  const std::array<float, 2> a = sav::fuzz::parse_alpha("1,0.55");
  EXPECT_EQ(a[0], 1.0f);
  EXPECT_EQ(a[1], 0.55f);
  for (const char* bad : {"", "1", "1,2,3", "abc", "1,inf", "nan,1", "1e-50,1", "1e39,1", "1x,2", "0,1", "-1,1", "1,"})
    EXPECT_THROW(sav::fuzz::parse_alpha(bad), sav::Error) << "'" << bad << "'";
}

}  // namespace
