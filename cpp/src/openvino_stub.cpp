// Built with -DDIFFKILN_OPENVINO=OFF (a TensorRT-only build).
#include "diffkiln/runtime.hpp"

namespace diffkiln {

std::unique_ptr<Backend> openvino_backend(const std::string&, const std::string&) {
  throw Error("this diffkiln_rt was built without OpenVINO; rebuild with cmake -DDIFFKILN_OPENVINO=ON");
}

}  // namespace diffkiln
