// Shared by both implementations: a feed in the dtype and rank its graph takes (runtime/pipeline.py `_conform`).
#pragma once

#include "diffkiln/runtime.hpp"

namespace diffkiln::detail {

// `rank` 0 with a [B] feed of one value: the scalar (optimum's timestep); otherwise the feed converted to `dtype`
// (int32 ids -> int64, fp32 -> fp16 for --fp16-io graphs).
inline Tensor conform(const Tensor& feed, const std::string& name, DType dtype, int64_t rank) {
  if (rank == 0 && feed.shape.size() == 1) {
    const Tensor f = feed.to(DType::f32);
    for (size_t i = 1; i < f.numel(); ++i)
      if (f.data<float>()[i] != f.data<float>()[0])
        throw Error("this graph takes one " + name + " for every row; these rows differ");
    Tensor scalar(DType::f32, {});
    scalar.data<float>()[0] = f.numel() ? f.data<float>()[0] : 0.0f;
    return scalar.to(dtype);
  }
  return feed.to(dtype);
}

}  // namespace diffkiln::detail
