// shiftaddvit: CLI11 validators for numeric options, on top of sav::parse_float (src/core/parse.h).
// CLI11's own PositiveNumber/NonNegativeNumber pass "nan" and check the double before it is narrowed to
// float ("1e-60" becomes 0.0f); these check what the option will hold. Used by tools/shiftaddvit.cpp and
// by the cli_values fuzz target.
//
//   app.add_option("--lr", lr, "...")->check(sav::cli_float(sav::FloatRule::positive));
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/error.h"
#include "core/parse.h"

namespace sav {

inline CLI::Validator cli_float(FloatRule rule) {
  return CLI::Validator(
      [rule](std::string& in) -> std::string {
        try {
          parse_float(in, "the value", rule);
        } catch (const Error&) {
          return std::string("must be ") + float_rule_text(rule) + ", got '" + in + "'";
        }
        return {};
      },
      rule == FloatRule::positive       ? "POSITIVE"
      : rule == FloatRule::non_negative ? "NONNEGATIVE"
      : rule == FloatRule::fraction     ? "[0,1)"
                                        : "FLOAT");
}

// Integer options that must be >= 1 (--batch, --epochs, ...): "must be a positive integer, got '0'" instead of
// CLI11's "Value 0 not in range 0.000000 to 1.797...e308".
inline CLI::Validator cli_positive_int() {
  return CLI::Validator(
      [](std::string& in) -> std::string {
        try {
          if (parse_int_list(in, "the value").size() == 1) return {};
        } catch (const Error&) {
        }
        return "must be a positive integer, got '" + in + "'";
      },
      "POSITIVE");
}

// Comma-separated lists of positive integers (bench --batch 1,64).
inline CLI::Validator cli_int_list() {
  return CLI::Validator(
      [](std::string& in) -> std::string {
        try {
          parse_int_list(in, "the value");
        } catch (const Error&) {
          return "must be a comma-separated list of positive integers, got '" + in + "'";
        }
        return {};
      },
      "LIST");
}

}  // namespace sav
