// Files in and out without third-party libraries: .npy arrays in (initial latents), PNG images out.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace diffkiln {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, converted to fp32
};

// A float .npy file (float16/32/64, either byte order, C or Fortran order) of at most max_bytes of data: the
// contract of `diffkiln run --latents`. Anything else (an .npz, a pickle, a lying header) is a one-line Error.
NpyArray read_npy(const std::filesystem::path& path, size_t max_bytes = size_t(1) << 30);

// An 8-bit RGB PNG (stored deflate blocks, crc32 + adler32), with tEXt/iTXt chunks; written to a temporary file
// beside `path` and renamed into place, so a reader never sees half an image.
void write_png(const std::filesystem::path& path, int width, int height, const std::vector<uint8_t>& rgb,
               const std::map<std::string, std::string>& text = {});

}  // namespace diffkiln
