"""Triton kernels for the decoder hot path; each matches a plain-torch reference in `stepserve.layers` (the
sampler's top-p cut: in `stepserve.engine.sampling`).

Importing this package needs triton. `install_triton_kernels()` routes the layer functions' CUDA calls
(and paged attention) to these kernels; CPU tensors keep taking the references. On sm_90+ the norm, rotary and
attention kernels launch with programmatic dependent launch (`pdl`; STEPSERVE_PDL=0 turns it off).
"""

from __future__ import annotations

from stepserve.kernels.activation import silu_and_mul
from stepserve.kernels.fp8_gemm import fp8_gemm, fp8_mlp
from stepserve.kernels.gemv import linear
from stepserve.kernels.layer_norm import scaled_add_layer_norm_
from stepserve.kernels.paged_attention import decode_attention, extend_attention, paged_attention, qk_norm_rope_attend
from stepserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from stepserve.kernels.rope2d import rope2d_qk
from stepserve.kernels.rotary import apply_rotary, qk_norm_rope, qk_norm_rope_store_kv
from stepserve.kernels.top_p import top_p_cut

# Layer function name (see stepserve.layers.dispatch) -> kernel with the same signature.
LAYER_KERNELS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "scaled_add_layer_norm_": scaled_add_layer_norm_,  # the vision tower's
    # In place, unlike the references: callers must not reuse q/k expecting the unrotated values.
    "apply_rotary": apply_rotary,
    "qk_norm_rope": qk_norm_rope,
    "qk_norm_rope_store_kv": qk_norm_rope_store_kv,
    "qk_norm_rope_attend": qk_norm_rope_attend,
    "rope2d_qk": rope2d_qk,  # the vision tower's
    "silu_and_mul": silu_and_mul,
    "fp8_linear": fp8_gemm,
    "fp8_mlp": fp8_mlp,  # the vision MLP's, when its linears are fp8
    "linear": linear,
    "top_p_cut": top_p_cut,  # the sampler's
}


def install_triton_kernels(enable: bool = True) -> None:
    """Use the Triton kernels for CUDA tensors (or, with enable=False, go back to the references)."""
    from stepserve.layers.attention import set_attention_backend
    from stepserve.layers.dispatch import register_kernel

    for name, fn in LAYER_KERNELS.items():
        register_kernel(name, fn if enable else None)
    set_attention_backend(paged_attention if enable else None)


__all__ = ["apply_rotary", "decode_attention", "extend_attention", "fp8_gemm", "fp8_mlp", "fused_add_rms_norm",
           "install_triton_kernels", "paged_attention", "qk_norm_rope", "qk_norm_rope_attend", "qk_norm_rope_store_kv",
           "rms_norm", "rope2d_qk", "scaled_add_layer_norm_", "silu_and_mul", "top_p_cut", "LAYER_KERNELS"]
