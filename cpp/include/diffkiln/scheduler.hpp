// Schedules and samplers, as diffkiln/runtime/schedulers.py computes them (k-diffusion's VE parameterisation:
// a latent at noise level sigma is x = x0 + sigma * eps).
//
//   Schedule s = make_schedule(config, "euler", 20);              // sigmas (n+1), timesteps (n)
//   x = sample("euler", denoise, x * s.init_noise_sigma, s);        // denoise(x, i) -> x0 estimate at sigmas[i]
//
// Only the deterministic samplers: euler (EulerDiscreteScheduler) and ddim (DDIMScheduler, eta 0).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "diffkiln/json.hpp"

namespace diffkiln {

struct Schedule {
  std::vector<double> sigmas;     // (n+1) decreasing VE noise levels; the last is 0 except DDIM without alpha 1
  std::vector<double> timesteps;  // (n) the UNet timestep at sigmas[i]
  double init_noise_sigma = 1.0;  // txt2img starts from noise * init_noise_sigma
  std::string prediction_type = "epsilon";
};

// From a diffusers scheduler config (scheduler/scheduler_config.json); sampler: euler | ddim.
Schedule make_schedule(const json::Value& config, const std::string& sampler, int steps);

// denoise(x, i): the clean-latent estimate at sigmas[i], x and the result [numel] fp32.
using DenoiseFn = std::function<std::vector<float>(const std::vector<float>& x, size_t step)>;

// Euler method on the probability-flow ODE (Karras et al. 2022, Alg. 2, s_churn = 0).
std::vector<float> sample_euler(const DenoiseFn& denoise, std::vector<float> x, const std::vector<double>& sigmas);
// DDIM, eta = 0 (Song et al. 2021, eq. 12), in VE space: x_next = x0 + sigma_next * eps.
std::vector<float> sample_ddim(const DenoiseFn& denoise, std::vector<float> x, const std::vector<double>& sigmas);
std::vector<float> sample(const std::string& sampler, const DenoiseFn& denoise, std::vector<float> x,
                          const Schedule& schedule);

}  // namespace diffkiln
