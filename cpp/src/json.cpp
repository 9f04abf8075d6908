// JSON reader: recursive descent over the bytes, depth-limited (see json.hpp for why it exists).
#include "diffkiln/json.hpp"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "diffkiln/runtime.hpp"
#include "diffkiln/tokenizer.hpp"

namespace diffkiln::json {
namespace {

constexpr int kMaxDepth = 128;

class Parser {
 public:
  Parser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  Value document() {
    Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  const std::string& where_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(where_ + " is not valid JSON (" + why + " at byte " + std::to_string(i_) + ")");
  }

  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Value::Kind::object;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, v;
      for (;;) {
        skip_ws();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
        std::string key = string();
        skip_ws();
        if (i_ >= s_.size() || s_[i_] != ':') fail("expected ':'");
        ++i_;
        v.fields.emplace_back(std::move(key), value(depth + 1));
        skip_ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { ++i_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::array;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, v;
      for (;;) {
        v.items.push_back(value(depth + 1));
        skip_ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { ++i_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::string;
      v.str = string();
      return v;
    }
    if (literal("true")) { v.kind = Value::Kind::boolean; v.b = true; return v; }
    if (literal("false")) { v.kind = Value::Kind::boolean; return v; }
    if (literal("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Value::Kind::number;
      v.num = number();
      return v;
    }
    fail("unexpected character");
  }

  double number() {
    size_t start = i_;
    if (s_[i_] == '-') ++i_;
    auto digits = [&] {
      size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      if (i_ == d) fail("bad number");
    };
    digits();
    if (i_ < s_.size() && s_[i_] == '.') { ++i_; digits(); }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits();
    }
    std::string text = s_.substr(start, i_ - start);
    double x = std::strtod(text.c_str(), nullptr);  // the C locale: JSON numbers use '.'
    if (!std::isfinite(x)) fail("number out of range");
    return x;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      u <<= 4;
      if (h >= '0' && h <= '9') u |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f') u |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') u |= unsigned(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return u;
  }

  static void put_utf8(std::string& out, uint32_t cp) { out += unicode::encode_utf8({cp}); }

  std::string string() {
    ++i_;  // the opening quote
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[i_++]);
      if (c == '"') return out;
      if (c < 0x20) fail("control character in a string");
      if (c != '\\') { out += char(c); continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a surrogate pair
            if (i_ + 2 > s_.size() || s_[i_] != '\\' || s_[i_ + 1] != 'u') fail("lone surrogate");
            i_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

}  // namespace

bool Value::is_int() const {
  return kind == Kind::number && std::floor(num) == num && std::fabs(num) < 9.0e15;
}

const Value* Value::get(const std::string& key) const {
  if (kind != Kind::object) return nullptr;
  const Value* found = nullptr;
  for (const auto& [k, v] : fields)
    if (k == key) found = &v;
  return found;
}

const std::string& Value::get_string(const std::string& key, const std::string& what) const {
  const Value* v = get(key);
  if (!v || !v->is_string()) throw Error(what + " is missing or not a string");
  return v->str;
}

double Value::get_number(const std::string& key, const std::string& what) const {
  const Value* v = get(key);
  if (!v || !v->is_number()) throw Error(what + " is missing or not a number");
  return v->num;
}

int64_t Value::get_int(const std::string& key, const std::string& what) const {
  const Value* v = get(key);
  if (!v || !v->is_int()) throw Error(what + " is missing or not an integer");
  return static_cast<int64_t>(v->num);
}

const Value& Value::get_object(const std::string& key, const std::string& what) const {
  const Value* v = get(key);
  if (!v || !v->is_object()) throw Error(what + " is missing or not an object");
  return *v;
}

Value parse(const std::string& text, const std::string& where) { return Parser(text, where).document(); }

Value parse_file(const std::string& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  in.seekg(0, std::ios::end);
  auto size = static_cast<size_t>(in.tellg());
  if (size > max_bytes) throw Error(path + " is " + std::to_string(size) + " bytes, too large to be this file");
  in.seekg(0);
  std::string text(size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  if (!in) throw Error("cannot read " + path);
  return parse(text, path);
}

}  // namespace diffkiln::json
