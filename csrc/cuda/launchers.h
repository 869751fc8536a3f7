// Internal launchers of the CUDA translation units (dispatch in dispatch.cu). Torch-free, no CUDA types needed here.
#pragma once

#include <cstddef>

#include "attention_kernels.h"

namespace fused_posenc {

// Compile-time check builds (tests/test_native_cuda_compile.py) instantiate a subset of the kernels:
// -DFUSED_POSENC_CUDA_CHECK_SUBSET: tensor-core kernels for bf16 and padded head dim 128 only (fp16 differs in the
// mma type and the conversions only, smaller head dims in loop trip counts), scalar kernels for fp32 only.
// -DFUSED_POSENC_CUDA_ONLY_HD=N: one padded head dim (scripts/cuda_static_report.py --only-hd).
// The extension build instantiates everything.
#if defined(FUSED_POSENC_CUDA_CHECK_SUBSET) && !defined(FUSED_POSENC_CUDA_ONLY_HD)
#define FUSED_POSENC_CUDA_ONLY_HD 128
#endif
#if defined(FUSED_POSENC_CUDA_ONLY_HD)
#define FPE_HD_ENABLED(hd) ((hd) == FUSED_POSENC_CUDA_ONLY_HD)
#else
#define FPE_HD_ENABLED(hd) true
#endif
#if defined(FUSED_POSENC_CUDA_CHECK_SUBSET)
#define FPE_F16_ENABLED false
#define FPE_SCALAR_16BIT_ENABLED false
#else
#define FPE_F16_ENABLED true
#define FPE_SCALAR_16BIT_ENABLED true
#endif

// tensor-core kernels (forward.cu, backward.cu): fp16 / bf16, padded head dim kHD in {32, 64, 96, 128}
int padded_head_dim(int D, int Dv);  // 0 when max(D, Dv) > kMaxTensorCoreHeadDim
size_t tc_forward_smem_bytes(int kHD);
size_t tc_backward_smem_bytes(int kHD);
int tc_forward(const CudaAttnArgs& a, const EncParams& p, void* stream, bool vec);
int tc_backward(const CudaAttnArgs& a, const EncParams& p, void* stream, bool vec);

// scalar fp32-in-shared-memory kernels (scalar.cu): any dtype, head dims up to what shared memory holds
size_t scalar_smem_bytes(const CudaAttnArgs& a, bool backward);
int scalar_forward(const CudaAttnArgs& a, const EncParams& p, void* stream);
int scalar_backward_main(const CudaAttnArgs& a, const EncParams& p, void* stream);

// prologue / epilogue of the rotations (prologue.cu)
// y (B, L, Hy, D) <- x (B, L, Hx, D) rotated at its positions; head hy reads x head hy / (Hy / Hx), FoPE tables of hy.
int encode_rows(int dtype, const void* x, void* y, const int64_t* pos, int64_t pos_bs, int B, int L, int Hx, int Hy,
                int D, const EncParams& p, void* stream);
// dx (B, L, H, D) fp32 <- g (B, L, H, D) through the transposed rotation; x (B, L, Hx, D) unencoded input; FoPE:
// dcos / dsin (H, Dk, P) += coefficient gradients (one atomic per element per block of rows), when not null.
int decode_rows(int dtype, const float* g, const void* x, float* dx, const int64_t* pos, int64_t pos_bs, int B, int L,
                int H, int Hx, int D, const EncParams& p, float* dcos, float* dsin, void* stream);

}  // namespace fused_posenc
