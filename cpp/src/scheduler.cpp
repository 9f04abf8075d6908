// Schedules for the euler and ddim families, following runtime/schedulers.py `family_schedule` line by line.
#include "diffkiln/scheduler.hpp"

#include <cmath>

#include "diffkiln/runtime.hpp"

namespace diffkiln {
namespace {

double number_or(const json::Value& c, const char* key, double fallback) {
  const json::Value* v = c.get(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_number()) throw Error(std::string("scheduler config ") + key + " is not a number");
  return v->num;
}

std::string string_or(const json::Value& c, const char* key, const std::string& fallback) {
  const json::Value* v = c.get(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_string()) throw Error(std::string("scheduler config ") + key + " is not a string");
  return v->str;
}

// numpy's linspace: start + i * step, the last point exactly `stop`
std::vector<double> linspace(double start, double stop, int n) {
  std::vector<double> y(size_t(std::max(n, 0)));
  double step = n > 1 ? (stop - start) / (n - 1) : 0.0;
  for (int i = 0; i < n; ++i) y[size_t(i)] = start + i * step;
  if (n > 1) y.back() = stop;
  return y;
}

std::vector<double> alphas_cumprod(const json::Value& c, int T) {
  std::string schedule = string_or(c, "beta_schedule", "linear");
  double b0 = number_or(c, "beta_start", 0.0001), b1 = number_or(c, "beta_end", 0.02);
  std::vector<double> betas;
  const json::Value* trained = c.get("trained_betas");
  if (trained && trained->is_array()) {
    for (const auto& b : trained->items) {
      if (!b.is_number()) throw Error("scheduler config trained_betas holds a non-number");
      betas.push_back(b.num);
    }
    if (int(betas.size()) != T) throw Error("scheduler config trained_betas does not have num_train_timesteps values");
  } else if (schedule == "linear") {
    betas = linspace(b0, b1, T);
  } else if (schedule == "scaled_linear") {  // Stable Diffusion: linear in sqrt(beta)
    betas = linspace(std::sqrt(b0), std::sqrt(b1), T);
    for (double& b : betas) b *= b;
  } else if (schedule == "squaredcos_cap_v2") {
    for (int i = 0; i < T; ++i) {
      auto bar = [&](double t) { double v = std::cos((t / T + 0.008) / 1.008 * M_PI / 2); return v * v; };
      betas.push_back(std::min(1 - bar(i + 1) / bar(i), 0.999));
    }
  } else {
    throw Error("unknown beta_schedule '" + schedule + "' in the scheduler config");
  }
  std::vector<double> ac(betas.size());
  double prod = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) ac[i] = prod *= (1.0 - betas[i]);
  return ac;
}

double interp(double x, const std::vector<double>& fp) {  // np.interp(x, arange(T), fp)
  if (x <= 0) return fp.front();
  if (x >= double(fp.size() - 1)) return fp.back();
  size_t i = size_t(std::floor(x));
  double w = x - double(i);
  return fp[i] + (fp[i + 1] - fp[i]) * w;
}

}  // namespace

Schedule make_schedule(const json::Value& c, const std::string& sampler, int steps) {
  if (sampler != "euler" && sampler != "ddim") throw Error("unknown sampler '" + sampler + "'; choose euler or ddim");
  if (!c.is_object()) throw Error("the scheduler config is not a JSON object");
  for (const char* key : {"rescale_betas_zero_snr", "thresholding", "clip_sample"})
    if (const json::Value* v = c.get(key); v && v->kind == json::Value::Kind::boolean && v->b)
      throw Error(std::string("scheduler config option ") + key + "=true is not supported");
  int T = int(number_or(c, "num_train_timesteps", 1000));
  if (T < 2 || T > 100000) throw Error("scheduler config num_train_timesteps is out of range");
  if (steps < 1 || steps > T) throw Error("--steps " + std::to_string(steps) + " must be in 1.." + std::to_string(T));
  std::string spacing = string_or(c, "timestep_spacing", "leading");
  double offset = number_or(c, "steps_offset", 0);
  const json::Value* alpha_one = c.get("set_alpha_to_one");
  bool set_alpha_to_one = !alpha_one || alpha_one->is_null() || alpha_one->b;

  Schedule s;
  s.prediction_type = string_or(c, "prediction_type", "epsilon");
  if (s.prediction_type != "epsilon" && s.prediction_type != "v_prediction" && s.prediction_type != "sample")
    throw Error("unknown prediction_type '" + s.prediction_type + "' in the scheduler config");
  std::vector<double> ac = alphas_cumprod(c, T), train(ac.size());
  for (size_t i = 0; i < ac.size(); ++i) train[i] = std::sqrt((1 - ac[i]) / ac[i]);

  // timesteps (spaced_timesteps): euler keeps 'linspace' fractional (as float32), ddim rounds it
  std::vector<double>& t = s.timesteps;
  if (spacing == "linspace") {
    std::vector<double> l = linspace(0, T - 1, steps);
    for (auto it = l.rbegin(); it != l.rend(); ++it)
      t.push_back(sampler == "euler" ? double(float(*it)) : std::nearbyint(*it));
  } else if (spacing == "leading") {
    for (int i = steps - 1; i >= 0; --i) t.push_back(double(i * (T / steps)) + offset);
  } else if (spacing == "trailing") {
    double step = -double(T) / steps;
    int n = int(std::ceil((0 - double(T)) / step));
    for (int i = 0; i < n; ++i) t.push_back(std::nearbyint(T + i * step) - 1);
  } else {
    throw Error("unknown timestep_spacing '" + spacing + "'; known: linspace, leading, trailing");
  }
  for (double v : t)
    if (v < 0 || v > T - 1) throw Error("the scheduler config gives a timestep outside 0.." + std::to_string(T - 1));

  if (sampler == "ddim") {  // steps from t to t - T // steps; past t=0 lands on alpha 1 (sigma 0) or alpha_0
    for (double v : t) s.sigmas.push_back(train[size_t(v)]);
    int prev = int(t.back()) - T / steps;
    s.sigmas.push_back(prev >= 0 ? train[size_t(prev)] : (set_alpha_to_one ? 0.0 : train[0]));
  } else {
    for (double v : t) s.sigmas.push_back(interp(v, train));
    s.sigmas.push_back(0.0);
  }
  if (sampler == "euler" && (spacing == "linspace" || spacing == "trailing")) {
    s.init_noise_sigma = 0;
    for (double v : s.sigmas) s.init_noise_sigma = std::max(s.init_noise_sigma, v);
  } else {
    s.init_noise_sigma = std::sqrt(s.sigmas[0] * s.sigmas[0] + 1);
  }
  return s;
}

std::vector<float> sample_euler(const DenoiseFn& denoise, std::vector<float> x, const std::vector<double>& sigmas) {
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    float sigma = float(sigmas[i]), dt = float(sigmas[i + 1] - sigmas[i]);
    std::vector<float> denoised = denoise(x, i);
    for (size_t k = 0; k < x.size(); ++k) {
      float d = (x[k] - denoised[k]) / sigma;  // dx/dsigma
      x[k] = x[k] + d * dt;
    }
  }
  return x;
}

std::vector<float> sample_ddim(const DenoiseFn& denoise, std::vector<float> x, const std::vector<double>& sigmas) {
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    float sigma = float(sigmas[i]), sigma_next = float(sigmas[i + 1]);
    std::vector<float> denoised = denoise(x, i);
    for (size_t k = 0; k < x.size(); ++k) {
      float eps = (x[k] - denoised[k]) / sigma;
      x[k] = denoised[k] + sigma_next * eps;
    }
  }
  return x;
}

std::vector<float> sample(const std::string& sampler, const DenoiseFn& denoise, std::vector<float> x,
                          const Schedule& schedule) {
  if (sampler == "euler") return sample_euler(denoise, std::move(x), schedule.sigmas);
  if (sampler == "ddim") return sample_ddim(denoise, std::move(x), schedule.sigmas);
  throw Error("unknown sampler '" + sampler + "'; choose euler or ddim");
}

}  // namespace diffkiln
