// Kiln dirs and tensors: manifest.json read as diffkiln/kiln_reader.py reads it (schema, confinement, sizes,
// ONNX external-data locations checked from the protobuf wire format before any runtime opens the graph).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <set>
#include <sstream>

#include "diffkiln/runtime.hpp"

namespace fs = std::filesystem;

namespace diffkiln {

// ---------------------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------------------

size_t dtype_size(DType t) { return t == DType::f16 ? 2 : t == DType::i64 ? 8 : 4; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "?";
}

static size_t count(const std::vector<int64_t>& dims) {
  size_t n = 1;
  for (int64_t d : dims) {
    if (d < 0) throw Error("negative tensor dimension");
    n *= static_cast<size_t>(d);
  }
  return n;
}

Tensor::Tensor(DType type, std::vector<int64_t> dims)
    : dtype(type), shape(std::move(dims)), bytes(count(shape) * dtype_size(type), 0) {}

Tensor Tensor::f32(std::vector<int64_t> dims, const std::vector<float>& values) {
  Tensor t(DType::f32, std::move(dims));
  if (values.size() != t.numel()) throw Error("tensor values do not fill its shape");
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

Tensor Tensor::i32(std::vector<int64_t> dims, const std::vector<int32_t>& values) {
  Tensor t(DType::i32, std::move(dims));
  if (values.size() != t.numel()) throw Error("tensor values do not fill its shape");
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

size_t Tensor::numel() const { return count(shape); }

std::string Tensor::describe() const {
  std::ostringstream s;
  s << dtype_name(dtype) << " [";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; mant <<= 1; } while ((mant & 0x400) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, as numpy's astype(float16)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t exp = int32_t((x >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = x & 0x7FFFFF;
  if (((x >> 23) & 0xFF) == 0xFF) return uint16_t(sign | 0x7C00 | (mant ? 0x200 : 0));
  if (exp >= 0x1F) return uint16_t(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000;
    uint32_t shift = uint32_t(14 - exp), half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = sign | (uint32_t(exp) << 10) | (mant >> 13), rem = mant & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;  // may carry into the exponent: correct
  return uint16_t(half);
}

Tensor Tensor::to(DType type) const {
  if (type == dtype) return *this;
  Tensor out(type, shape);
  size_t n = numel();
  if (dtype == DType::f32 && type == DType::f16) {
    for (size_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = float_to_half(data<float>()[i]);
  } else if (dtype == DType::f16 && type == DType::f32) {
    for (size_t i = 0; i < n; ++i) out.data<float>()[i] = half_to_float(data<uint16_t>()[i]);
  } else if (dtype == DType::i32 && type == DType::i64) {
    for (size_t i = 0; i < n; ++i) out.data<int64_t>()[i] = data<int32_t>()[i];
  } else if (dtype == DType::i64 && type == DType::i32) {
    for (size_t i = 0; i < n; ++i) out.data<int32_t>()[i] = static_cast<int32_t>(data<int64_t>()[i]);
  } else {
    throw Error(std::string("cannot convert a ") + dtype_name(dtype) + " tensor to " + dtype_name(type));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------------------

static bool is_within(const fs::path& base, const fs::path& p) {
  auto b = base.begin(), e = base.end();
  auto i = p.begin();
  for (; b != e; ++b, ++i) {
    if (i == p.end() || *i != *b) return false;
  }
  return true;
}

fs::path inside(const fs::path& root, const std::string& rel, const std::string& what) {
  if (rel.empty() || rel.find('\0') != std::string::npos)
    throw Error(what + " is not a file name; the kiln dir is damaged or crafted: do not use it");
  fs::path path(rel);
  std::error_code ec;
  fs::path base = fs::weakly_canonical(root, ec);
  fs::path full = ec ? fs::path() : fs::weakly_canonical(base / path, ec);
  if (ec || path.is_absolute() || !is_within(base, full))
    throw Error(what + " points outside " + root.string() + " ('" + rel +
                "'); a kiln dir may only name files inside itself: do not use it");
  return root / path;
}

// No symlink under `folder` may lead outside `root` (kiln_reader.check_tree).
static void check_tree(const fs::path& root, const fs::path& folder) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) return;
  fs::path base = fs::weakly_canonical(root, ec);
  for (auto it = fs::recursive_directory_iterator(folder, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    if (it->is_symlink(ec) && !is_within(base, fs::weakly_canonical(it->path(), ec)))
      throw Error(it->path().string() + " is a link outside " + root.string() + ": do not use this kiln dir");
  }
}

// ---------------------------------------------------------------------------------------------------------
// ONNX external-data locations from the protobuf wire format (kiln_reader.external_locations)
// ---------------------------------------------------------------------------------------------------------
namespace {

struct Wire {
  const uint8_t* buf;
  uint64_t varint(size_t& i, size_t end) const {
    uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
      if (i >= end || shift > 63) throw Error("bad varint");
      uint8_t byte = buf[i++];
      value |= uint64_t(byte & 0x7F) << shift;
      if (byte < 0x80) return value;
    }
  }
  // calls f(field, begin, end) for each length-delimited field of buf[start:end]
  template <class F>
  void fields(size_t start, size_t end, F&& f) const {
    size_t i = start;
    while (i < end) {
      uint64_t key = varint(i, end), wire = key & 7;
      if (wire == 0) varint(i, end);
      else if (wire == 1) i += 8;
      else if (wire == 5) i += 4;
      else if (wire == 2) {
        uint64_t n = varint(i, end);
        if (n > end - i) throw Error("field runs past its message");
        f(int(key >> 3), i, size_t(i + n));
        i += n;
      } else throw Error("bad wire type");
    }
    if (i != end) throw Error("message runs past its end");
  }
};

enum Msg { kModel, kGraph, kNode, kAttribute, kSparse, kTraining, kFunction, kTensor, kNone };

Msg child(Msg parent, int field) {
  switch (parent) {
    case kModel: return field == 7 ? kGraph : field == 20 ? kTraining : field == 25 ? kFunction : kNone;
    case kGraph: return field == 1 ? kNode : field == 5 ? kTensor : field == 15 ? kSparse : kNone;
    case kNode: return field == 5 ? kAttribute : kNone;
    case kAttribute:
      return (field == 5 || field == 10) ? kTensor : (field == 6 || field == 11) ? kGraph
             : (field == 22 || field == 23) ? kSparse : kNone;
    case kSparse: return (field == 1 || field == 2) ? kTensor : kNone;
    case kTraining: return (field == 1 || field == 2) ? kGraph : kNone;
    case kFunction: return field == 7 ? kNode : kNone;
    default: return kNone;
  }
}

void walk(const Wire& w, size_t start, size_t end, Msg msg, int depth, std::vector<std::string>& found) {
  if (depth > 64) throw Error("nested too deep");
  w.fields(start, end, [&](int field, size_t b, size_t e) {
    if (msg == kTensor) {
      if (field != 13) return;  // TensorProto.external_data: StringStringEntryProto {key = 1, value = 2}
      std::string key, value;
      w.fields(b, e, [&](int f, size_t b2, size_t e2) {
        std::string s(reinterpret_cast<const char*>(w.buf + b2), e2 - b2);
        if (f == 1) key = s;
        if (f == 2) value = s;
      });
      if (key == "location") found.push_back(value);
      return;
    }
    Msg c = child(msg, field);
    if (c != kNone) walk(w, b, e, c, depth + 1, found);
  });
}

std::vector<std::string> external_locations(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot read " + path.string());
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size == 0) {
    ::close(fd);
    throw Error(path.string() + " is not a valid ONNX file (empty); re-export or re-download it");
  }
  void* map = mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw Error("cannot map " + path.string());
  std::vector<std::string> found;
  try {
    walk(Wire{static_cast<const uint8_t*>(map)}, 0, size_t(st.st_size), kModel, 0, found);
  } catch (const Error&) {
    munmap(map, size_t(st.st_size));
    throw Error(path.string() + " is not a valid ONNX file (truncated or corrupt); re-export or re-download it");
  }
  munmap(map, size_t(st.st_size));
  return found;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The manifest
// ---------------------------------------------------------------------------------------------------------

static const std::set<std::string> kComponents = {"text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                  "vae_encoder"};

Kiln Kiln::open(const fs::path& dir) {
  Kiln k;
  k.dir_ = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error("no such kiln directory: " + dir.string());
  fs::path mpath = dir / "manifest.json";
  if (!fs::is_regular_file(mpath, ec))
    throw Error(dir.string() + " has no manifest.json; it is not a kiln directory (run `diffkiln export` first)");
  inside(dir, "manifest.json", "manifest.json");
  k.manifest_ = json::parse_file(mpath.string());
  const json::Value& m = k.manifest_;
  std::string where = mpath.string() + ": ";
  auto bad = [&](const std::string& field, const std::string& why) {
    return Error(where + field + " " + why + "; the manifest is damaged or crafted (re-export it)");
  };
  if (!m.is_object()) throw bad("the manifest", "is not an object");
  for (const char* key : {"pipeline", "components", "source"})
    if (!m.get(key) || !m.get(key)->is_object()) throw bad(key, "is missing or not an object");
  if (!m.get("format_version") || !m.get("format_version")->is_int()) throw bad("format_version", "is not an integer");

  const json::Value& p = *m.get("pipeline");
  auto int_in = [&](const char* key, int64_t lo, int64_t hi) {
    const json::Value* v = p.get(key);
    if (!v || !v->is_int() || v->num < double(lo) || v->num > double(hi))
      throw bad(std::string("pipeline.") + key, "is missing or outside " + std::to_string(lo) + ".." +
                                                    std::to_string(hi));
    return int(v->num);
  };
  PipelineInfo& info = k.info_;
  info.kind = p.get_string("kind", where + "pipeline.kind");
  if (info.kind != "sd1" && info.kind != "sd2" && info.kind != "sdxl") throw bad("pipeline.kind", "is unknown");
  info.latent_channels = int_in("latent_channels", 1, 64);
  info.sample_size = int_in("sample_size", 2, 1024);
  info.num_down = int_in("num_down", 0, 8);
  info.cross_attention_dim = int_in("cross_attention_dim", 1, 1 << 16);
  info.scaling_factor = p.get_number("scaling_factor", where + "pipeline.scaling_factor");
  if (!(info.scaling_factor >= 1e-6 && info.scaling_factor <= 1e3)) throw bad("pipeline.scaling_factor", "is out of range");
  info.prediction_type = p.get_string("prediction_type", where + "pipeline.prediction_type");
  if (info.prediction_type != "epsilon" && info.prediction_type != "v_prediction" && info.prediction_type != "sample")
    throw bad("pipeline.prediction_type", "is unknown");
  if (const json::Value* c = p.get("contract")) {
    if (!c->is_string() || (c->str != "diffkiln" && c->str != "optimum")) throw bad("pipeline.contract", "is unknown");
    info.contract = c->str;
  }

  if (const json::Value* layers = p.get("text_layers"); layers && layers->is_array())
    for (const json::Value& n : layers->items) {
      if (!n.is_int() || n.num < 0 || n.num > 1024) throw bad("pipeline.text_layers", "is not a layer count per text encoder");
      info.text_layers.push_back(int(n.num));
    }

  for (const auto& [name, record] : m.get("components")->fields) {
    if (!kComponents.count(name)) throw bad("components", "names unknown component '" + name + "'");
    if (!record.is_object() || !record.get("path") || !record.get("path")->is_string())
      throw bad("components." + name, "has no path");
    const json::Value* files = record.get("files");
    if (!files || !files->is_object()) throw bad("components." + name + ".files", "is not a {name: {bytes, sha256}} map");
    for (const auto& [fname, meta] : files->fields) {
      const json::Value* bytes = meta.get("bytes");
      if (!bytes || !bytes->is_int() || bytes->num < 0 || !meta.get("sha256") || !meta.get("sha256")->is_string())
        throw bad("components." + name + ".files", "is not a {name: {bytes, sha256}} map");
    }
    // confinement and sizes (kiln_reader.check_paths)
    fs::path graph = inside(dir, record.get("path")->str, "components." + name + ".path");
    fs::path folder = dir / name;
    if (fs::weakly_canonical(graph, ec).parent_path() != fs::weakly_canonical(folder, ec))
      throw Error(where + "components." + name + ".path is not a file in " + name + "/; do not use it");
    check_tree(dir, folder);
    for (const auto& [fname, meta] : files->fields) {
      fs::path f = inside(folder, fname, "components." + name + ".files '" + fname + "'");
      if (fs::is_regular_file(f, ec) && fs::file_size(f, ec) != uint64_t(meta.get("bytes")->num))
        throw Error(f.string() + " is not the size the manifest records: the kiln dir is truncated or was changed; "
                    "re-export or re-download it");
    }
    if (fs::is_regular_file(graph, ec))
      for (const std::string& location : external_locations(graph))
        inside(folder, location, name + "/" + graph.filename().string() + ": external data location");
  }
  if (const json::Value* t = m.get("tokenizers")) {
    if (!t->is_array()) throw bad("tokenizers", "is not a list of folder names");
    for (const auto& f : t->items) {
      if (!f.is_string()) throw bad("tokenizers", "is not a list of folder names");
      check_tree(dir, inside(dir, f.str, "manifest entry tokenizers '" + f.str + "'"));
    }
  }
  if (const json::Value* s = m.get("scheduler")) {
    if (!s->is_string()) throw bad("scheduler", "is not a file name");
    inside(dir, s->str, "manifest entry scheduler");
  }
  return k;
}

bool Kiln::has(const std::string& component) const {
  const json::Value* r = manifest_.get("components")->get(component);
  std::error_code ec;
  return r && fs::is_regular_file(dir_ / r->get("path")->str, ec);
}

fs::path Kiln::model_path(const std::string& component) const {
  if (!has(component))
    throw Error(dir_.string() + " has no " + component + "; re-export it with `diffkiln export SOURCE -o " +
                dir_.string() + " --force`");
  return inside(dir_, manifest_.get("components")->get(component)->get("path")->str, "components." + component);
}

std::string Kiln::model_sha256(const std::string& component) const {
  const json::Value* r = manifest_.get("components")->get(component);
  const json::Value* f = r ? r->get("files") : nullptr;
  const json::Value* g = f ? f->get("model.onnx") : nullptr;
  const json::Value* s = g ? g->get("sha256") : nullptr;
  return s && s->is_string() ? s->str : "";
}

std::string Kiln::precision(const std::string& component) const {
  const json::Value* r = manifest_.get("components")->get(component);
  if (r && r->get("precision") && r->get("precision")->is_string()) return r->get("precision")->str;
  const json::Value* p = manifest_.get("precision");
  return p && p->is_string() ? p->str : "fp32";
}

std::vector<fs::path> Kiln::tokenizer_dirs() const {
  std::vector<fs::path> out;
  if (const json::Value* t = manifest_.get("tokenizers"))
    for (const auto& f : t->items) out.push_back(inside(dir_, f.str, "manifest entry tokenizers"));
  return out;
}

fs::path Kiln::scheduler_config() const {
  const json::Value* s = manifest_.get("scheduler");
  return inside(dir_, s ? s->str : "scheduler/scheduler_config.json", "manifest entry scheduler");
}

int Kiln::max_side() const {
  const json::Value* unet = manifest_.get("components")->get("unet");
  const json::Value* contract = unet ? unet->get("contract") : nullptr;
  const json::Value* profile = contract ? contract->get("profile") : nullptr;
  int side = 0;
  for (const char* key : {"height", "width"}) {
    const json::Value* r = profile ? profile->get(key) : nullptr;
    if (!r || !r->is_array() || r->items.empty() || !r->items.back().is_int() || r->items.back().num <= 0)
      return 2 * info_.sample_size * 8;
    int v = int(r->items.back().num) * 8;
    side = side ? std::min(side, v) : v;
  }
  return side;
}

// ---------------------------------------------------------------------------------------------------------
// engine.json (diffkiln/engines.py)
// ---------------------------------------------------------------------------------------------------------

bool json_equal(const json::Value* a, const json::Value* b) {
  bool an = !a || a->is_null(), bn = !b || b->is_null();
  if (an || bn) return an && bn;
  if (a->kind != b->kind) return false;
  switch (a->kind) {
    case json::Value::Kind::boolean: return a->b == b->b;
    case json::Value::Kind::number: return a->num == b->num;
    case json::Value::Kind::string: return a->str == b->str;
    case json::Value::Kind::array:
      if (a->items.size() != b->items.size()) return false;
      for (size_t i = 0; i < a->items.size(); ++i)
        if (!json_equal(&a->items[i], &b->items[i])) return false;
      return true;
    case json::Value::Kind::object:
      if (a->fields.size() != b->fields.size()) return false;
      for (const auto& [k, v] : a->fields)
        if (!b->get(k) || !json_equal(&v, b->get(k))) return false;
      return true;
    default: return true;
  }
}

json::Value read_engine_manifest(const fs::path& folder) {
  fs::path path = folder / "engine.json";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw Error(folder.string() + " has no engine.json; build engines with `diffkiln build KILN`");
  json::Value m = json::parse_file(path.string());
  auto bad = [&](const std::string& why) { return Error(path.string() + ": " + why + "; rebuild with `diffkiln build`"); };
  const json::Value* format = m.get("format");
  if (!m.is_object() || !format || !format->is_string() || format->str != "diffkiln-engines/1")
    throw bad("not a diffkiln engine manifest (format 'diffkiln-engines/1' expected)");
  const json::Value* device = m.get("device");
  for (const char* key : {"trt_version", "gpu_name", "compute_capability"})
    if (!device || !device->get(key) || !device->get(key)->is_string())
      throw bad("device must record trt_version, gpu_name and compute_capability");
  const json::Value* components = m.get("components");
  if (!components || !components->is_object() || components->fields.empty())
    throw bad("components must name at least one engine");
  for (const auto& [name, r] : components->fields) {
    if (!r.is_object()) throw bad("component '" + name + "' is not a record");
    if (!r.get("plan") || !r.get("plan")->is_string() || !r.get("bytes") || !r.get("bytes")->is_int())
      throw bad("component '" + name + "' needs plan (a file name) and bytes");
    if (!r.get("source_sha256") || !r.get("source_sha256")->is_string() || !r.get("profiles") ||
        !r.get("profiles")->is_object())
      throw bad("component '" + name + "' needs source_sha256 and profiles");
    fs::path plan = inside(folder, r.get("plan")->str, "engine.json plan of '" + name + "'");
    if (!fs::is_regular_file(plan, ec)) throw bad(r.get("plan")->str + " is missing");
    if (fs::file_size(plan, ec) != uint64_t(r.get("bytes")->num))
      throw Error(plan.string() + " is not the engine engine.json records (size differs); rebuild it");
  }
  return m;
}

std::string engine_mismatch(const json::Value& engine, const std::string& component, const std::string& trt_version,
                            const std::string& compute_capability, const std::string& gpu_name, const Kiln& kiln) {
  const json::Value& built = *engine.get("device");
  if (built.get("trt_version")->str != trt_version)
    return "built with TensorRT " + built.get("trt_version")->str + ", this is TensorRT " + trt_version;
  if (built.get("compute_capability")->str != compute_capability)
    return "built for " + built.get("gpu_name")->str + " (sm" + built.get("compute_capability")->str + "), this GPU is " +
           gpu_name + " (sm" + compute_capability + ")";
  const json::Value* record = engine.get("components")->get(component);
  if (!record) return "has no " + component + " engine";
  if (kiln.model_sha256(component) != record->get("source_sha256")->str)
    return component + " was built from another graph (the kiln's " + component + "/model.onnx changed since)";
  const json::Value* p = record->get("precision");
  std::string precision = p && p->is_string() ? p->str : "fp32";
  if (precision != kiln.precision(component))
    return component + " engine is " + precision + ", the kiln's graph is " + kiln.precision(component);
  if (!json_equal(engine.get("lora"), kiln.manifest().get("lora")))
    return "built with other LoRAs folded in than the kiln dir now holds";
  return "";
}

}  // namespace diffkiln
