// shiftaddvit fuzz: the command-line program's value parsers, as library-style functions.
//
//   std::vector<int> bs = sav::fuzz::parse_int_list("1,64", "--batch");   // {1, 64}
//   std::array<float, 2> a = sav::fuzz::parse_alpha("1,0.6");             // {1.0f, 0.6f}
//
// tools/shiftaddvit.cpp holds these as functions in an anonymous namespace (parse_int_list, and the
// --alpha loop inside reparam_options), which a fuzzer or a test cannot reach. These are their
// equivalents, with the fixes the fuzzer asked for (see fuzz/README.md); they should move to a library
// header (e.g. src/core/parse.h, namespace sav) and the CLI and fuzz/targets.cpp should both call that.
// Bad text throws sav::Error naming the flag; nothing else escapes.
//
// Shape legend: none (strings in, small vectors out).
#pragma once

#include <array>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace sav::fuzz {

// "1,64" -> {1, 64}: a comma-separated list of positive ints, nothing else in the items.
inline std::vector<int> parse_int_list(const std::string& s, const char* what) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t pos = 0;
      int x = std::stoi(item, &pos);
      SAV_CHECK(pos == item.size() && x > 0, "");
      v.push_back(x);
    } catch (const std::exception&) {
      SAV_THROW(what << " must be a comma-separated list of positive integers, got '" << s << "'");
    }
  }
  SAV_CHECK(!v.empty(), what << " is empty");
  return v;
}

// "--alpha": two positive finite numbers "a,b" (the latency factors of the mult and shift experts).
inline std::array<float, 2> parse_alpha(const std::string& s) {
  std::vector<float> a;
  std::stringstream ss(s);
  std::string item;
#ifdef SAV_FUZZ_CLI_AS_IS  // tools/shiftaddvit.cpp as of this writing: std::stof's own exceptions escape
  while (std::getline(ss, item, ',')) a.push_back(std::stof(item));
#else
  while (std::getline(ss, item, ',')) {
    float x = 0;
    size_t pos = 0;
    try {
      x = std::stof(item, &pos);
    } catch (const std::exception&) {  // std::invalid_argument, std::out_of_range ("1e-50", "1e39")
      pos = std::string::npos;
    }
    SAV_CHECK(pos == item.size() && std::isfinite(x) && x > 0,
              "--alpha needs two positive numbers \"a,b\", got '" << s << "' (item '" << item << "')");
    a.push_back(x);
  }
#endif
  SAV_CHECK(a.size() == 2 && a[0] > 0 && a[1] > 0, "--alpha needs two positive numbers, got '" << s << "'");
  return {a[0], a[1]};
}

}  // namespace sav::fuzz
