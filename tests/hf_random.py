"""Random-initialised transformers checkpoints whose every parameter matters."""
import torch


@torch.no_grad()
def randomize_norms_and_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises norms to 1 and biases to 0; randomise them so a model that
    ignored either would not match the reference by accident."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1 + 0.2 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn_like(param))
    return model
