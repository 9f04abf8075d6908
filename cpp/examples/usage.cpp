// The README's 15-line usage example, built with the library so it cannot drift: usage KILN_DIR "prompt"
#include <cstdio>
#include "diffkiln/runtime.hpp"
#include "diffkiln/tokenizer.hpp"

int main(int argc, char** argv) try {
  if (argc != 3) return std::fprintf(stderr, "usage: %s KILN_DIR PROMPT\n", argv[0]), 2;
  auto kiln = diffkiln::Kiln::open(argv[1]);                          // manifest.json: validated, paths confined
  auto backend = diffkiln::openvino_backend("CPU", "f32");            // or diffkiln::tensorrt_backend(kiln, dir)
  auto text_encoder = backend->load(kiln, "text_encoder");            // one Component per graph
  auto tok = diffkiln::ClipTokenizer::from_dir(kiln.tokenizer_dirs()[0]);
  auto ids = diffkiln::Tensor::i32({1, 77}, tok.encode(argv[2]));     // bos, tokens, eos, pad...
  diffkiln::TensorMap out = text_encoder->infer({{"input_ids", ids}}); // tensors by name, fp32 back
  std::printf("last_hidden_state: %s\n", out.at("last_hidden_state").describe().c_str());
} catch (const std::exception& e) {                                    // diffkiln::Error: one line
  return std::fprintf(stderr, "Error: %s\n", e.what()), 1;
}
