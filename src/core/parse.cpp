// shiftaddvit: command-line value parsers. See parse.h.
#include "core/parse.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "core/error.h"

namespace sav {

namespace {

// Whole-string strtod; false on empty text, trailing characters or leading spaces.
bool to_double(const std::string& s, double& out) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
  errno = 0;
  char* end = nullptr;
  out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && errno != ERANGE;
}

bool obeys(float v, FloatRule rule) {
  if (!std::isfinite(v)) return false;
  switch (rule) {
    case FloatRule::any: return true;
    case FloatRule::positive: return v > 0;
    case FloatRule::non_negative: return v >= 0;
    case FloatRule::fraction: return v >= 0 && v < 1;
  }
  return false;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> items;
  std::string item;
  std::stringstream ss(s);
  while (std::getline(ss, item, ',')) items.push_back(item);
  if (!s.empty() && s.back() == ',') items.emplace_back();  // "1," has an empty last item
  return items;
}

}  // namespace

const char* float_rule_text(FloatRule rule) {
  switch (rule) {
    case FloatRule::any: return "a finite number";
    case FloatRule::positive: return "a positive finite number";
    case FloatRule::non_negative: return "a finite number >= 0";
    case FloatRule::fraction: return "a number in [0, 1)";
  }
  return "a number";
}

float parse_float(const std::string& text, const std::string& what, FloatRule rule) {
  double d = 0;
  const bool ok = to_double(text, d) && std::fabs(d) <= std::numeric_limits<float>::max();
  const float v = ok ? static_cast<float>(d) : 0.0f;
  SAV_CHECK(ok && obeys(v, rule) && (d == 0 || v != 0),
            what << " must be " << float_rule_text(rule) << ", got '" << text << "'");
  return v;
}

std::vector<int> parse_int_list(const std::string& text, const std::string& what) {
  std::vector<int> v;
  for (const std::string& item : split_commas(text)) {
    double d = 0;
    const bool ok = to_double(item, d) && d >= 1 && d <= std::numeric_limits<int>::max() && d == std::floor(d) &&
                    item.find_first_of(".eExXpPnN") == std::string::npos;
    SAV_CHECK(ok, what << " must be a comma-separated list of positive integers, got '" << text << "'");
    v.push_back(static_cast<int>(d));
  }
  SAV_CHECK(!v.empty(), what << " must be a comma-separated list of positive integers, got an empty value");
  return v;
}

std::array<float, 2> parse_alpha(const std::string& text) {
  const std::vector<std::string> items = split_commas(text);
  SAV_CHECK(items.size() == 2, "--alpha needs two positive numbers \"a,b\", got '" << text << "'");
  return {parse_float(items[0], "--alpha (first of \"a,b\")", FloatRule::positive),
          parse_float(items[1], "--alpha (second of \"a,b\")", FloatRule::positive)};
}

}  // namespace sav
