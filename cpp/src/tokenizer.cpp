// CLIP BPE in C++ (see tokenizer.hpp); checked id for id against the Python ClipTokenizer by tests/test_cpp.py.
#include "diffkiln/tokenizer.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "diffkiln/json.hpp"
#include "diffkiln/runtime.hpp"

namespace fs = std::filesystem;

namespace diffkiln {
namespace unicode {
namespace {
#include "unicode_data.inc"

template <size_t N>
bool in_ranges(const uint32_t (&table)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;  // first range whose end >= cp
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (table[mid][1] < cp) lo = mid + 1;
    else hi = mid;
  }
  return lo < N && table[lo][0] <= cp;
}

template <size_t N, size_t W>
const uint32_t* find_row(const uint32_t (&table)[N][W], uint32_t key) {
  auto it = std::lower_bound(std::begin(table), std::end(table), key,
                             [](const uint32_t(&row)[W], uint32_t k) { return row[0] < k; });
  return it != std::end(table) && (*it)[0] == key ? *it : nullptr;
}

// Hangul syllables decompose and compose algorithmically (Unicode 3.12)
constexpr uint32_t SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7;
constexpr uint32_t LCount = 19, VCount = 21, TCount = 28, NCount = VCount * TCount, SCount = LCount * NCount;

uint32_t ccc(uint32_t cp) {
  const uint32_t* row = find_row(kCombiningClass, cp);
  return row ? row[1] : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= SBase && cp < SBase + SCount) {
    uint32_t s = cp - SBase;
    out.push_back(LBase + s / NCount);
    out.push_back(VBase + (s % NCount) / TCount);
    if (s % TCount) out.push_back(TBase + s % TCount);
    return;
  }
  const uint32_t* row = find_row(kDecompIndex, cp);
  if (!row) {
    out.push_back(cp);
    return;
  }
  for (uint32_t i = 0; i < row[2]; ++i) decompose(kDecompFlat[row[1] + i], out);
}

uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= LBase && a < LBase + LCount && b >= VBase && b < VBase + VCount)
    return SBase + ((a - LBase) * VCount + (b - VBase)) * TCount;
  if (a >= SBase && a < SBase + SCount && (a - SBase) % TCount == 0 && b > TBase && b < TBase + TCount)
    return a + (b - TBase);
  auto it = std::lower_bound(std::begin(kCompose), std::end(kCompose), std::make_pair(a, b),
                             [](const uint32_t(&row)[3], std::pair<uint32_t, uint32_t> k) {
                               return std::make_pair(row[0], row[1]) < k;
                             });
  return it != std::end(kCompose) && (*it)[0] == a && (*it)[1] == b ? (*it)[2] : 0;
}
}  // namespace

bool is_letter(uint32_t cp) { return in_ranges(kLetterRanges, cp); }
bool is_number(uint32_t cp) { return in_ranges(kNumberRanges, cp); }
bool is_space(uint32_t cp) {  // the White_Space property: what the regex engine's \s matches
  return (cp >= 0x9 && cp <= 0xD) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

void lowercase(uint32_t cp, std::vector<uint32_t>& out) {
  for (const LowerMulti& m : kLowerMulti)
    if (m.cp == cp) {
      out.insert(out.end(), m.lower.begin(), m.lower.end());
      return;
    }
  const uint32_t* row = find_row(kLower, cp);
  out.push_back(row ? row[1] : cp);
}

std::vector<uint32_t> nfc(const std::vector<uint32_t>& cps) {
  std::vector<uint32_t> s;
  for (uint32_t cp : cps) decompose(cp, s);
  // canonical ordering: stable sort of each run of non-starters by combining class
  for (size_t i = 0; i < s.size();) {
    if (ccc(s[i]) == 0) { ++i; continue; }
    size_t j = i;
    while (j < s.size() && ccc(s[j]) != 0) ++j;
    std::stable_sort(s.begin() + long(i), s.begin() + long(j), [](uint32_t a, uint32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  if (s.empty()) return s;
  // canonical composition (UAX #15's sample algorithm)
  size_t starter = 0, write = 1;
  uint32_t last_class = ccc(s[0]) ? 256 : 0;
  for (size_t read = 1; read < s.size(); ++read) {
    uint32_t ch = s[read], cls = ccc(ch);
    uint32_t composite = compose(s[starter], ch);
    if (composite && (last_class < cls || last_class == 0)) {
      s[starter] = composite;
    } else {
      if (cls == 0) starter = write;
      last_class = cls;
      s[write++] = ch;
    }
  }
  s.resize(write);
  return s;
}

std::vector<uint32_t> decode_utf8(const std::string& str) {
  std::vector<uint32_t> out;
  const auto* s = reinterpret_cast<const unsigned char*>(str.data());
  size_t n = str.size();
  for (size_t i = 0; i < n;) {
    unsigned char c = s[i];
    uint32_t cp;
    int len;
    if (c < 0x80) { cp = c; len = 1; }
    else if ((c & 0xE0) == 0xC0) { cp = c & 0x1F; len = 2; }
    else if ((c & 0xF0) == 0xE0) { cp = c & 0x0F; len = 3; }
    else if ((c & 0xF8) == 0xF0) { cp = c & 0x07; len = 4; }
    else throw Error("the prompt is not valid UTF-8 text; pass it as UTF-8");
    if (i + size_t(len) > n) throw Error("the prompt is not valid UTF-8 text; pass it as UTF-8");
    for (int k = 1; k < len; ++k) {
      if ((s[i + size_t(k)] & 0xC0) != 0x80) throw Error("the prompt is not valid UTF-8 text; pass it as UTF-8");
      cp = (cp << 6) | (s[i + size_t(k)] & 0x3F);
    }
    static const uint32_t min_for_len[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      throw Error("the prompt is not valid UTF-8 text; pass it as UTF-8");
    out.push_back(cp);
    i += size_t(len);
  }
  return out;
}

std::string encode_utf8(const std::vector<uint32_t>& cps) {
  std::string out;
  for (uint32_t cp : cps) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  return out;
}
}  // namespace unicode

namespace {

// GPT-2's byte alphabet: every byte as a printable character (bytes_to_unicode)
const std::vector<std::string>& byte_symbols() {
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    uint32_t extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = unicode::encode_utf8({printable ? b : extra++});
    }
    return t;
  }();
  return table;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read tokenizer file " + path.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// CLIP's split of normalized text: contractions, letter runs, single digits, runs of other symbols; whitespace
// dropped. Alternatives are tried in the regex's order at each position (leftmost-first).
std::vector<std::string> clip_split(const std::vector<uint32_t>& t) {
  static const char* const specials[] = {"<|startoftext|>", "<|endoftext|>"};
  static const char* const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  auto starts_with = [&](size_t i, const char* lit) {
    size_t k = 0;
    for (; lit[k]; ++k)
      if (i + k >= t.size() || t[i + k] != uint32_t(static_cast<unsigned char>(lit[k]))) return false;
    return true;
  };
  auto len_of = [](const char* s) { return std::char_traits<char>::length(s); };
  std::vector<std::string> pieces;
  auto piece = [&](size_t i, size_t j) {
    pieces.push_back(unicode::encode_utf8(std::vector<uint32_t>(t.begin() + long(i), t.begin() + long(j))));
  };
  for (size_t i = 0; i < t.size();) {
    bool matched = false;
    for (const char* s : specials) {
      if (starts_with(i, s)) {  // ByteLevel's own split then cuts it into "<|", the word, "|>"
        size_t n = len_of(s);
        piece(i, i + 2);
        piece(i + 2, i + n - 2);
        piece(i + n - 2, i + n);
        i += n;
        matched = true;
        break;
      }
    }
    if (matched) continue;
    for (const char* s : contractions) {
      if (starts_with(i, s)) {
        piece(i, i + len_of(s));
        i += len_of(s);
        matched = true;
        break;
      }
    }
    if (matched) continue;
    uint32_t c = t[i];
    size_t j = i + 1;
    if (unicode::is_space(c)) {
      ++i;
      continue;
    } else if (unicode::is_letter(c)) {
      while (j < t.size() && unicode::is_letter(t[j])) ++j;
    } else if (!unicode::is_number(c)) {
      while (j < t.size() && !unicode::is_space(t[j]) && !unicode::is_letter(t[j]) && !unicode::is_number(t[j])) ++j;
    }
    piece(i, j);
    i = j;
  }
  return pieces;
}

// the normalizer: NFC, whitespace runs -> one space, lowercase (one character at a time)
std::vector<uint32_t> normalize(const std::string& text) {
  std::vector<uint32_t> cps = unicode::nfc(unicode::decode_utf8(text)), spaced, lower;
  bool in_run = false;
  for (uint32_t cp : cps) {
    bool space = unicode::is_space(cp);
    if (!space) spaced.push_back(cp);
    else if (!in_run) spaced.push_back(0x20);
    in_run = space;
  }
  for (uint32_t cp : spaced) unicode::lowercase(cp, lower);
  return lower;
}

}  // namespace

MultiVector multi_vector_tokens(const json::Value& manifest) {
  MultiVector found;
  for (const json::Value* record = manifest.get("lora"); record && record->is_object(); record = record->get("previous")) {
    const json::Value* embeddings = record->get("embeddings");
    for (const json::Value& e : embeddings && embeddings->is_array() ? embeddings->items : std::vector<json::Value>{}) {
      const json::Value* token = e.get("token");
      const json::Value* components = e.get("components");
      if (!token || !token->is_string() || !components || !components->is_object()) continue;
      for (const auto& [name, placed] : components->fields) {
        const json::Value* tokens = placed.get("tokens");
        bool known = std::any_of(found.begin(), found.end(), [&](const auto& f) { return f.first == token->str; });
        if (known || !tokens || !tokens->is_array()) continue;
        std::vector<std::string> names;
        for (const json::Value& t : tokens->items)
          if (t.is_string()) names.push_back(t.str);
        found.emplace_back(token->str, names);
      }
    }
  }
  return found;
}

std::string expand_prompt(std::string prompt, const MultiVector& multi_vector) {
  for (const auto& [token, tokens] : multi_vector) {
    if (tokens.size() < 2 || token.empty()) continue;
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) joined += (i ? " " : "") + tokens[i];
    std::string out;
    size_t pos = 0;
    for (size_t hit; (hit = prompt.find(token, pos)) != std::string::npos; pos = hit + token.size())
      out += prompt.substr(pos, hit - pos) + joined;
    prompt = out + prompt.substr(pos);
  }
  return prompt;
}

ClipTokenizer ClipTokenizer::from_dir(const fs::path& folder) {
  ClipTokenizer tok;
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) throw Error("tokenizer folder " + folder.string() + " does not exist");
  std::vector<std::pair<std::string, std::string>> merges;
  fs::path vocab_path = folder / "vocab.json", merges_path = folder / "merges.txt", tj = folder / "tokenizer.json";
  if (fs::is_regular_file(vocab_path, ec) && fs::is_regular_file(merges_path, ec)) {
    json::Value v = json::parse_file(vocab_path.string());
    if (!v.is_object()) throw Error(vocab_path.string() + " is not a JSON object");
    for (const auto& [k, id] : v.fields) {
      if (!id.is_int()) throw Error(vocab_path.string() + ": the id of '" + k + "' is not an integer");
      tok.vocab_[k] = int32_t(id.num);
    }
    std::istringstream lines(read_text(merges_path));
    std::string line;
    size_t n = 0;
    while (std::getline(lines, line)) {
      ++n;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("#version", 0) == 0) continue;
      size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
        if (line.empty() && lines.peek() == EOF) break;
        throw Error(merges_path.string() + ": line " + std::to_string(n) + " is not a pair of tokens");
      }
      merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    }
  } else if (fs::is_regular_file(tj, ec)) {
    json::Value data = json::parse_file(tj.string());
    const json::Value* model = data.get("model");
    const json::Value* vocab = model ? model->get("vocab") : nullptr;
    const json::Value* ms = model ? model->get("merges") : nullptr;
    if (!vocab || !vocab->is_object() || !ms || !ms->is_array())
      throw Error(tj.string() + " does not hold a BPE vocab and merges (not a CLIP tokenizer?)");
    for (const auto& [k, id] : vocab->fields) {
      if (!id.is_int()) throw Error(tj.string() + ": the id of '" + k + "' is not an integer");
      tok.vocab_[k] = int32_t(id.num);
    }
    for (const auto& m : ms->items) {
      if (m.is_string() && m.str.find(' ') != std::string::npos && m.str.find(' ') == m.str.rfind(' '))
        merges.emplace_back(m.str.substr(0, m.str.find(' ')), m.str.substr(m.str.find(' ') + 1));
      else if (m.is_array() && m.items.size() == 2 && m.items[0].is_string() && m.items[1].is_string())
        merges.emplace_back(m.items[0].str, m.items[1].str);
      else
        throw Error(tj.string() + ": a merge is not a pair of tokens");
    }
  } else {
    throw Error("tokenizer folder " + folder.string() + " lacks vocab.json and merges.txt (and has no tokenizer.json)");
  }
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = tok.vocab_.find(a), ib = tok.vocab_.find(b), ab = tok.vocab_.find(a + b);
    if (ia == tok.vocab_.end() || ib == tok.vocab_.end() || ab == tok.vocab_.end())
      throw Error("the CLIP vocab and merges in " + folder.string() + " do not fit together (merge '" + a + " " + b +
                  "' names a token missing from the vocab); the tokenizer folder is damaged");
    uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    tok.merges_.emplace(key, std::make_pair(int32_t(rank), ab->second));  // the first (lowest) rank wins
  }

  // special tokens: tokenizer_config.json, overridden by special_tokens_map.json when the config has no
  // added_tokens_decoder (runtime/tokenizer.py `_special_tokens`)
  std::map<std::string, std::string> named = {{"bos_token", "<|startoftext|>"}, {"eos_token", "<|endoftext|>"},
                                              {"unk_token", "<|endoftext|>"}, {"pad_token", "<|endoftext|>"}};
  auto token_text = [&](const json::Value& v, const std::string& where) {
    if (v.is_string()) return v.str;
    if (v.is_object() && v.get("content") && v.get("content")->is_string()) return v.get("content")->str;
    throw Error("bad special token in " + where);
  };
  // a token as a config states it: a string is special (matched raw); a dict keeps its flags, and like
  // tokenizers' AddedToken it is normalized unless special or said otherwise
  auto added_token = [&](const json::Value& v, int32_t id, const std::string& where) {
    Added a;
    a.content = token_text(v, where);
    a.id = id;
    if (v.is_object()) {
      auto flag = [&](const char* key, bool fallback) { const json::Value* f = v.get(key); return f ? f->b : fallback; };
      a.lstrip = flag("lstrip", false);
      a.rstrip = flag("rstrip", false);
      a.normalized = flag("normalized", !flag("special", false));
    }
    return a;
  };
  json::Value config;
  if (fs::is_regular_file(folder / "tokenizer_config.json", ec)) {
    config = json::parse_file((folder / "tokenizer_config.json").string());
    if (!config.is_object()) throw Error((folder / "tokenizer_config.json").string() + " is not a JSON object");
  }
  std::map<int32_t, Added> added;
  for (auto& [key, value] : named)
    if (const json::Value* v = config.get(key); v && !v->is_null()) value = token_text(*v, "tokenizer_config.json");
  if (const json::Value* dec = config.get("added_tokens_decoder"); dec && dec->is_object()) {
    for (const auto& [id, v] : dec->fields) added.emplace(int32_t(std::stol(id)), added_token(v, 0, "added_tokens_decoder"));
  } else {
    if (fs::is_regular_file(folder / "special_tokens_map.json", ec)) {
      json::Value smap = json::parse_file((folder / "special_tokens_map.json").string());
      if (!smap.is_object()) throw Error("special_tokens_map.json is not a JSON object");
      for (auto& [key, value] : named)
        if (const json::Value* v = smap.get(key); v && !v->is_null()) value = token_text(*v, "special_tokens_map.json");
    }
    if (fs::is_regular_file(tj, ec)) {
      json::Value data = json::parse_file(tj.string());
      if (const json::Value* list = data.get("added_tokens"); list && list->is_array())
        for (const auto& t : list->items) added.emplace(int32_t(t.get_int("id", "an added token's id")), added_token(t, 0, "tokenizer.json"));
    }
  }
  for (auto& [id, a] : added) {
    a.id = tok.vocab_.count(a.content) ? tok.vocab_[a.content] : id;
    tok.added_.push_back(a);
  }
  for (Added& a : tok.added_)
    if (a.normalized) a.normal_cps = normalize(a.content);
  auto id_of = [&](const std::string& key) {
    auto it = tok.vocab_.find(named[key]);
    if (it == tok.vocab_.end()) throw Error("the " + key + " '" + named[key] + "' is not in the CLIP vocab");
    return it->second;
  };
  tok.bos_ = id_of("bos_token");
  tok.eos_ = id_of("eos_token");
  tok.unk_ = id_of("unk_token");
  tok.pad_ = id_of("pad_token");
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    bool covered = std::any_of(tok.added_.begin(), tok.added_.end(), [&](const Added& a) { return a.content == named[key]; });
    if (covered) continue;
    Added a;
    a.content = named[key];
    a.id = tok.vocab_[named[key]];
    tok.added_.push_back(a);
  }
  if (const json::Value* m = config.get("model_max_length"); m && m->is_number() && m->num >= 3 && m->num <= 1e6)
    tok.max_length_ = int(m->num);
  return tok;
}

void ClipTokenizer::bpe(const std::string& piece, std::vector<int32_t>& out) const {
  if (auto hit = cache_.find(piece); hit != cache_.end()) {
    out.insert(out.end(), hit->second.begin(), hit->second.end());
    return;
  }
  // symbols: one per byte-level character, the last with the end-of-word suffix
  std::vector<std::string> chars;
  for (unsigned char b : piece) chars.push_back(byte_symbols()[b]);
  std::vector<int32_t> word;
  for (size_t i = 0; i < chars.size(); ++i) {
    std::string s = i + 1 == chars.size() ? chars[i] + "</w>" : chars[i];
    auto it = vocab_.find(s);
    word.push_back(it == vocab_.end() ? unk_ : it->second);
  }
  // merge the lowest-ranked adjacent pair (the leftmost among equals) until none is left
  for (;;) {
    int32_t best_rank = INT32_MAX, best_id = 0;
    size_t best = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = merges_.find((uint64_t(uint32_t(word[i])) << 32) | uint32_t(word[i + 1]));
      if (it != merges_.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best = i;
      }
    }
    if (best_rank == INT32_MAX) break;
    word[best] = best_id;
    word.erase(word.begin() + long(best) + 1);
  }
  if (cache_.size() < 10000) cache_.emplace(piece, word);
  out.insert(out.end(), word.begin(), word.end());
}

void ClipTokenizer::encode_segment(const std::string& text, std::vector<int32_t>& out) const {
  std::vector<uint32_t> t = normalize(text);
  // normalized added tokens (textual inversions) are matched in the normalized text, the longest leftmost
  size_t start = 0, i = 0;
  while (i < t.size()) {
    const Added* hit = nullptr;
    for (const Added& a : added_)
      if (a.normalized && !a.normal_cps.empty() && i + a.normal_cps.size() <= t.size() &&
          std::equal(a.normal_cps.begin(), a.normal_cps.end(), t.begin() + long(i)) &&
          (!hit || a.normal_cps.size() > hit->normal_cps.size()))
        hit = &a;
    if (!hit) {
      ++i;
      continue;
    }
    encode_normalized({t.begin() + long(start), t.begin() + long(i)}, out);
    out.push_back(hit->id);
    start = i = i + hit->normal_cps.size();
  }
  encode_normalized({t.begin() + long(start), t.end()}, out);
}

void ClipTokenizer::encode_normalized(const std::vector<uint32_t>& text, std::vector<int32_t>& out) const {
  for (const std::string& piece : clip_split(text)) bpe(piece, out);
}

std::vector<int32_t> ClipTokenizer::tokenize(const std::string& text) const {
  unicode::decode_utf8(text);  // refuse invalid UTF-8 whatever the split
  std::vector<int32_t> out;
  // special (added) tokens are matched in the raw text first, the longest at the leftmost position
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const Added* hit = nullptr;
    for (const Added& a : added_)
      if (!a.normalized && text.compare(i, a.content.size(), a.content) == 0 &&
          (!hit || a.content.size() > hit->content.size()))
        hit = &a;
    if (!hit) {
      ++i;
      continue;
    }
    size_t end = i, next = i + hit->content.size();
    if (hit->lstrip)
      while (end > start && (text[end - 1] == ' ' || text[end - 1] == '\t' || text[end - 1] == '\n')) --end;
    if (hit->rstrip)
      while (next < text.size() && (text[next] == ' ' || text[next] == '\t' || text[next] == '\n')) ++next;
    encode_segment(text.substr(start, end - start), out);
    out.push_back(hit->id);
    start = i = next;
  }
  encode_segment(text.substr(start), out);
  return out;
}

std::vector<int32_t> ClipTokenizer::window(const std::vector<int32_t>& tokens, size_t begin, size_t end) const {
  std::vector<int32_t> row(size_t(max_length_), pad_);
  row[0] = bos_;
  size_t n = end > begin ? end - begin : 0;
  std::copy(tokens.begin() + long(begin), tokens.begin() + long(begin + n), row.begin() + 1);
  row[1 + n] = eos_;
  return row;
}

std::vector<int32_t> ClipTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> t = tokenize(text);
  return window(t, 0, std::min(t.size(), size_t(chunk_tokens())));
}

int ClipTokenizer::n_chunks(const std::string& text) const {
  size_t n = tokenize(text).size(), step = size_t(chunk_tokens());
  return std::max<int>(1, int((n + step - 1) / step));
}

std::vector<std::vector<int32_t>> ClipTokenizer::encode_chunks(const std::string& text, int min_chunks) const {
  std::vector<int32_t> t = tokenize(text);
  size_t step = size_t(chunk_tokens());
  int n = std::max<int>({1, min_chunks, int((t.size() + step - 1) / step)});
  std::vector<std::vector<int32_t>> out;
  for (int j = 0; j < n; ++j) {
    size_t b = std::min(t.size(), size_t(j) * step), e = std::min(t.size(), b + step);
    out.push_back(window(t, b, e));
  }
  return out;
}

}  // namespace diffkiln
