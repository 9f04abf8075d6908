// CLIP BPE tokenizer: the same ids as diffkiln's Python ClipTokenizer (and transformers' CLIPTokenizer).
//
//   auto tok = diffkiln::ClipTokenizer::from_dir(kiln.tokenizer_dirs()[0]);
//   std::vector<int32_t> ids = tok.encode("a red circle");           // [77]: bos, tokens, eos, pad...
//
// Text handling, as tokenizers' pipeline does it: special tokens matched in the raw text; NFC, whitespace runs to
// one space, lowercase; CLIP's split (contractions, letter runs, single digits, runs of other symbols); bytes to
// GPT-2's byte alphabet; BPE with the `</w>` end-of-word suffix, unknown symbols to the unk token.
// Unicode facts (letters, numbers, lowercase, NFC) come from src/unicode_data.inc (tools/make_cpp_unicode.py).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "diffkiln/json.hpp"

namespace diffkiln {

// Not thread-safe (a per-object BPE cache): one tokenizer per thread.
class ClipTokenizer {
 public:
  // A diffusers tokenizer folder: vocab.json + merges.txt (else tokenizer.json's model), special tokens and
  // model_max_length from tokenizer_config.json / special_tokens_map.json. Throws diffkiln::Error.
  static ClipTokenizer from_dir(const std::filesystem::path& folder);

  // The prompt's tokens without bos/eos, untruncated. Throws on text that is not UTF-8.
  std::vector<int32_t> tokenize(const std::string& text) const;
  // One window of model_max_length: bos, the first chunk_tokens() tokens, eos, pad...
  std::vector<int32_t> encode(const std::string& text) const;
  // Windows for long prompts: n = max(min_chunks, ceil(tokens / 75)) windows, as ClipTokenizer.encode_chunks.
  std::vector<std::vector<int32_t>> encode_chunks(const std::string& text, int min_chunks = 1) const;
  int n_chunks(const std::string& text) const;

  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  int32_t pad_id() const { return pad_; }
  int model_max_length() const { return max_length_; }
  int chunk_tokens() const { return max_length_ - 2; }

 private:
  struct Added {
    std::string content;
    int32_t id;
    bool lstrip = false, rstrip = false;
    bool normalized = false;          // matched in the normalized text (textual-inversion tokens), else in the raw
    std::vector<uint32_t> normal_cps;  // the content normalized, for that match
  };
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a << 32 | b) -> (rank, merged id)
  std::vector<Added> added_;
  int32_t bos_ = 0, eos_ = 0, pad_ = 0, unk_ = 0;
  int max_length_ = 77;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;

  std::vector<int32_t> window(const std::vector<int32_t>& tokens, size_t begin, size_t end) const;
  void bpe(const std::string& piece, std::vector<int32_t>& out) const;
  void encode_segment(const std::string& text, std::vector<int32_t>& out) const;
  void encode_normalized(const std::vector<uint32_t>& text, std::vector<int32_t>& out) const;
};

// Textual-inversion tokens folded in with several vectors: {token, [token, token_1, ...]} in the manifest's order
// (its `lora` records), and the prompt with each `token` written out as all of them (diffusers'
// maybe_convert_prompt; runtime/prompts.py).
using MultiVector = std::vector<std::pair<std::string, std::vector<std::string>>>;
MultiVector multi_vector_tokens(const json::Value& manifest);
std::string expand_prompt(std::string prompt, const MultiVector& multi_vector);

namespace unicode {
// UTF-8 <-> code points; decode throws diffkiln::Error on invalid UTF-8.
std::vector<uint32_t> decode_utf8(const std::string& s);
std::string encode_utf8(const std::vector<uint32_t>& cps);
std::vector<uint32_t> nfc(const std::vector<uint32_t>& cps);
bool is_letter(uint32_t cp);
bool is_number(uint32_t cp);
bool is_space(uint32_t cp);
}  // namespace unicode

}  // namespace diffkiln
