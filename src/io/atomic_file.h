// shiftaddvit: atomic file replacement.
//
// An AtomicFile writes a new version of `path` so that readers (and a crash at any moment) see either
// the old file, unchanged, or the complete new one, never a half-written mix:
//   1. the bytes go to a temporary file `path.tmp.<pid>` in the same folder (same file system, so the
//      final rename is atomic); if that name is taken, `path.tmp.<pid>.<k>` for a small k;
//   2. commit() flushes the data to disk (fsync), closes, renames the temporary over `path`, then
//      fsyncs the folder so the rename itself survives a power loss;
//   3. destroyed without commit() (an exception, an early return), the temporary file is removed and
//      `path` is untouched. A process killed mid-write leaves only a stale `path.tmp.<pid>` behind.
// Every failure (ENOSPC, EACCES, a missing folder, ...) throws sav::Error naming the path and strerror.
// Readers that memory-map the old file keep seeing the old bytes: rename replaces the name, not the inode.
//
//   sav::AtomicFile f("/ckpt/model.safetensors");
//   f.write(header.data(), header.size());
//   f.write(t.data(), t.nbytes());
//   f.commit();                       // without this line, model.safetensors keeps its old content
//
// The new file gets mode 0666 & ~umask, like any newly created file.
#pragma once

#include <cstddef>
#include <string>

namespace sav {

class AtomicFile {
 public:
  // Creates the temporary file next to `path`. Throws if the folder is missing or not writable.
  explicit AtomicFile(std::string path);
  // Removes the temporary file unless commit() succeeded. Never throws.
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Appends `bytes` bytes (retries short writes and EINTR).
  void write(const void* data, size_t bytes);
  // fsync, close, rename over path(), fsync the folder. After it, write() and commit() throw.
  void commit();
  // Abandons the write now (closes and removes the temporary); what the destructor does. Never throws.
  void discard() noexcept;

  const std::string& path() const { return path_; }            // the destination
  const std::string& temp_path() const { return temp_path_; }  // where bytes go until commit()
  size_t bytes_written() const { return written_; }
  bool committed() const { return committed_; }

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  size_t written_ = 0;
  bool committed_ = false;
};

}  // namespace sav
