// shiftaddvit: errors.
//
// Library code never exits: every failure throws sav::Error carrying file:line, the failed condition
// and a hint of what to do. Only the command-line program (tools/) catches and exits.
//
//   SAV_CHECK(n > 0, "batch size must be positive, got " << n);
//   SAV_THROW("unknown arch '" << name << "'; try one of: " << list);
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace sav {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line)
      : std::runtime_error(message), file_(file), line_(line) {}
  const char* file() const { return file_; }
  int line() const { return line_; }
  // "message (at src/io/safetensors.cpp:123)"
  std::string where() const;

 private:
  const char* file_;
  int line_;
};

}  // namespace sav

#define SAV_THROW(msg)                                              \
  do {                                                              \
    std::ostringstream sav_os_;                                     \
    sav_os_ << msg;                                                 \
    throw ::sav::Error(sav_os_.str(), __FILE__, __LINE__);          \
  } while (0)

#define SAV_CHECK(cond, msg)                                        \
  do {                                                              \
    if (!(cond)) SAV_THROW(msg << " [check failed: " #cond "]");    \
  } while (0)
