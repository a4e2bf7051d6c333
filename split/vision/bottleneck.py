"""Learned bottleneck at a cut (BottleFit): an encoder on the device reduces the channels of the
head's activation, a decoder at the start of the tail restores them.

    bn = Bottleneck.at(head_activation, channels=8)   # encoder C -> 8, decoder 8 -> C
    z = bn.encoder(head(x))                            # what travels (then the int8/int4 codec)
    y = tail(bn.decoder(z))

The encoder ends in ReLU6, so the wire tensor is bounded in [0, 6] with zero point 0: int8 and
int4 lose little. Token activations (ViT: (B, T, D)) get Linear layers instead of convolutions.
Training: split.vision.train.train_bottleneck (two stages: distil at the cut, then fine-tune).
"""
import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, channels: int):
        super().__init__()
        self.encoder, self.decoder, self.channels = encoder, decoder, channels

    @classmethod
    def at(cls, activation: torch.Tensor, channels: int, seed: int = 0) -> "Bottleneck":
        torch.manual_seed(seed)
        if activation.dim() == 4:                                   # (B, C, H, W)
            c = activation.shape[1]
            encoder = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, channels, 1), nn.BatchNorm2d(channels), nn.ReLU6())
            decoder = nn.Sequential(nn.Conv2d(channels, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
        elif activation.dim() == 3:                                 # (B, T, D)
            d = activation.shape[2]
            encoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, channels), nn.ReLU6())
            decoder = nn.Sequential(nn.Linear(channels, d), nn.GELU(), nn.Linear(d, d))
        else:
            raise ValueError(f"no bottleneck for activations of shape {tuple(activation.shape)}")
        return cls(encoder, decoder, channels)

    def forward(self, a):
        return self.decoder(self.encoder(a))


def fake_quantize(z: torch.Tensor, levels: int) -> torch.Tensor:
    """Straight-through per-channel quantization noise of the wire codec (levels 255: int8, 15: int4)."""
    dims = [d for d in range(z.dim()) if d != (1 if z.dim() == 4 else z.dim() - 1)]
    hi = z.detach().amax(dim=dims, keepdim=True).clamp_min(1e-8)    # the encoder's ReLU6 makes lo = 0
    scale = hi / levels
    return z + (torch.round(z / scale) * scale - z).detach()
