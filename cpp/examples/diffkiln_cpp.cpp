// diffkiln-cpp: text-to-image from a kiln dir (or TensorRT engines built from one), in C++ — what
// `diffkiln run` does, in one file to read and copy into an application:
//
//   tokenize (CLIP BPE) → text encoder(s) on [uncond; cond] → Euler/DDIM with classifier-free guidance → VAE decode → PNG
//
// SD 1.x, 2.x and SDXL kiln dirs (SDXL: both encoders' penultimate states side by side, pooled text_embeds and
// time_ids for the UNet, as runtime/pipeline.py `encode_prompt` builds them).
//
//   diffkiln-cpp "a red circle on a white background" -m KILN [--steps 20] [--sampler euler|ddim] [--guidance 7.5]
//       [--seed 0 | --latents noise.npy] [--negative TEXT] [--height H --width W]
//       [--backend openvino|tensorrt] [--device CPU] [--precision-hint f32|bf16|f16] [--engines DIR]
//       [--show-tokens] [-o out.png]
//
// `--latents FILE.npy` is `diffkiln run --latents`'s contract: float [1, 4, h, w] unit-variance noise; with it the
// image is diffkiln run's (tests/test_cpp.py: ≥ 40 dB). `--seed` draws the noise from std::mt19937_64 (numpy's
// PCG64 stream is not reproduced here), so a seed alone gives another image than diffkiln run's.
// fp32, fp16 and int8 kiln dirs all run: the precision is inside the graphs, their I/O is fp32 (or fp16 with
// --fp16-io, converted by diffkiln_rt). Every error is one line on stderr and exit status 1.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <random>

#include "diffkiln/image_io.hpp"
#include "diffkiln/runtime.hpp"
#include "diffkiln/scheduler.hpp"
#include "diffkiln/tokenizer.hpp"

namespace fs = std::filesystem;
using diffkiln::Error;
using diffkiln::Tensor;

namespace {

struct Options {
  std::string prompt, negative, kiln, out = "out.png", sampler = "euler", latents;
  std::string backend = "openvino", device = "CPU", precision_hint = "f32", engines;
  int steps = 20, height = 0, width = 0;
  double guidance = 7.5;
  uint64_t seed = 0;
  bool show_tokens = false;
};

const char* kUsage =
    "usage: diffkiln-cpp PROMPT -m KILN_DIR [--negative TEXT] [--steps N] [--sampler euler|ddim] [--guidance G]\n"
    "       [--seed S | --latents FILE.npy] [--height H] [--width W] [--backend openvino|tensorrt]\n"
    "       [--device CPU] [--precision-hint f32|bf16|f16] [--engines DIR] [--show-tokens] [-o OUT.png]\n";

double to_number(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end || !std::isfinite(x)) throw Error(flag + " " + v + " is not a finite number");
  return x;
}

int to_int(const std::string& flag, const std::string& v) {
  double x = to_number(flag, v);
  if (x != std::floor(x) || std::fabs(x) > 1e9) throw Error(flag + " " + v + " is not an integer");
  return int(x);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (a == "--show-tokens") {  // print the text encoder's input ids (one line per 77-token window)
      o.show_tokens = true;
      continue;
    }
    if (a.size() > 1 && a[0] == '-' && !(a[1] >= '0' && a[1] <= '9')) {
      if (i + 1 >= argc) throw Error("option " + a + " needs a value");
      std::string v = argv[++i];
      if (a == "-m" || a == "--model") o.kiln = v;
      else if (a == "-o" || a == "--out") o.out = v;
      else if (a == "--negative") o.negative = v;
      else if (a == "--steps") o.steps = to_int(a, v);
      else if (a == "--sampler" || a == "--scheduler") o.sampler = v;
      else if (a == "--guidance") o.guidance = to_number(a, v);
      else if (a == "--seed") {
        double seed = to_number(a, v);
        if (seed < 0 || seed != std::floor(seed) || seed > 9.0e15) throw Error("--seed " + v + " must be an integer >= 0");
        o.seed = uint64_t(seed);
      }
      else if (a == "--latents") o.latents = v;
      else if (a == "--height") o.height = to_int(a, v);
      else if (a == "--width") o.width = to_int(a, v);
      else if (a == "--backend") o.backend = v;
      else if (a == "--device") o.device = v;
      else if (a == "--precision-hint") o.precision_hint = v;
      else if (a == "--engines") o.engines = v;
      else throw Error("unknown option " + a + "; see --help");
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 1) throw Error("give exactly one PROMPT (quote it); see --help");
  o.prompt = positional[0];
  if (o.kiln.empty()) throw Error("-m KILN_DIR is required");
  if (o.steps < 1 || o.steps > 1000) throw Error("--steps " + std::to_string(o.steps) + " must be in 1..1000");
  if (o.guidance < -100 || o.guidance > 100) throw Error("--guidance must be a finite number in -100..100 (≤ 1: off)");
  fs::path out(o.out);
  std::error_code ec;
  if (out.extension() != ".png") throw Error("cannot write " + o.out + ": diffkiln-cpp writes .png only");
  fs::path parent = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  if (!fs::is_directory(parent, ec)) throw Error("cannot write " + o.out + ": folder " + parent.string() + " does not exist");
  if (fs::is_symlink(out, ec) || (fs::exists(out, ec) && !fs::is_regular_file(out, ec)))
    throw Error(o.out + " exists and is not a regular file; choose another -o");
  return o;
}

void check_finite(const std::vector<float>& v, const std::string& stage) {
  for (float x : v)
    if (!std::isfinite(x))
      throw Error(stage + " produced NaN/Inf values: the graph overflows on these inputs or its weights are damaged");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run(const Options& o) {
  auto start = std::chrono::steady_clock::now();
  diffkiln::Kiln kiln = diffkiln::Kiln::open(o.kiln);
  const diffkiln::PipelineInfo& info = kiln.pipeline();
  const bool sdxl = info.kind == "sdxl";  // two text encoders, pooled text_embeds and time_ids
  const std::vector<std::string> encoders = sdxl ? std::vector<std::string>{"text_encoder", "text_encoder_2"}
                                                 : std::vector<std::string>{"text_encoder"};
  if (kiln.tokenizer_dirs().size() != encoders.size())
    throw Error(o.kiln + ": the manifest names " + std::to_string(kiln.tokenizer_dirs().size()) + " tokenizer(s) for " +
                std::to_string(encoders.size()) + " text encoder(s)");

  // sizes: the model's native size unless given; multiples of 8 * 2^num_down up to the UNet profile
  int side = info.sample_size * 8, multiple = 8 << info.num_down;
  int height = o.height ? o.height : side, width = o.width ? o.width : side;
  for (auto [name, v] : {std::pair{"height", height}, std::pair{"width", width}})
    if (v <= 0 || v > kiln.max_side() || v % multiple)
      throw Error(std::string("--") + name + " " + std::to_string(v) + " must be a multiple of " + std::to_string(multiple) +
                  " from " + std::to_string(multiple) + " to " + std::to_string(kiln.max_side()) + " for this model");
  const int64_t C = info.latent_channels, h = height / 8, w = width / 8;
  const size_t plane = size_t(C * h * w);

  // initial noise: the .npy file (diffkiln run's --latents contract) or a seeded normal draw
  std::vector<float> noise(plane);
  if (!o.latents.empty()) {
    diffkiln::NpyArray a = diffkiln::read_npy(o.latents);
    if (a.shape != std::vector<int64_t>{1, C, h, w})
      throw Error("--latents has shape [" + std::to_string(a.shape[0]) + ", " + std::to_string(a.shape[1]) + ", " +
                  std::to_string(a.shape[2]) + ", " + std::to_string(a.shape[3]) + "], expected [1, " + std::to_string(C) +
                  ", " + std::to_string(h) + ", " + std::to_string(w) + "] for this size");
    noise = a.data;
    for (float x : noise)
      if (!std::isfinite(x)) throw Error("--latents holds NaN/Inf values; pass finite initial noise");
  } else {
    std::mt19937_64 gen(o.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : noise) x = normal(gen);
  }

  // the backend and one Component per graph
  std::unique_ptr<diffkiln::Backend> backend;
  if (o.backend == "openvino")
    backend = diffkiln::openvino_backend(o.device, o.precision_hint);
  else if (o.backend == "tensorrt")  // engines/<trt version>-sm<cc>/ of this TensorRT and GPU, checked
    backend = diffkiln::tensorrt_backend(kiln, o.engines.empty() ? kiln.dir() / "engines" : fs::path(o.engines));
  else
    throw Error("--backend " + o.backend + " is not openvino or tensorrt");
  std::vector<std::unique_ptr<diffkiln::Component>> text_encoders;
  std::vector<diffkiln::ClipTokenizer> tokenizers;
  for (size_t i = 0; i < encoders.size(); ++i) {
    text_encoders.push_back(backend->load(kiln, encoders[i]));
    tokenizers.push_back(diffkiln::ClipTokenizer::from_dir(kiln.tokenizer_dirs()[i]));
  }
  auto unet = backend->load(kiln, "unet");
  auto vae_decoder = backend->load(kiln, "vae_decoder");
  diffkiln::json::Value config = diffkiln::json::parse_file(kiln.scheduler_config().string());
  double load_seconds = seconds_since(start);

  // text encoding: n 77-token windows per prompt (long prompts), rows [uncond; cond] when guidance is on
  auto t0 = std::chrono::steady_clock::now();
  const bool cfg = o.guidance > 1.0;
  const int64_t rows = cfg ? 2 : 1;
  const diffkiln::MultiVector multi_vector = diffkiln::multi_vector_tokens(kiln.manifest());  // textual inversions
  const std::string prompt = diffkiln::expand_prompt(o.prompt, multi_vector);
  const std::string negative = diffkiln::expand_prompt(o.negative, multi_vector);
  int n = 1;
  for (const auto& tok : tokenizers) n = std::max({n, tok.n_chunks(prompt), tok.n_chunks(negative)});
  const int64_t L = tokenizers[0].model_max_length();
  std::vector<Tensor> states;  // per encoder [rows, n·77, D_i]
  Tensor pooled;               // SDXL: encoder 2's text_embeds of each row's first window, [rows, P]
  for (size_t i = 0; i < encoders.size(); ++i) {
    std::vector<int32_t> ids;
    for (const std::string* text : cfg ? std::vector{&negative, &prompt} : std::vector{&prompt})
      for (const auto& window : tokenizers[i].encode_chunks(*text, n)) ids.insert(ids.end(), window.begin(), window.end());
    for (size_t r = 0; o.show_tokens && r < ids.size() / size_t(L); ++r) {
      std::printf("  tokens");
      for (int64_t k = 0; k < L; ++k) std::printf(" %d", ids[r * size_t(L) + size_t(k)]);
      std::printf("\n");
    }
    diffkiln::TensorMap out = text_encoders[i]->infer({{"input_ids", Tensor::i32({rows * n, L}, ids)}});
    // SD 1.x/2.x condition on the last hidden state, SDXL on the penultimate one (optimum: hidden_states.{L-1})
    std::string key = !sdxl ? "last_hidden_state"
                      : info.contract == "optimum" ? "hidden_states." + std::to_string(info.text_layers.at(i) - 1)
                                                   : "penultimate_hidden_state";
    Tensor s = out.at(key);  // [rows·n, 77, D]
    s.shape = {rows, n * L, s.shape.back()};  // the windows' states side by side, same memory
    states.push_back(std::move(s));
    if (encoders[i] == "text_encoder_2") {
      const Tensor& e = out.at("text_embeds");  // [rows·n, P]
      const int64_t P = e.shape.back();
      pooled = Tensor(diffkiln::DType::f32, {rows, P});
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(e.data<float>() + r * n * P, P, pooled.data<float>() + r * P);
    }
  }
  Tensor context = states[0];  // [rows, n·77, ΣD]: the encoders' states concatenated along the last axis
  if (states.size() == 2) {
    const int64_t D0 = states[0].shape[2], D1 = states[1].shape[2], tokens = rows * n * L;
    context = Tensor(diffkiln::DType::f32, {rows, n * L, D0 + D1});
    for (int64_t t = 0; t < tokens; ++t) {
      std::copy_n(states[0].data<float>() + t * D0, D0, context.data<float>() + t * (D0 + D1));
      std::copy_n(states[1].data<float>() + t * D1, D1, context.data<float>() + t * (D0 + D1) + D0);
    }
  }
  if (sdxl && cfg && negative.empty()) {  // SDXL's force_zeros_for_empty_prompt: an empty negative is zeros
    std::fill_n(context.data<float>(), context.numel() / size_t(rows), 0.0f);
    std::fill_n(pooled.data<float>(), pooled.numel() / size_t(rows), 0.0f);
  }
  check_finite(std::vector<float>(context.data<float>(), context.data<float>() + context.numel()), "text encoding");
  diffkiln::TensorMap conditioning = {{"encoder_hidden_states", context}};
  if (sdxl) {  // micro-conditioning: original size, crop (0, 0), target size
    std::vector<float> ids_row = {float(height), float(width), 0, 0, float(height), float(width)}, time_ids;
    for (int64_t r = 0; r < rows; ++r) time_ids.insert(time_ids.end(), ids_row.begin(), ids_row.end());
    conditioning["text_embeds"] = pooled;
    conditioning["time_ids"] = Tensor::f32({rows, 6}, time_ids);
  }
  double text_seconds = seconds_since(t0);

  // the denoiser: VE latents x at sigmas[i] -> the clean-latent estimate (runtime/schedulers.py Denoiser)
  diffkiln::Schedule schedule = diffkiln::make_schedule(config, o.sampler, o.steps);
  double unet_seconds = 0.0;
  auto denoise = [&](const std::vector<float>& x, size_t i) {
    const float sigma = float(schedule.sigmas[i]);
    const double c_in_d = 1.0 / std::sqrt(schedule.sigmas[i] * schedule.sigmas[i] + 1);
    const float c_in = float(c_in_d);
    Tensor sample(diffkiln::DType::f32, {rows, C, h, w});
    for (int64_t r = 0; r < rows; ++r)
      for (size_t k = 0; k < plane; ++k) sample.data<float>()[size_t(r) * plane + k] = x[k] * c_in;  // x_in, per CFG row
    Tensor timestep = Tensor::f32({rows}, std::vector<float>(size_t(rows), float(schedule.timesteps[i])));
    diffkiln::TensorMap feeds = conditioning;
    feeds["sample"] = std::move(sample);
    feeds["timestep"] = std::move(timestep);
    Tensor out = unet->infer(feeds).at("out_sample");
    unet_seconds += unet->last_seconds();
    const float* e = out.data<float>();
    std::vector<float> pred(e, e + plane), denoised(plane);
    if (cfg)  // classifier-free guidance: uncond + g · (cond − uncond)
      for (size_t k = 0; k < plane; ++k) pred[k] = e[k] + float(o.guidance) * (e[plane + k] - e[k]);
    for (size_t k = 0; k < plane; ++k) {
      if (schedule.prediction_type == "epsilon") denoised[k] = x[k] - sigma * pred[k];
      else if (schedule.prediction_type == "v_prediction") denoised[k] = x[k] * c_in * c_in - pred[k] * float(schedule.sigmas[i] * c_in_d);
      else denoised[k] = pred[k];
    }
    check_finite(denoised, "unet step " + std::to_string(i + 1));
    return denoised;
  };
  std::vector<float> x(plane);
  for (size_t k = 0; k < plane; ++k) x[k] = noise[k] * float(schedule.init_noise_sigma);
  x = diffkiln::sample(o.sampler, denoise, std::move(x), schedule);

  // decode: back to the VP latent diffusers ends with, unscaled, through the VAE; [-1, 1] -> 8-bit RGB
  t0 = std::chrono::steady_clock::now();
  const float to_model = float(1.0 / std::sqrt(1 + schedule.sigmas.back() * schedule.sigmas.back()));
  Tensor latent(diffkiln::DType::f32, {1, C, h, w});
  for (size_t k = 0; k < plane; ++k) latent.data<float>()[k] = x[k] * to_model / float(info.scaling_factor);
  Tensor decoded = vae_decoder->infer({{"latent_sample", latent}}).at("sample");  // [1, 3, H, W]
  if (decoded.shape != std::vector<int64_t>{1, 3, height, width}) throw Error("vae_decoder gave " + decoded.describe());
  double vae_seconds = seconds_since(t0);
  const float* d = decoded.data<float>();
  std::vector<uint8_t> rgb(size_t(height) * size_t(width) * 3);
  const size_t pixels = size_t(height) * size_t(width);
  for (size_t c = 0; c < 3; ++c)
    for (size_t p = 0; p < pixels; ++p) {
      float v = d[c * pixels + p];
      if (!std::isfinite(v)) throw Error("vae decode produced NaN/Inf values");
      v = std::min(1.0f, std::max(0.0f, v / 2 + 0.5f));
      rgb[p * 3 + c] = uint8_t(std::nearbyint(v * 255.0f));  // half to even, as numpy's round
    }
  char gs[32];
  std::snprintf(gs, sizeof gs, "%g", o.guidance);
  std::string params = o.prompt + "\nNegative prompt: " + o.negative + "\nSteps: " + std::to_string(o.steps) +
                       ", Sampler: " + o.sampler + ", CFG scale: " + gs + ", Seed: " + std::to_string(o.seed) +
                       ", Size: " + std::to_string(width) + "x" + std::to_string(height) + ", Model: " + o.kiln +
                       ", Backend: " + backend->name() + " (diffkiln-cpp)";
  diffkiln::write_png(o.out, width, height, rgb, {{"parameters", params}});

  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("  %-24s %10s\n", "backend", backend->name().c_str());
  std::printf("  %-24s %10.1f ms\n", "load", load_seconds * 1000);
  std::printf("  %-24s %10.1f ms\n", "text encoding", text_seconds * 1000);
  std::printf("  %-24s %10.1f ms\n", ("unet total (" + std::to_string(o.steps) + " steps)").c_str(), unet_seconds * 1000);
  std::printf("  %-24s %10.1f ms\n", "unet per step", unet_seconds * 1000 / o.steps);
  std::printf("  %-24s %10.1f ms\n", "vae decode", vae_seconds * 1000);
  std::printf("  %-24s %10.1f ms\n", "total", seconds_since(start) * 1000);
  std::printf("  %-24s %10.1f MB\n", "peak RSS", double(ru.ru_maxrss) / 1024);
  std::printf("wrote %s\n", o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {  // diffkiln::Error, and anything a library throws: one line, exit 1
    std::string why = e.what();
    std::fprintf(stderr, "Error: %s\n", why.substr(0, why.find('\n')).c_str());
    return 1;
  }
}
