// sparsegrid CUDA kernels: definitions shared by every source (prepended by _compile.py).
//
// House rules for the kernels of this backend:
//  * every kernel is a grid-stride loop over independent work items (no shared memory,
//    no __syncthreads, no atomics): each output element is written by exactly one thread,
//    so results are the same bits for any launch configuration, run after run;
//  * reductions run in a fixed order inside one thread (segments, pooling windows,
//    scatter targets within one kernel offset are distinct);
//  * indices are int32 for rows, int64 (long long) for keys, counts and flat positions;
//  * float16 data is stored as unsigned short (sg_half) and converted with cvt
//    instructions: no CUDA headers are needed, so NVRTC compiles these sources as they are.

#define SG_LOOP(i, n)                                                                    \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

typedef unsigned short sg_half;

#ifndef SG_HOST_EMULATION
__device__ __forceinline__ float sg_half_to_float(sg_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ sg_half sg_float_to_half(float f) {
    sg_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// Load a stored value into the accumulation type A, and store an A back as T.
template <typename A, typename T> __device__ __forceinline__ A sg_load(T v) { return (A)v; }
template <> __device__ __forceinline__ float sg_load<float, sg_half>(sg_half v) {
    return sg_half_to_float(v);
}
template <> __device__ __forceinline__ double sg_load<double, sg_half>(sg_half v) {
    return (double)sg_half_to_float(v);
}
template <typename T, typename A> __device__ __forceinline__ T sg_store(A v) { return (T)v; }
template <> __device__ __forceinline__ sg_half sg_store<sg_half, float>(float v) {
    return sg_float_to_half(v);
}
template <> __device__ __forceinline__ sg_half sg_store<sg_half, double>(double v) {
    return sg_float_to_half((float)v);
}

template <typename A> __device__ __forceinline__ bool sg_isnan(A v) { return v != v; }
