// diffkiln_rt: run a kiln dir's components (and TensorRT engines built from them) from C++.
//
//   auto kiln = diffkiln::Kiln::open("kilns/demo");              // manifest.json read, validated, confined
//   auto backend = diffkiln::openvino_backend("CPU", "f32");     // or tensorrt_backend(kiln, engine_dir)
//   auto unet = backend->load(kiln, "unet");                     // one Component per graph
//   diffkiln::TensorMap out = unet->infer({{"sample", x}, {"timestep", t}, {"encoder_hidden_states", c}});
//
// Tensors are passed by name, in fp32/int32 as the kiln contract states them (docs/FORMATS.md); a component
// converts to what its graph takes (int64 ids, fp16 I/O of `--fp16-io` graphs, a scalar timestep) and hands
// back fp32. Every fault — a damaged manifest, a path leading out of the kiln dir, a stale engine — is one
// diffkiln::Error whose what() is a one-line message.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "diffkiln/json.hpp"

namespace diffkiln {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { f32, f16, i32, i64 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);

// A dense row-major tensor owning its bytes.
struct Tensor {
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  Tensor() = default;
  Tensor(DType type, std::vector<int64_t> dims);  // zero-filled
  static Tensor f32(std::vector<int64_t> dims, const std::vector<float>& values);
  static Tensor i32(std::vector<int64_t> dims, const std::vector<int32_t>& values);

  size_t numel() const;
  template <class T>
  T* data() { return reinterpret_cast<T*>(bytes.data()); }
  template <class T>
  const T* data() const { return reinterpret_cast<const T*>(bytes.data()); }
  Tensor to(DType type) const;  // f32 <-> f16, i32 <-> i64; the same tensor when already `type`
  std::string describe() const;  // "float32 [2, 4, 8, 8]"
};
using TensorMap = std::map<std::string, Tensor>;

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// `root / rel` when `rel` is a relative path that stays inside `root` once resolved (symlinks followed).
std::filesystem::path inside(const std::filesystem::path& root, const std::string& rel, const std::string& what);

// The `pipeline` record of manifest.json (docs/FORMATS.md).
struct PipelineInfo {
  std::string kind;  // sd1 | sd2 | sdxl
  int latent_channels = 4;
  int sample_size = 64;  // latent side at the native size
  int num_down = 3;      // UNet downsamplings: image sides are multiples of 8 * 2^num_down
  int cross_attention_dim = 768;
  double scaling_factor = 0.18215;
  std::string prediction_type = "epsilon";
  std::string contract = "diffkiln";  // or "optimum"
  std::vector<int> text_layers;        // layers per text encoder (optimum's penultimate state is hidden_states.{L-1})
};

// A kiln directory: its validated manifest and the confined paths it names.
class Kiln {
 public:
  static Kiln open(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  const json::Value& manifest() const { return manifest_; }
  const PipelineInfo& pipeline() const { return info_; }
  std::string precision(const std::string& component) const;  // fp32 | fp16 | int8
  bool has(const std::string& component) const;
  // The graph of `component`: confined, present, and the size manifest.json records.
  std::filesystem::path model_path(const std::string& component) const;
  // sha256 of the component's model.onnx as manifest.json records it (what engine.json is checked against).
  std::string model_sha256(const std::string& component) const;
  std::vector<std::filesystem::path> tokenizer_dirs() const;
  std::filesystem::path scheduler_config() const;
  int max_side() const;  // the largest image side: the UNet profile's max (else 2x native)

 private:
  std::filesystem::path dir_;
  json::Value manifest_;
  PipelineInfo info_;
};

// One loaded graph, run by tensor name. Not thread-safe: one infer at a time.
class Component {
 public:
  virtual ~Component() = default;
  virtual const std::vector<std::string>& input_names() const = 0;
  virtual const std::vector<std::string>& output_names() const = 0;
  // Feeds by name; returns every output, fp16 ones as fp32. Throws Error on a missing feed or a failed run.
  virtual TensorMap infer(const TensorMap& feeds) = 0;
  virtual double last_seconds() const = 0;  // wall time of the last infer
};

// Makes Components: the one interface both implementations share.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::unique_ptr<Component> load(const Kiln& kiln, const std::string& component) = 0;
  virtual std::string name() const = 0;  // "openvino f32", "tensorrt 10.13.0.35"
};

// OpenVINO reads model.onnx directly (fp32, fp16 casts and Q/DQ int8 alike); the inference precision is always
// set (OpenVINO would otherwise run bf16 on CPUs that have it). precision_hint: f32 | bf16 | f16.
std::unique_ptr<Backend> openvino_backend(const std::string& device = "CPU", const std::string& precision_hint = "f32");

// TensorRT engines of `engine_dir` (engine.json + <component>.plan). Refuses, naming the first stale fact, an
// engine built by another TensorRT version or for another GPU architecture, or from another graph, precision or
// LoRA state than the kiln's. Throws Error when diffkiln_rt was built without TensorRT.
std::unique_ptr<Backend> tensorrt_backend(const Kiln& kiln, const std::filesystem::path& engine_dir, int device = 0);
bool has_tensorrt();

// engine.json, validated with every plan confined to its folder and of its recorded size (docs/FORMATS.md).
json::Value read_engine_manifest(const std::filesystem::path& engine_dir);
// Why `engine` must not run `component` here, or "" — the checks of diffkiln/engines.py `mismatch`, in order.
std::string engine_mismatch(const json::Value& engine, const std::string& component, const std::string& trt_version,
                            const std::string& compute_capability, const std::string& gpu_name, const Kiln& kiln);
bool json_equal(const json::Value* a, const json::Value* b);  // null and absent are equal

}  // namespace diffkiln
