// One launch site form for both compilers of the kernels:
//   FASTNTXENT_LAUNCH(kernel, grid, block, stream, args...)
// nvcc: the launch itself, kernel<<<grid, block, 0, stream>>>(args...).
// Host emulation (csrc/emulation/cuda_host_emulation.h, which defines
// FASTNTXENT_CUDA_HOST_EMULATION): the grid runs block by block, each block's threads as OS
// threads, before the macro returns (C++20: __VA_OPT__ for kernels without arguments).
// `kernel` is one macro argument: name a template with several arguments through a pointer.
#pragma once

#if defined(FASTNTXENT_CUDA_HOST_EMULATION)
#define FASTNTXENT_LAUNCH(kernel, grid, block, stream, ...) \
  ::cuda_emu::launch(kernel, dim3(grid), dim3(block), stream __VA_OPT__(, ) __VA_ARGS__)
#else
#define FASTNTXENT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif
