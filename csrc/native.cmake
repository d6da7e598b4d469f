# The one list of native sources and flags. setup.py parses the set(...) lines below
# (whitespace-separated values, no variables); CMakeLists.txt include()s this file.
set(NAMEDMASK_CPU_SOURCES csrc/*.cpp csrc/cpu/*.cpp)
set(NAMEDMASK_CUDA_SOURCES csrc/cuda/*.cu csrc/cuda/*.cpp)
set(NAMEDMASK_INCLUDE_DIRS csrc/include)
set(NAMEDMASK_CXX_FLAGS -O3 -std=c++20 -fopenmp)
set(NAMEDMASK_LINK_FLAGS -fopenmp)
set(NAMEDMASK_NVCC_FLAGS -O3 -std=c++20 --expt-relaxed-constexpr -lineinfo)
set(NAMEDMASK_CUDA_ARCH_DEFAULT 9.0;8.0)
