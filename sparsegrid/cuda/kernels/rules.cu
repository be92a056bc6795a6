// Pair enumeration for strided / windowed rulebooks (convolution, pooling, randomized
// strides): each input row meets at most prod(width[d]) output windows, one candidate per
// combination of per-axis slots; a thread per (row, slot combination).
//
// Per axis d the covered cells of the grid have tables (built on the host from the window
// starts, one entry per (cell, slot), sorted by cell then by window):
//   run_start[cell_base[d] + x]  first entry of cell x,   run_length[...]  its slot count,
//   taps[entry_base[d] + e], outs[entry_base[d] + e]      the tap and the window of entry e.
// params (int64, 5 * D + 1): cell_base[D], entry_base[D], width[D], tap_stride[D],
//   out_stride[D + 1] (batch stride first).
// A candidate that misses a window on some axis gets offset -1.
extern "C" __global__ void window_candidates(
        const int* __restrict__ indices, long long n, int dims, long long per_row,
        const long long* __restrict__ run_start, const int* __restrict__ run_length,
        const int* __restrict__ taps, const int* __restrict__ outs,
        const long long* __restrict__ params,
        int* __restrict__ offset, long long* __restrict__ key, long long* __restrict__ slot) {
    const long long* cell_base = params;
    const long long* entry_base = params + dims;
    const long long* width = params + 2 * dims;
    const long long* tap_stride = params + 3 * dims;
    const long long* out_stride = params + 4 * dims;
    SG_LOOP(t, n * per_row) {
        long long row = t / per_row;
        long long rest = t - row * per_row;
        const int* site = indices + row * (dims + 1);
        long long k = 0, out_key = (long long)site[0] * out_stride[0], code = 0;
        long long place = 1;
        bool valid = true;
        for (int d = dims - 1; d >= 0; --d) {          // last axis fastest
            long long j = rest % width[d];
            rest /= width[d];
            long long cell = cell_base[d] + site[d + 1];
            if (j >= run_length[cell]) { valid = false; break; }
            long long entry = entry_base[d] + run_start[cell] + j;
            k += (long long)taps[entry] * tap_stride[d];
            out_key += (long long)outs[entry] * out_stride[d + 1];
            code += j * place;
            place *= width[d];
        }
        offset[t] = valid ? (int)k : -1;
        key[t] = valid ? out_key : 0;
        slot[t] = valid ? code : 0;
    }
}
