"""Stand-in for comfy.samplers: the scheduler names nodes offer (sampling itself needs the real host)."""
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]
