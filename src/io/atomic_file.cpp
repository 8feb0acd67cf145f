#include "io/atomic_file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <utility>

#include "core/error.h"

namespace sav {

namespace {

std::string errno_str(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

std::string folder_of(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? std::string(".") : dir;
}

// fsync of the folder, so the rename is durable. File systems that cannot sync a folder answer EINVAL
// (or ENOTSUP); the rename is still atomic there, so those are not errors.
void fsync_folder(const std::string& dir, const std::string& path) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    int e = errno;
    SAV_THROW("wrote '" << path << "' but cannot open its folder '" << dir << "' to sync it: " << errno_str(e));
  }
  int rc;
  do { rc = ::fsync(dfd); } while (rc != 0 && errno == EINTR);
  int e = errno;
  ::close(dfd);
  if (rc != 0 && e != EINVAL && e != ENOTSUP)
    SAV_THROW("wrote '" << path << "' but syncing its folder '" << dir << "' failed: " << errno_str(e));
}

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  SAV_CHECK(!path_.empty(), "AtomicFile: empty destination path");
  SAV_CHECK(path_.back() != '/', "AtomicFile: destination '" << path_ << "' names a folder, not a file");
  const std::string base = path_ + ".tmp." + std::to_string(::getpid());
  // O_EXCL: never write into a file someone else (another thread, a stale run) is writing.
  for (int k = 0; k < 100; ++k) {
    temp_path_ = k == 0 ? base : base + "." + std::to_string(k);
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ >= 0) return;
    if (errno == EINTR) { --k; continue; }
    if (errno != EEXIST) break;
  }
  int e = errno;
  std::string dir = folder_of(path_);
  std::string hint;
  if (e == ENOENT) hint = "; does the folder '" + dir + "' exist?";
  else if (e == EACCES || e == EPERM || e == EROFS) hint = "; is the folder '" + dir + "' writable?";
  SAV_THROW("cannot write '" << path_ << "': creating the temporary file '" << temp_path_
                             << "' failed: " << errno_str(e) << hint);
}

AtomicFile::~AtomicFile() { discard(); }

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
    ::unlink(temp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t bytes) {
  SAV_CHECK(fd_ >= 0, "AtomicFile '" << path_ << "': write after commit() or discard()");
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    // Linux writes at most ~2 GiB per call; keep chunks well below that.
    size_t chunk = bytes < (size_t{1} << 30) ? bytes : (size_t{1} << 30);
    ssize_t n = ::write(fd_, p, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      SAV_THROW("writing '" << path_ << "' (temporary '" << temp_path_ << "', " << written_
                            << " bytes written so far) failed: " << errno_str(e));
    }
    SAV_CHECK(n > 0, "writing '" << path_ << "': the system wrote 0 bytes (disk full?)");
    p += n;
    bytes -= static_cast<size_t>(n);
    written_ += static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  SAV_CHECK(fd_ >= 0, "AtomicFile '" << path_ << "': commit() after commit() or discard()");
  int rc;
  do { rc = ::fsync(fd_); } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int e = errno;
    SAV_THROW("writing '" << path_ << "': fsync of the temporary '" << temp_path_ << "' failed: " << errno_str(e));
  }
  // close() can report a deferred write error (NFS, quotas): check it, then forget the fd either way.
  rc = ::close(fd_);
  int close_errno = errno;
  fd_ = -1;
  if (rc != 0 && close_errno != EINTR) {
    ::unlink(temp_path_.c_str());
    SAV_THROW("writing '" << path_ << "': closing the temporary '" << temp_path_
                          << "' failed: " << errno_str(close_errno));
  }
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    int e = errno;
    ::unlink(temp_path_.c_str());
    SAV_THROW("cannot replace '" << path_ << "' with the new file '" << temp_path_ << "': " << errno_str(e));
  }
  committed_ = true;
  fsync_folder(folder_of(path_), path_);
}

}  // namespace sav
