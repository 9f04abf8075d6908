// A small JSON reader for manifest.json, engine.json, scheduler and tokenizer files.
//
// Why our own: the OpenVINO SDK (and TensorRT's) ships no JSON library, and diffkiln_rt must build from the
// `openvino` wheel alone. It reads RFC 8259 JSON into a tree; strings are UTF-8 (\u escapes, surrogate pairs
// included). Inputs are untrusted: depth, size and every escape are checked and any fault is a one-line
// diffkiln::Error naming the file and byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace diffkiln::json {

class Value {
 public:
  enum class Kind { null, boolean, number, string, array, object };

  Kind kind = Kind::null;
  bool b = false;
  double num = 0.0;
  std::string str;
  std::vector<Value> items;                           // array
  std::vector<std::pair<std::string, Value>> fields;  // object, in file order (a later duplicate wins in get)

  bool is_object() const { return kind == Kind::object; }
  bool is_array() const { return kind == Kind::array; }
  bool is_string() const { return kind == Kind::string; }
  bool is_number() const { return kind == Kind::number; }
  bool is_null() const { return kind == Kind::null; }
  bool is_int() const;  // a number with no fraction that fits int64

  // The member `key` of an object, or nullptr (also when this is not an object).
  const Value* get(const std::string& key) const;
  // Typed reads of a member: `what` names it in the error when it is missing or of another type.
  const std::string& get_string(const std::string& key, const std::string& what) const;
  double get_number(const std::string& key, const std::string& what) const;
  int64_t get_int(const std::string& key, const std::string& what) const;
  const Value& get_object(const std::string& key, const std::string& what) const;
};

// Parse `text`; `where` (a file name) prefixes errors.
Value parse(const std::string& text, const std::string& where);
// Read and parse a file of at most `max_bytes`.
Value parse_file(const std::string& path, size_t max_bytes = 64u << 20);

}  // namespace diffkiln::json
