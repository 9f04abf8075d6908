// .npy reader and PNG writer (see image_io.hpp).
#include "diffkiln/image_io.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "diffkiln/runtime.hpp"

namespace fs = std::filesystem;

namespace diffkiln {

// ---------------------------------------------------------------------------------------------------------
// .npy: magic, version, header length, a Python dict literal {'descr', 'fortran_order', 'shape'}, then the data
// ---------------------------------------------------------------------------------------------------------

NpyArray read_npy(const fs::path& path, size_t max_bytes) {
  std::string name = path.string();
  auto not_npy = [&](const std::string& why) {
    return Error(name + " is not a .npy array file (" + why + "); save one with numpy.save");
  };
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error("no such file: " + name);
  if (!fs::is_regular_file(path, ec)) throw not_npy("not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + name);
  uint64_t file_size = fs::file_size(path, ec);
  char magic[8];
  if (!in.read(magic, 8)) throw not_npy("too short");
  if (std::memcmp(magic, "PK\x03\x04", 4) == 0)
    throw Error(name + " is not a single .npy array (an .npz archive?); save one with numpy.save");
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw not_npy("no NUMPY magic");
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) throw not_npy("too short");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) throw not_npy("too short");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  } else {
    throw not_npy("unknown version");
  }
  if (header_len > 65536) throw not_npy("header too long");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) throw not_npy("truncated header");

  auto field = [&](const std::string& key) {
    size_t k = header.find("'" + key + "'");
    if (k == std::string::npos) throw not_npy("header lacks " + key);
    size_t colon = header.find(':', k);
    if (colon == std::string::npos) throw not_npy("bad header");
    size_t v = header.find_first_not_of(' ', colon + 1);
    if (v == std::string::npos) throw not_npy("bad header");
    return v;
  };
  size_t d = field("descr");
  if (header[d] != '\'') throw not_npy("descr is not a simple dtype");
  size_t d_end = header.find('\'', d + 1);
  std::string descr = header.substr(d + 1, d_end - d - 1);
  bool fortran = header.compare(field("fortran_order"), 4, "True") == 0;
  size_t s = field("shape");
  if (header[s] != '(') throw not_npy("bad shape");
  size_t s_end = header.find(')', s);
  if (s_end == std::string::npos) throw not_npy("bad shape");
  NpyArray a;
  std::string dims = header.substr(s + 1, s_end - s - 1);
  size_t count = 1;
  for (size_t i = 0; i < dims.size();) {
    while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
    if (i >= dims.size()) break;
    size_t j = i;
    while (j < dims.size() && dims[j] >= '0' && dims[j] <= '9') ++j;
    if (j == i || j - i > 12) throw not_npy("bad shape");
    int64_t n = std::stoll(dims.substr(i, j - i));
    a.shape.push_back(n);
    if (n != 0 && count > (size_t(1) << 40) / size_t(n)) throw not_npy("shape too large");
    count *= size_t(n);
    i = j;
  }
  bool floating = descr.size() == 3 && (descr[0] == '<' || descr[0] == '>' || descr[0] == '=') && descr[1] == 'f' &&
                  (descr[2] == '2' || descr[2] == '4' || descr[2] == '8');
  std::string dtype = floating ? "float" + std::to_string((descr[2] - '0') * 8) : descr;
  std::string shape_text = "[";
  for (size_t i = 0; i < a.shape.size(); ++i) shape_text += (i ? ", " : "") + std::to_string(a.shape[i]);
  shape_text += "]";
  size_t itemsize = floating ? size_t(descr[2] - '0') : 1;
  if (!floating || a.shape.size() != 4 || count * itemsize > max_bytes)
    throw Error("--latents must hold a float array [B, 4, h, w] under 1 GB, got " + dtype + " " + shape_text);
  size_t offset = (major == 1 ? 10 : 12) + header_len;
  if (file_size < offset + count * itemsize) throw not_npy("the data is shorter than its header claims");
  std::vector<unsigned char> raw(count * itemsize);
  if (!in.read(reinterpret_cast<char*>(raw.data()), std::streamsize(raw.size()))) throw not_npy("truncated data");
  bool swap = descr[0] == '>';  // this reader runs on little-endian machines (x86-64, aarch64)
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) {
    unsigned char* p = raw.data() + i * itemsize;
    if (swap) std::reverse(p, p + itemsize);
    if (itemsize == 2) { uint16_t h; std::memcpy(&h, p, 2); values[i] = half_to_float(h); }
    else if (itemsize == 4) std::memcpy(&values[i], p, 4);
    else { double x; std::memcpy(&x, p, 8); values[i] = float(x); }
  }
  if (fortran) {  // column-major on disk: element (i0..i3) sits at i0 + n0*(i1 + n1*(i2 + n2*i3))
    a.data.resize(count);
    const auto& n = a.shape;
    size_t k = 0;
    for (int64_t i0 = 0; i0 < n[0]; ++i0)
      for (int64_t i1 = 0; i1 < n[1]; ++i1)
        for (int64_t i2 = 0; i2 < n[2]; ++i2)
          for (int64_t i3 = 0; i3 < n[3]; ++i3) a.data[k++] = values[size_t(i0 + n[0] * (i1 + n[1] * (i2 + n[2] * i3)))];
  } else {
    a.data = std::move(values);
  }
  return a;
}

// ---------------------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------------------
namespace {

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t adler32(const uint8_t* data, size_t n) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % 65521;
    b = (b + a) % 65521;
  }
  return (b << 16) | a;
}

void put32(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(uint8_t(v >> s));
}

void chunk(std::vector<uint8_t>& png, const char* type, const std::vector<uint8_t>& body) {
  put32(png, uint32_t(body.size()));
  size_t start = png.size();
  png.insert(png.end(), type, type + 4);
  png.insert(png.end(), body.begin(), body.end());
  put32(png, crc32(png.data() + start, png.size() - start));
}

}  // namespace

void write_png(const fs::path& path, int width, int height, const std::vector<uint8_t>& rgb,
               const std::map<std::string, std::string>& text) {
  if (width <= 0 || height <= 0 || rgb.size() != size_t(width) * size_t(height) * 3)
    throw Error("write_png: the pixels do not fill a " + std::to_string(width) + "x" + std::to_string(height) + " image");
  std::vector<uint8_t> raw;  // each row: filter type 0, then its pixels
  raw.reserve(size_t(height) * (size_t(width) * 3 + 1));
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb.begin() + long(size_t(y) * size_t(width) * 3), rgb.begin() + long(size_t(y + 1) * size_t(width) * 3));
  }
  std::vector<uint8_t> z = {0x78, 0x01};  // zlib: deflate, 32K window, no compression
  for (size_t pos = 0; pos < raw.size() || pos == 0;) {
    size_t n = std::min<size_t>(65535, raw.size() - pos);
    bool last = pos + n == raw.size();
    z.push_back(last ? 1 : 0);  // a stored block
    z.push_back(uint8_t(n));
    z.push_back(uint8_t(n >> 8));
    z.push_back(uint8_t(~n));
    z.push_back(uint8_t(~n >> 8));
    z.insert(z.end(), raw.begin() + long(pos), raw.begin() + long(pos + n));
    pos += n;
    if (last) break;
  }
  put32(z, adler32(raw.data(), raw.size()));

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'}, ihdr;
  put32(ihdr, uint32_t(width));
  put32(ihdr, uint32_t(height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit, RGB, deflate, adaptive filtering, no interlace
  chunk(png, "IHDR", ihdr);
  for (const auto& [key, value] : text) {
    bool ascii = std::all_of(value.begin(), value.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
    std::vector<uint8_t> body(key.begin(), key.end());
    body.push_back(0);
    if (!ascii) body.insert(body.end(), {0, 0, 0, 0});  // iTXt: uncompressed, no language, no translated key
    body.insert(body.end(), value.begin(), value.end());
    chunk(png, ascii ? "tEXt" : "iTXt", body);
  }
  chunk(png, "IDAT", z);
  chunk(png, "IEND", {});

  fs::path tmp = path.parent_path() / ("." + path.filename().string() + "." + std::to_string(getpid()) + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(png.data()), std::streamsize(png.size()));
    out.close();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw Error("cannot write " + path.string());
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error("cannot write " + path.string() + ": " + ec.message());
  }
}

}  // namespace diffkiln
