// Built when TensorRT was not found (-DDIFFKILN_TENSORRT=OFF, the default): the interface exists and says why.
#include "diffkiln/runtime.hpp"

namespace diffkiln {

std::unique_ptr<Backend> tensorrt_backend(const Kiln&, const std::filesystem::path&, int) {
  throw Error("this diffkiln_rt was built without TensorRT; rebuild with cmake -DDIFFKILN_TENSORRT=ON on a machine "
              "with TensorRT 10/11 and CUDA");
}

bool has_tensorrt() { return false; }

}  // namespace diffkiln
