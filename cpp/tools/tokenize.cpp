// diffkiln-tokenize TOKENIZER_DIR PROMPTS.json: the C++ tokenizer's ids for each prompt of a JSON list of strings,
// as JSON on stdout: [{"tokens": [...], "encode": [77 ids], "chunks": n}, ...]. tests/test_cpp.py compares
// them with the Python ClipTokenizer's.
#include <cstdio>
#include <iostream>

#include "diffkiln/json.hpp"
#include "diffkiln/runtime.hpp"
#include "diffkiln/tokenizer.hpp"

namespace {
std::string ids_json(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}
}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 3) throw diffkiln::Error("usage: diffkiln-tokenize TOKENIZER_DIR PROMPTS.json");
    auto tok = diffkiln::ClipTokenizer::from_dir(argv[1]);
    diffkiln::json::Value prompts = diffkiln::json::parse_file(argv[2]);
    if (!prompts.is_array()) throw diffkiln::Error(std::string(argv[2]) + " is not a JSON list of prompts");
    std::cout << "[";
    for (size_t i = 0; i < prompts.items.size(); ++i) {
      const auto& p = prompts.items[i];
      if (!p.is_string()) throw diffkiln::Error("prompt " + std::to_string(i) + " is not a string");
      std::cout << (i ? ",\n" : "") << "{\"tokens\": " << ids_json(tok.tokenize(p.str))
                << ", \"encode\": " << ids_json(tok.encode(p.str)) << ", \"chunks\": " << tok.n_chunks(p.str) << "}";
    }
    std::cout << "]\n";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "Error: %s\n", e.what());
    return 1;
  }
}
