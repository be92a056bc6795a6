// SBNet block gather / scatter over NHWC images. geom (int64, 6): block size (BH, BW),
// offset (OH, OW), stride (SH, SW): block (n, bh, bw) covers rows OH + bh*SH + [0, BH) and
// columns OW + bw*SW + [0, BW) of image n; out-of-image pixels read as zero.

// out[b, i, j, c] = x[n_b, OH + bh_b*SH + i, OW + bw_b*SW + j, c], or 0 outside the image.
template <typename T>
__global__ void block_gather(const T* __restrict__ x, const int* __restrict__ indices,
                             const long long* __restrict__ geom, T* __restrict__ out,
                             long long n_blocks, long long height, long long width,
                             long long channels) {
    const long long bh_size = geom[0], bw_size = geom[1];
    SG_LOOP(t, n_blocks * bh_size * bw_size * channels) {
        long long c = t % channels;
        long long rest = t / channels;
        long long j = rest % bw_size;
        rest /= bw_size;
        long long i = rest % bh_size;
        long long b = rest / bh_size;
        long long r = geom[2] + (long long)indices[3 * b + 1] * geom[4] + i;
        long long col = geom[3] + (long long)indices[3 * b + 2] * geom[5] + j;
        bool inside = r >= 0 && r < height && col >= 0 && col < width;
        out[t] = inside ? x[(((long long)indices[3 * b] * height + r) * width + col) * channels + c]
                        : (T)0;
    }
}

__device__ __forceinline__ long long sg_floor_div(long long a, long long b) {
    long long q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// One thread per base element: y = base, then the blocks covering the pixel (table: the
// list position of block (n, bh, bw), -1 absent; (N, TH, TW)) in phase order
// (bh mod MH, bw mod MW), added (add = 1) or the last one in list order written (add = 0).
// geom2 (int64, 4): TH, TW, MH, MW.
// base and y may be one buffer (in place: each thread reads its element, then writes it),
// so neither is __restrict__. Sums run in the accumulation type (float for float16).
template <typename T, typename A>
__global__ void block_scatter(const T* __restrict__ blocks, const T* base,
                              const int* __restrict__ table, const long long* __restrict__ geom,
                              const long long* __restrict__ geom2, T* y,
                              long long n_images, long long height, long long width,
                              long long channels, int add) {
    const long long bh_size = geom[0], bw_size = geom[1];
    const long long th = geom2[0], tw = geom2[1], mh = geom2[2], mw = geom2[3];
    SG_LOOP(t, n_images * height * width * channels) {
        long long c = t % channels;
        long long rest = t / channels;
        long long col = rest % width;
        rest /= width;
        long long r = rest % height;
        long long n = rest / height;
        // blocks whose rows cover r: lo_h <= bh <= hi_h (at most MH of them)
        long long hi_h = sg_floor_div(r - geom[2], geom[4]);
        long long lo_h = sg_floor_div(r - geom[2] - bh_size, geom[4]) + 1;
        long long hi_w = sg_floor_div(col - geom[3], geom[5]);
        long long lo_w = sg_floor_div(col - geom[3] - bw_size, geom[5]) + 1;
        A acc = sg_load<A>(base[t]);
        long long winner = -1, wi = 0, wj = 0;
        for (long long ph = 0; ph < mh; ++ph) {
            long long bh = lo_h + ((ph - lo_h % mh) % mh + mh) % mh;
            if (bh > hi_h || bh < 0 || bh >= th) continue;
            for (long long pw = 0; pw < mw; ++pw) {
                long long bw = lo_w + ((pw - lo_w % mw) % mw + mw) % mw;
                if (bw > hi_w || bw < 0 || bw >= tw) continue;
                long long pos = table[(n * th + bh) * tw + bw];
                if (pos < 0) continue;
                long long i = r - (geom[2] + bh * geom[4]);
                long long j = col - (geom[3] + bw * geom[5]);
                if (add) {
                    acc += sg_load<A>(blocks[((pos * bh_size + i) * bw_size + j) * channels + c]);
                } else if (pos > winner) {
                    winner = pos; wi = i; wj = j;
                }
            }
        }
        if (!add && winner >= 0) {
            y[t] = blocks[((winner * bh_size + wi) * bw_size + wj) * channels + c];
        } else {
            y[t] = sg_store<T>(acc);
        }
    }
}
