"""Stand-in for comfy.patcher_extension: the wrapper types and how keyed wrappers are stored."""


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


def add_wrapper_with_key(wrapper_type, key, wrapper, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    wrappers = transformer_options.setdefault("wrappers", {})
    wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)
