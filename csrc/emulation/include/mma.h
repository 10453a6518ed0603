// Emulated build only: <mma.h> resolves here (this directory is first on the include path of
// the host build only, see tests/cuda_emulation.py) and forwards to the host emulation of CUDA.
#pragma once
#include "../cuda_host_emulation.h"
