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


def processing_interrupted() -> bool:
    return interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()



def module_size(module) -> int:
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def free_memory(memory_required, device, keep_loaded=()) -> None:
    pass


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    return False


def soft_empty_cache(force=False) -> None:
    pass
