// shiftaddvit: parsers of the text values users type on the command line (library side: they throw
// sav::Error naming the flag, and nothing else escapes).
//
//   std::vector<int> bs = sav::parse_int_list("1,64", "--batch");          // {1, 64}
//   std::array<float, 2> a = sav::parse_alpha("1,0.6");                    // {1.0f, 0.6f}
//   float lr = sav::parse_float("3e-4", "--lr", sav::FloatRule::positive);  // 3e-4f
//
// Numbers must be the whole item (no trailing text), finite, and still inside their rule once narrowed to
// float ("1e-60" is not a positive float, "1e39" is not finite). The fuzz target cli_values runs these.
#pragma once

#include <array>
#include <string>
#include <vector>

namespace sav {

enum class FloatRule {
  any,           // finite
  positive,      // finite, > 0
  non_negative,  // finite, >= 0
  fraction,      // finite, in [0, 1)
};

// Parses one float under `rule`; throws sav::Error "<what> must be ..., got '<text>'".
float parse_float(const std::string& text, const std::string& what, FloatRule rule);
// The rule's words for messages and --help ("a positive number", ...).
const char* float_rule_text(FloatRule rule);

// "1,64" -> {1, 64}: a comma-separated list of positive ints, nothing else in the items, at least one.
std::vector<int> parse_int_list(const std::string& text, const std::string& what);

// "--alpha": two positive finite numbers "a,b" (the latency factors of the mult and shift experts).
std::array<float, 2> parse_alpha(const std::string& text);

}  // namespace sav
