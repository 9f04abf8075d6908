// The OpenVINO implementation of Component: model.onnx read by OpenVINO's ONNX frontend (fp32, fp16 casts and
// Q/DQ int8 alike), compiled with a latency hint and an explicit inference precision — the same settings as
// diffkiln/runtime/runners.py `compiled_openvino_model`, so both runtimes give the same numbers.
#include <chrono>
#include <cstring>
#include <openvino/openvino.hpp>

#include "conform.hpp"

namespace diffkiln {
namespace {

DType from_ov(const ov::element::Type& t, const std::string& what) {
  if (t == ov::element::f32) return DType::f32;
  if (t == ov::element::f16) return DType::f16;
  if (t == ov::element::i32) return DType::i32;
  if (t == ov::element::i64) return DType::i64;
  throw Error(what + " has element type " + t.get_type_name() + ", which diffkiln_rt does not feed");
}

ov::element::Type to_ov(DType t) {
  switch (t) {
    case DType::f32: return ov::element::f32;
    case DType::f16: return ov::element::f16;
    case DType::i32: return ov::element::i32;
    case DType::i64: return ov::element::i64;
  }
  return ov::element::f32;
}

struct Port {
  std::string name;
  DType dtype;
  int64_t rank;  // -1: dynamic rank
};

class OpenVinoComponent final : public Component {
 public:
  OpenVinoComponent(ov::Core& core, const std::string& path, const std::string& device, const std::string& hint) {
    std::shared_ptr<ov::Model> model = core.read_model(path);
    // the uncompiled ports carry the ONNX names alone; compiled ones may add aliases (an Identity's input)
    for (const auto& p : model->inputs()) {
      auto rank = p.get_partial_shape().rank();
      inputs_.push_back({p.get_any_name(), from_ov(p.get_element_type(), path + " input " + p.get_any_name()),
                         rank.is_static() ? rank.get_length() : -1});
      input_names_.push_back(p.get_any_name());
    }
    for (const auto& p : model->outputs()) output_names_.push_back(p.get_any_name());
    ov::AnyMap config{ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
    if (!hint.empty()) config.emplace(ov::hint::inference_precision.name(), ov::element::Type(hint));
    compiled_ = core.compile_model(model, device, config);
    request_ = compiled_.create_infer_request();
  }

  const std::vector<std::string>& input_names() const override { return input_names_; }
  const std::vector<std::string>& output_names() const override { return output_names_; }
  double last_seconds() const override { return last_seconds_; }

  TensorMap infer(const TensorMap& feeds) override {
    auto start = std::chrono::steady_clock::now();
    std::vector<Tensor> keep;  // converted feeds must outlive the request
    keep.reserve(inputs_.size());
    for (const Port& port : inputs_) {
      auto it = feeds.find(port.name);
      if (it == feeds.end()) throw Error("no feed for input " + port.name);
      keep.push_back(detail::conform(it->second, port.name, port.dtype, port.rank));
      Tensor& t = keep.back();
      ov::Shape shape(t.shape.begin(), t.shape.end());
      request_.set_tensor(port.name, ov::Tensor(to_ov(t.dtype), shape, t.bytes.data()));
    }
    try {
      request_.infer();
    } catch (const ov::Exception& e) {
      std::string why = e.what();
      throw Error("OpenVINO failed to run the graph (" + why.substr(0, why.find('\n')) + ")");
    }
    TensorMap out;
    for (const std::string& name : output_names_) {
      ov::Tensor o = request_.get_tensor(name);
      const ov::Shape shape = o.get_shape();
      Tensor t(from_ov(o.get_element_type(), "output " + name), std::vector<int64_t>(shape.begin(), shape.end()));
      std::memcpy(t.bytes.data(), o.data(), t.bytes.size());
      out.emplace(name, t.dtype == DType::f16 ? t.to(DType::f32) : std::move(t));
    }
    last_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return out;
  }

 private:
  std::vector<Port> inputs_;
  std::vector<std::string> input_names_, output_names_;
  ov::CompiledModel compiled_;
  ov::InferRequest request_;
  double last_seconds_ = 0.0;
};

class OpenVinoBackend final : public Backend {
 public:
  OpenVinoBackend(std::string device, std::string hint) : device_(std::move(device)), hint_(std::move(hint)) {
    for (char& c : device_) c = char(std::toupper(static_cast<unsigned char>(c)));
    if (!hint_.empty() && hint_ != "f32" && hint_ != "bf16" && hint_ != "f16")
      throw Error("OpenVINO precision hint is one of f32, bf16, f16, not '" + hint_ + "'");
  }

  std::unique_ptr<Component> load(const Kiln& kiln, const std::string& component) override {
    std::string path = kiln.model_path(component).string();
    try {
      return std::make_unique<OpenVinoComponent>(core_, path, device_, hint_);
    } catch (const ov::Exception& e) {
      std::string why = e.what();
      why = why.substr(0, why.find('\n'));
      throw Error("cannot load " + path + " in OpenVINO (" + why + "); re-export or re-download the kiln dir");
    }
  }

  std::string name() const override { return hint_.empty() ? "openvino" : "openvino " + hint_; }

 private:
  ov::Core core_;
  std::string device_, hint_;
};

}  // namespace

std::unique_ptr<Backend> openvino_backend(const std::string& device, const std::string& precision_hint) {
  return std::make_unique<OpenVinoBackend>(device, precision_hint);
}

}  // namespace diffkiln
