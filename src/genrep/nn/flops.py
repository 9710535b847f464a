"""Analytic model-FLOPs counts (the 'model FLOPs' of MFU: matmuls only, 2 FLOPs per multiply-add).

Norms, activations, softmax and elementwise work are left out, as in the PaLM/nanoGPT definition,
so MFU compares the work the model needs with the hardware's peak matmul rate. RoPE's rotation and
the modulation's scale and shift are elementwise too; a modulation's projection is a matmul and counts.
"""


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def transformer_block_flops(tokens: int, dim: int, mlp_ratio: float, attended: int | None = None) -> int:
    """Forward FLOPs of one pre-LN block on ``tokens`` tokens.

    ``attended`` is the average number of keys a query sees (``tokens`` for full attention, about
    half for a causal mask if the kernel skips masked blocks); the default counts full attention.
    """
    attended = tokens if attended is None else attended
    hidden = int(dim * mlp_ratio)
    qkv_proj = linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim)
    scores_and_mix = 2 * 2 * tokens * attended * dim
    mlp = linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)
    return qkv_proj + scores_and_mix + mlp


def training_flops(forward_flops: int) -> int:
    """Forward + backward: the backward pass costs about twice the forward (grads of inputs and weights)."""
    return 3 * forward_flops
