// The CPU model of Metal that kernel sources compile against (see ../README in mlx_dsv4/kernels).
// The generated translation unit puts the kernel (MLX's generated text) inside namespace metal, so
// unqualified names find these definitions first, like `using namespace metal;` does on a Mac.
#pragma once
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // ucontext (the portable fiber fallback)
#endif
#include "msim_types.h"
#include "msim_math.h"
#include "msim_runtime.h"
#include "msim_simd.h"

// Address spaces carry no meaning on the CPU; threadgroup *declarations* are rewritten to shared
// per-threadgroup storage before compiling (sim/source.py), so only qualifiers remain here.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
