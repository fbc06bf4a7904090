"""8-bit compression of averaged tensors that works with the numpy this project runs on.

hivemind 1.1.12's ``Uniform8BitQuantization.extract`` reads the codebook size with
``int(np.frombuffer(..., count=1))``, which numpy 2.4 refuses (a 1-element array is no scalar): every
8-bit part a peer receives fails to decode, hivemind bans the sender for the round, and each peer silently
keeps its own values ("Averaging: received 50% results"). :class:`Uniform8Bit` decodes the same wire
format correctly, and checks a stranger's buffer before indexing with it. hivemind decodes every part with
one registry of compression objects by wire type (not with the averager's own object), so
:mod:`garden.collab.hivemind_patches` puts it there, before the averagers fork.
"""

from __future__ import annotations

from typing import Any

from hivemind.compression import Uniform8BitQuantization


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization (same wire format), with a decoder that works on numpy 2, and
    an encoder without ``torch.quantize_per_tensor`` (deprecated in torch 2.13)."""

    def quantize(self, tensor: Any, allow_inplace: bool = False) -> tuple[Any, Any]:
        import math

        import numpy as np
        import torch
        from hivemind.compression.quantization import average_buckets

        offset = self.n_bins // 2
        centered = tensor.detach().to(torch.float32) - tensor.detach().float().mean()
        std = centered.norm() / math.sqrt(max(centered.numel() - 1, 1))
        scale = float(self.RANGE_IN_SIGMAS * std / self.n_bins) or 1.0
        quantized = torch.clamp(torch.round(centered / scale) + offset, 0, self.n_bins - 1).to(torch.uint8)
        lookup = average_buckets(tensor.detach().float(), quantized, self.n_bins)
        return np.asarray(quantized, dtype=self.indices_dtype), np.asarray(lookup, dtype=self.codebook_dtype)

    def extract(self, serialized_tensor: Any) -> Any:
        import numpy as np
        import torch

        buffer = serialized_tensor.buffer
        if len(buffer) < 8:
            raise ValueError(f"an 8-bit tensor of {len(buffer)} bytes has no codebook size")
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        numel = 1
        for dim in serialized_tensor.size:
            numel *= int(dim)
        if not 0 < codebook_size <= self.n_bins or len(buffer) != 8 + 4 * codebook_size + numel:
            raise ValueError(
                f"an 8-bit tensor of {len(buffer)} bytes does not hold a {codebook_size}-entry codebook and "
                f"{numel} indices"
            )
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        if quantized.numel() and int(quantized.max()) >= codebook_size:
            raise ValueError("an 8-bit tensor indexes past its codebook")
        table = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return table[quantized].requires_grad_(serialized_tensor.requires_grad)

