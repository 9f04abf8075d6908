// The TensorRT implementation of Component (TensorRT 10/11: tensors by name, enqueueV3), compiled only with
// -DDIFFKILN_TENSORRT=ON. It mirrors diffkiln/runtime/trt_runner.py: the engine folder for this TensorRT version and
// GPU (engines/<trt version>-sm<cc>/), engine.json checked before any plan is deserialized (engines.py `mismatch`),
// feeds checked against the engine's profile, one CUDA stream, device buffers that grow on demand.
// Weight-stripped plans need a refit from the ONNX (nvonnxparser): not done here, refused with the rebuild command.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "conform.hpp"

namespace fs = std::filesystem;

namespace diffkiln {
namespace {

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess)
    throw Error(what + " failed: " + cudaGetErrorName(err) + "; is the NVIDIA driver working?");
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};
Logger& logger() {
  static Logger l;
  return l;
}

// "10.13.0.35": the TensorRT these headers are, checked against the loaded library
std::string trt_version() {
  char v[64];
  std::snprintf(v, sizeof v, "%d.%d.%d.%d", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH, NV_TENSORRT_BUILD);
  int lib = getInferLibVersion();
  if (lib != NV_TENSORRT_VERSION)
    throw Error("libnvinfer is version " + std::to_string(lib) + " but diffkiln_rt was compiled against " + v +
                "; rebuild diffkiln_rt against the TensorRT it loads");
  return v;
}

DType from_trt(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::f32;
    case nvinfer1::DataType::kHALF: return DType::f16;
    case nvinfer1::DataType::kINT32: return DType::i32;
    case nvinfer1::DataType::kINT64: return DType::i64;
    default: throw Error("engine tensor " + name + " has a data type diffkiln_rt does not feed");
  }
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void reserve(size_t n) {
    if (n <= bytes) return;
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    check_cuda(cudaMalloc(&ptr, std::max<size_t>(n, 1)), "allocating " + std::to_string(n) + " bytes on the GPU");
    bytes = n;
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

class TrtComponent final : public Component {
 public:
  TrtComponent(const fs::path& plan, std::string component, json::Value profiles)
      : component_(std::move(component)), profiles_(std::move(profiles)) {
    std::ifstream in(plan, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw Error("cannot create a TensorRT runtime");
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) throw Error("TensorRT cannot deserialize " + plan.string() + "; rebuild with `diffkiln build KILN --force`");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error("TensorRT cannot create an execution context for " + plan.string());
    check_cuda(cudaStreamCreate(&stream_), "creating a CUDA stream");
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      std::string name = engine_->getIOTensorName(i);
      dtypes_[name] = from_trt(engine_->getTensorDataType(name.c_str()), name);
      ranks_[name] = engine_->getTensorShape(name.c_str()).nbDims;
      (engine_->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT ? inputs_ : outputs_).push_back(name);
    }
  }
  ~TrtComponent() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  const std::vector<std::string>& input_names() const override { return inputs_; }
  const std::vector<std::string>& output_names() const override { return outputs_; }
  double last_seconds() const override { return last_seconds_; }

  TensorMap infer(const TensorMap& feeds) override {
    auto start = std::chrono::steady_clock::now();
    std::map<std::string, Tensor> in;
    for (const std::string& name : inputs_) {
      auto it = feeds.find(name);
      if (it == feeds.end()) throw Error("no feed for input " + name);
      in[name] = detail::conform(it->second, name, dtypes_[name], ranks_[name]);
      check_profile(name, in[name].shape);
      nvinfer1::Dims dims{};
      dims.nbDims = int32_t(in[name].shape.size());
      for (int k = 0; k < dims.nbDims; ++k) dims.d[k] = in[name].shape[size_t(k)];
      if (!context_->setInputShape(name.c_str(), dims)) throw Error(component_ + ": TensorRT refused the shape of " + name);
      buffers_[name].reserve(in[name].bytes.size());
      check_cuda(cudaMemcpyAsync(buffers_[name].ptr, in[name].bytes.data(), in[name].bytes.size(),
                                 cudaMemcpyHostToDevice, stream_), "copying " + name + " to the GPU");
      context_->setTensorAddress(name.c_str(), buffers_[name].ptr);
    }
    TensorMap out;
    for (const std::string& name : outputs_) {
      nvinfer1::Dims dims = context_->getTensorShape(name.c_str());
      Tensor t(dtypes_[name], std::vector<int64_t>(dims.d, dims.d + dims.nbDims));
      buffers_[name].reserve(t.bytes.size());
      context_->setTensorAddress(name.c_str(), buffers_[name].ptr);
      out.emplace(name, std::move(t));
    }
    if (!context_->enqueueV3(stream_)) throw Error(component_ + ": TensorRT failed to run the engine (see its log)");
    for (auto& [name, t] : out)
      check_cuda(cudaMemcpyAsync(t.bytes.data(), buffers_[name].ptr, t.bytes.size(), cudaMemcpyDeviceToHost, stream_),
                 "copying " + name + " from the GPU");
    check_cuda(cudaStreamSynchronize(stream_), "running " + component_);
    for (auto& [name, t] : out)
      if (t.dtype == DType::f16) t = t.to(DType::f32);
    last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return out;
  }

 private:
  struct Deleter {
    template <class T>
    void operator()(T* p) const { delete p; }  // TensorRT 10: objects are deleted, not destroy()ed
  };
  std::string component_;
  json::Value profiles_;  // {input: [[min], [opt], [max]]}
  std::unique_ptr<nvinfer1::IRuntime, Deleter> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine, Deleter> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext, Deleter> context_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::string> inputs_, outputs_;
  std::map<std::string, DType> dtypes_;
  std::map<std::string, int64_t> ranks_;
  std::map<std::string, DeviceBuffer> buffers_;
  double last_seconds_ = 0.0;

  // engines.py `check_shapes`: a feed outside the profile names the range and the rebuild
  void check_profile(const std::string& name, const std::vector<int64_t>& shape) const {
    const json::Value* p = profiles_.get(name);
    if (!p || !p->is_array() || p->items.size() != 3) return;
    const auto &lo = p->items[0].items, &hi = p->items[2].items;
    bool ok = lo.size() == shape.size() && hi.size() == shape.size();
    for (size_t k = 0; ok && k < shape.size(); ++k) ok = lo[k].num <= double(shape[k]) && double(shape[k]) <= hi[k].num;
    if (!ok) {
      auto dims = [](const std::vector<json::Value>& v) {
        std::string s = "[";
        for (size_t k = 0; k < v.size(); ++k) s += (k ? ", " : "") + std::to_string(int64_t(v[k].num));
        return s + "]";
      };
      std::string got = "[";
      for (size_t k = 0; k < shape.size(); ++k) got += (k ? ", " : "") + std::to_string(shape[k]);
      throw Error(component_ + " input " + name + " has shape " + got + "], outside the engine's profile " + dims(lo) +
                  ".." + dims(hi) + "; rebuild with wider --batch/--height/--width");
    }
  }
};

class TrtBackend final : public Backend {
 public:
  TrtBackend(const Kiln& kiln, const fs::path& engines_root, int device) {
    check_cuda(cudaSetDevice(device), "selecting GPU " + std::to_string(device));
    cudaDeviceProp props{};
    check_cuda(cudaGetDeviceProperties(&props, device), "reading the GPU's properties");
    version_ = trt_version();
    gpu_name_ = props.name;
    cc_ = std::to_string(props.major) + "." + std::to_string(props.minor);
    std::string key = version_ + "-sm" + std::to_string(props.major) + std::to_string(props.minor);
    folder_ = engines_root / key;  // engines.find_engine_dir
    std::error_code ec;
    if (!fs::is_regular_file(folder_ / "engine.json", ec))
      throw Error(engines_root.string() + " has no engines for " + key + " (TensorRT " + version_ + ", " + gpu_name_ +
                  "); build them with `diffkiln build " + kiln.dir().string() + "`");
    manifest_ = read_engine_manifest(folder_);
  }

  std::unique_ptr<Component> load(const Kiln& kiln, const std::string& component) override {
    std::string why = engine_mismatch(manifest_, component, version_, cc_, gpu_name_, kiln);
    if (!why.empty())
      throw Error("stale engine: " + why + "; rebuild with `diffkiln build " + kiln.dir().string() + " --force`");
    const json::Value& record = *manifest_.get("components")->get(component);
    if (const json::Value* s = record.get("stripped"); s && s->b)
      throw Error("the " + component + " engine is weight-stripped (it needs a refit from the ONNX, which diffkiln-cpp "
                  "does not do); rebuild it without --strip or run it with diffkiln run");
    fs::path plan = inside(folder_, record.get("plan")->str, "engine.json plan of '" + component + "'");
    return std::make_unique<TrtComponent>(plan, component, *record.get("profiles"));
  }

  std::string name() const override { return "tensorrt " + version_; }

 private:
  fs::path folder_;
  json::Value manifest_;
  std::string version_, gpu_name_, cc_;
};

}  // namespace

std::unique_ptr<Backend> tensorrt_backend(const Kiln& kiln, const fs::path& engine_dir, int device) {
  return std::make_unique<TrtBackend>(kiln, engine_dir, device);
}

bool has_tensorrt() { return true; }

}  // namespace diffkiln
