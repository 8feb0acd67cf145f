#include "core/error.h"

namespace sav {

std::string Error::where() const {
  std::string f = file_;
  auto pos = f.rfind("src/");
  if (pos != std::string::npos) f = f.substr(pos);
  return std::string(what()) + " (at " + f + ":" + std::to_string(line_) + ")";
}

}  // namespace sav
