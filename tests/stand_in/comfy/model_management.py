"""Stand-in for comfy.model_management: CPU only, and the interrupt flag the cancel button sets."""
import torch

interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def interrupt_current_processing(value=True) -> None:
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted() -> bool:
    return interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()



def module_size(module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


_loaded = []                    # the ModelPatchers load_models_gpu loaded, newest last


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False) -> None:
    for m in models:
        m.model.to(m.load_device)
        if m not in _loaded:
            _loaded.append(m)


def loaded_models(only_currently_used=False) -> list:
    return list(_loaded)


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    return False


def soft_empty_cache(force=False) -> None:
    pass
