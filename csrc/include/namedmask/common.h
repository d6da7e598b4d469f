#pragma once
// Portability macros shared by the CPU (.cpp) and CUDA (.cu) sides.
#if defined(__CUDACC__)
#define NM_HD __host__ __device__ __forceinline__
#else
#define NM_HD inline
#endif
#include <cstdint>
