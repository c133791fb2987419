// Token + position embedding, forward and deterministic backward.
//
// forward: out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]; one thread per 8-channel vector.
//
// backward, dwpe[t,:] += sum_b dout[b,t,:]: one thread per (t, 8-channel vector) adds the B rows in
// order b = 0..B-1, 8 rows in flight.
//
// backward, dwte[v,:] += sum of the dout rows of the positions holding token v. The caller groups the
// positions into buckets (runs of one token in a stable sort), so every bucket owns one dwte row and
// no two blocks ever write the same element: no atomics, and each bucket's sum has a fixed order.
// Bucket sizes are very skewed in real text (a few whitespace/punctuation tokens take several % of
// the batch, most tokens appear once), so two kernels split the buckets by size, both with grids
// fixed at launch (num_buckets is only known on the device) that stride over the buckets:
//  - small (<= 32 rows): one warp per bucket; lane r holds row r's position, the warp adds the rows
//    in order. The work is a chain of dependent loads (bucket start -> positions -> token -> rows), so
//    each lane loads its columns of a row (up to WTE_SMALL_VPL 16-byte vectors) at once, and the next
//    bucket's start and positions load while this bucket's rows do.
//    The same launch adds dwpe: its first blocks take the dwpe columns (bandwidth-bound: every dout row
//    once), the rest the small buckets (latency-bound), so the two overlap; the grid is one wave.
//  - large (> 32 rows): the bucket is cut into channel slices of 64 (8 threads x 8 channels, grid.y)
//    so its rows are read by many SMs at once; in a slice, 64 row groups of 8 threads each add rows
//    g, g+64, ... in order, then the 64 group sums are added in a fixed two-level order. Block x looks
//    at buckets x, x+gridDim.x, ... and lists the large ones with their start, size and token (an
//    ordered compaction in shared memory), so each bucket then costs two dependent loads (positions,
//    rows) plus the reduction.
// The large buckets have a kernel of their own: it needs twice the registers and shared memory.
// C not a multiple of 8 (or unaligned pointers) runs the same code with 1-channel vectors.
#include <algorithm>
#include "common.cuh"

constexpr int ENC_THREADS = 256;           // forward
constexpr int WTE_SMALL_THREADS = 256;
constexpr int WTE_SMALL_MAX = 32;           // a bucket of up to this many rows is one warp's
constexpr int WTE_SMALL_VPL = 3;            // vectors per lane loaded at once (C = 768: the whole row)
constexpr int WPE_SHARE = 4;                // 1 in WPE_SHARE blocks of the small-bucket launch adds dwpe
constexpr int WTE_THREADS = 512;            // large buckets
constexpr int WTE_WARPS = WTE_THREADS / 32;
constexpr int WTE_LANES = 8;                // threads across one row of a large bucket's slice
constexpr int WTE_GROUPS = WTE_THREADS / WTE_LANES;
constexpr int WTE_UNROLL = 8;               // rows in flight per thread in a large bucket

template <int V>
__global__ void __launch_bounds__(ENC_THREADS)
    encoder_forward_kernel(bf16* __restrict__ out, const int* __restrict__ tokens, const bf16* __restrict__ wte,
                           const bf16* __restrict__ wpe, int T, int C, size_t total) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int vecs = C / V;
    const size_t row = idx / vecs;
    const int c = (int)(idx % vecs) * V;
    const int t = (int)(row % T);
    const Vec<bf16, V> a = load_vec<V>(wte + (size_t)tokens[row] * C + c);
    const Vec<bf16, V> b = load_vec<V>(wpe + (size_t)t * C + c);
    Vec<bf16, V> o;
#pragma unroll
    for (int k = 0; k < V; k++) o[k] = __float2bfloat16_rn((float)a[k] + (float)b[k]);
    store_vec<V>(out + row * C + c, o);
}

// dwpe columns (t, vector) idx = first, first + stride, ...: the B rows of each added in order.
template <int V>
__device__ __forceinline__ void wpe_backward(bf16* __restrict__ dwpe, const bf16* __restrict__ dout, int B, int T,
                                             int C, size_t first, size_t stride) {
    const int vecs = C / V;
    for (size_t idx = first; idx < (size_t)T * vecs; idx += stride) {
        const int t = (int)(idx / vecs), c = (int)(idx % vecs) * V;
        float acc[V] = {};
#pragma unroll 8
        for (int b = 0; b < B; b++) {
            const Vec<bf16, V> x = load_vec<V>(dout + ((size_t)b * T + t) * C + c);
#pragma unroll
            for (int k = 0; k < V; k++) acc[k] += (float)x[k];
        }
        bf16* dst = dwpe + (size_t)t * C + c;
        Vec<bf16, V> d = load_vec<V>(dst);
#pragma unroll
        for (int k = 0; k < V; k++) d[k] = __float2bfloat16_rn((float)d[k] + acc[k]);
        store_vec<V>(dst, d);
    }
}

// One warp adds the `size` (<= 32) rows of a bucket into dwte[token]; lane r holds row r's position
// (my_pos). Columns in passes of WTE_SMALL_VPL vectors per lane, every load of a row's pass at once.
template <int V>
__device__ __forceinline__ void wte_small_bucket(bf16* __restrict__ dwte, const bf16* __restrict__ dout,
                                                 const int* __restrict__ tokens, int my_pos, int size, int C) {
    const int lane = threadIdx.x % 32;
    const int token = tokens[__shfl_sync(FULL_MASK, my_pos, 0)];
    const int vecs = C / V;
    for (int base = 0; base < vecs; base += 32 * WTE_SMALL_VPL) {
        bool active[WTE_SMALL_VPL];
        int col[WTE_SMALL_VPL];
        Vec<bf16, V> d[WTE_SMALL_VPL];
        float acc[WTE_SMALL_VPL][V] = {};
#pragma unroll
        for (int j = 0; j < WTE_SMALL_VPL; j++) {
            active[j] = base + 32 * j + lane < vecs;
            col[j] = active[j] ? (base + 32 * j + lane) * V : 0;  // inactive lanes load (and drop) column 0
            d[j] = load_vec<V>(dwte + (size_t)token * C + col[j]);
        }
#pragma unroll 1  // rolled: 77 registers, no spills, 3 blocks per SM
        for (int r = 0; r < size; r++) {  // warp-uniform: every lane takes part in the shuffle
            const bf16* src = dout + (size_t)__shfl_sync(FULL_MASK, my_pos, r) * C;
            Vec<bf16, V> x[WTE_SMALL_VPL];
#pragma unroll
            for (int j = 0; j < WTE_SMALL_VPL; j++) x[j] = load_vec<V>(src + col[j]);
#pragma unroll
            for (int j = 0; j < WTE_SMALL_VPL; j++)
#pragma unroll
                for (int k = 0; k < V; k++) acc[j][k] += (float)x[j][k];
        }
#pragma unroll
        for (int j = 0; j < WTE_SMALL_VPL; j++)
            if (active[j]) {
#pragma unroll
                for (int k = 0; k < V; k++) d[j][k] = __float2bfloat16_rn((float)d[j][k] + acc[j][k]);
                store_vec<V>(dwte + (size_t)token * C + col[j], d[j]);
            }
    }
}

// Blocks [0, wpe_blocks) add dwpe; the others stride over the buckets, taking those of <= WTE_SMALL_MAX rows.
template <int V>
__global__ void __launch_bounds__(WTE_SMALL_THREADS, 3)
    wte_small_kernel(bf16* __restrict__ dwte, bf16* __restrict__ dwpe, const bf16* __restrict__ dout,
                     const int* __restrict__ tokens, const int* __restrict__ sorted_positions,
                     const int* __restrict__ bucket_starts, const int* __restrict__ num_buckets, int B, int T, int C,
                     int wpe_blocks) {
    if ((int)blockIdx.x < wpe_blocks) {
        wpe_backward<V>(dwpe, dout, B, T, C, blockIdx.x * (size_t)WTE_SMALL_THREADS + threadIdx.x,
                        (size_t)wpe_blocks * WTE_SMALL_THREADS);
        return;
    }
    constexpr int WARPS = WTE_SMALL_THREADS / 32;
    const int lane = threadIdx.x % 32;
    const int nb = *num_buckets, warps = (gridDim.x - wpe_blocks) * WARPS;
    // bucket b's start, size and lane's position, loaded one bucket ahead
    auto fetch = [&](int b, int& start, int& size, int& pos) {
        start = b < nb ? bucket_starts[b] : 0;
        size = b < nb ? bucket_starts[b + 1] - start : 0;
        pos = lane < size && size <= WTE_SMALL_MAX ? sorted_positions[start + lane] : 0;
    };
    int b = (blockIdx.x - wpe_blocks) * WARPS + threadIdx.x / 32, start, size, pos;
    fetch(b, start, size, pos);
    for (; b < nb; b += warps) {
        int next_start, next_size, next_pos;
        fetch(b + warps, next_start, next_size, next_pos);
        if (size <= WTE_SMALL_MAX) wte_small_bucket<V>(dwte, dout, tokens, pos, size, C);
        start = next_start;
        size = next_size;
        pos = next_pos;
    }
}

// Block (x, slice) adds channel slice `slice` (WTE_LANES * V channels) of every bucket b = x,
// x + gridDim.x, ... that has more than WTE_SMALL_MAX rows.
template <int V>
__global__ void __launch_bounds__(WTE_THREADS, 1)
    wte_large_kernel(bf16* __restrict__ dwte, const bf16* __restrict__ dout, const int* __restrict__ tokens,
                     const int* __restrict__ sorted_positions, const int* __restrict__ bucket_starts,
                     const int* __restrict__ num_buckets, int C) {
    constexpr int SLICE = WTE_LANES * V;
    constexpr int PARTS = WTE_THREADS / SLICE;  // the group sums are added in PARTS runs, then the runs
    constexpr int PER_PART = WTE_GROUPS / PARTS;
    __shared__ float group_sums[WTE_GROUPS * SLICE];
    __shared__ float part_sums[PARTS * SLICE];
    __shared__ int list_start[WTE_THREADS], list_size[WTE_THREADS], list_token[WTE_THREADS];
    __shared__ int warp_counts[WTE_WARPS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int group = tid / WTE_LANES;
    const int nb = *num_buckets, slice = blockIdx.y, stride = gridDim.x * WTE_THREADS;
    const int c = slice * SLICE + (tid % WTE_LANES) * V;
    const bool active = c < C;
    const bf16* column = dout + c;  // row offsets below are 32-bit: B*T*C < 2^31
    for (int round = blockIdx.x; round < nb; round += stride) {
        // ordered compaction of the large buckets among this round's candidates b = round + gridDim.x * tid,
        // with their start, size and token
        const int b = round + gridDim.x * tid;
        int b_start = 0, b_size = 0;
        if (b < nb) {
            b_start = bucket_starts[b];
            b_size = bucket_starts[b + 1] - b_start;
        }
        const bool large = b_size > WTE_SMALL_MAX;
        const unsigned ballot = __ballot_sync(FULL_MASK, large);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int offset = 0, total = 0;
#pragma unroll
        for (int w = 0; w < WTE_WARPS; w++) {
            offset += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        if (large) {
            const int e = offset + __popc(ballot & ((1u << lane) - 1));
            list_start[e] = b_start;
            list_size[e] = b_size;
            list_token[e] = tokens[sorted_positions[b_start]];
        }
        __syncthreads();

        for (int e = 0; e < total; e++) {
            const int start = list_start[e], size = list_size[e];
            const int ch = slice * SLICE + tid;  // threads tid < SLICE finish channel ch
            bf16* dst = dwte + (size_t)list_token[e] * C + ch;
            const bf16 old = tid < SLICE && ch < C ? *dst : bf16();  // loaded with the rows
            float acc[V] = {};
            if (active) {
                // rows r + u * WTE_GROUPS; the next step's positions load while this step's rows do
                constexpr int STEP = WTE_GROUPS * WTE_UNROLL;
                int pos[WTE_UNROLL];
#pragma unroll
                for (int u = 0; u < WTE_UNROLL; u++) {
                    const int rr = group + u * WTE_GROUPS;
                    pos[u] = rr < size ? sorted_positions[start + rr] : 0;
                }
                for (int r = group; r < size; r += STEP) {
                    Vec<bf16, V> x[WTE_UNROLL];
#pragma unroll
                    for (int u = 0; u < WTE_UNROLL; u++)
                        if (r + u * WTE_GROUPS < size) x[u] = load_vec<V>(column + pos[u] * C);
#pragma unroll
                    for (int u = 0; u < WTE_UNROLL; u++) {
                        const int rr = r + STEP + u * WTE_GROUPS;
                        pos[u] = rr < size ? sorted_positions[start + rr] : 0;
                    }
#pragma unroll
                    for (int u = 0; u < WTE_UNROLL; u++)
                        if (r + u * WTE_GROUPS < size) {
#pragma unroll
                            for (int j = 0; j < V; j++) acc[j] += (float)x[u][j];
                        }
                }
            }
#pragma unroll
            for (int j = 0; j < V; j++) group_sums[group * SLICE + (tid % WTE_LANES) * V + j] = acc[j];
            __syncthreads();
            {  // thread (part, k): groups part*PER_PART ... in order (groups without rows hold 0)
                const int part = tid / SLICE, k = tid % SLICE;
                float t = 0.0f;
#pragma unroll 8
                for (int g = part * PER_PART; g < (part + 1) * PER_PART; g++) t += group_sums[g * SLICE + k];
                part_sums[part * SLICE + k] = t;
            }
            __syncthreads();
            if (tid < SLICE && ch < C) {
                float t = 0.0f;
#pragma unroll
                for (int part = 0; part < PARTS; part++) t += part_sums[part * SLICE + tid];
                *dst = __float2bfloat16_rn((float)old + t);
            }
            __syncthreads();  // group_sums, part_sums and the lists are rewritten next
        }
    }
}

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int V>
static void encoder_forward_launch(bf16* out, const int* tokens, const bf16* wte, const bf16* wpe, int B, int T,
                                   int C, cudaStream_t stream) {
    const size_t total = (size_t)B * T * (C / V);
    encoder_forward_kernel<V><<<(unsigned)ceil_div(total, (size_t)ENC_THREADS), ENC_THREADS, 0, stream>>>(
        out, tokens, wte, wpe, T, C, total);
    CUDA_CHECK_LAUNCH();
}

void encoder_forward(bf16* out, const int* tokens, const bf16* wte, const bf16* wpe, int B, int T, int C,
                     cudaStream_t stream) {
    require(B >= 0 && T >= 0 && C >= 0, "encoder_forward: negative size");
    if ((size_t)B * T * C == 0) return;
    if (C % 8 == 0 && aligned16(out) && aligned16(wte) && aligned16(wpe))
        encoder_forward_launch<8>(out, tokens, wte, wpe, B, T, C, stream);
    else
        encoder_forward_launch<1>(out, tokens, wte, wpe, B, T, C, stream);
}

template <int V>
static void encoder_backward_launch(bf16* dwte, bf16* dwpe, const bf16* dout, const int* tokens,
                                    const int* sorted_positions, const int* bucket_starts, const int* num_buckets,
                                    int B, int T, int C, cudaStream_t stream) {
    // both kernels stride over the buckets with one full wave of resident blocks
    const int BT = B * T, sms = device_sm_count();
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wte_small_kernel<V>, WTE_SMALL_THREADS, 0));
    const int wave = sms * std::max(per_sm, 1);
    const int wpe_blocks = std::min(std::max(wave / WPE_SHARE, 1), ceil_div(T * (C / V), WTE_SMALL_THREADS));
    const int small_blocks = std::max(std::min(wave - wpe_blocks, ceil_div(BT, WTE_SMALL_THREADS / 32)), 1);
    wte_small_kernel<V><<<wpe_blocks + small_blocks, WTE_SMALL_THREADS, 0, stream>>>(
        dwte, dwpe, dout, tokens, sorted_positions, bucket_starts, num_buckets, B, T, C, wpe_blocks);
    CUDA_CHECK_LAUNCH();

    const int max_large = BT / (WTE_SMALL_MAX + 1);  // buckets of more than WTE_SMALL_MAX rows
    if (max_large == 0) return;
    const int slices = ceil_div(C, WTE_LANES * V);
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wte_large_kernel<V>, WTE_THREADS, 0));
    const int large_blocks = std::min(std::max(sms * std::max(per_sm, 1) / slices, 1), max_large);
    wte_large_kernel<V><<<dim3(large_blocks, slices), WTE_THREADS, 0, stream>>>(dwte, dout, tokens, sorted_positions,
                                                                                bucket_starts, num_buckets, C);
    CUDA_CHECK_LAUNCH();
}

void encoder_backward(bf16* dwte, bf16* dwpe, const bf16* dout, const int* tokens, const int* sorted_positions,
                      const int* bucket_starts, const int* num_buckets, int B, int T, int C, cudaStream_t stream) {
    require(B >= 0 && T >= 0 && C >= 0, "encoder_backward: negative size");
    require((long long)B * T * C < (1ll << 31), "encoder_backward: B*T*C must be below 2^31");
    if ((size_t)B * T * C == 0) return;
    if (C % 8 == 0 && aligned16(dwte) && aligned16(dwpe) && aligned16(dout))
        encoder_backward_launch<8>(dwte, dwpe, dout, tokens, sorted_positions, bucket_starts, num_buckets, B, T,
                                   C, stream);
    else
        encoder_backward_launch<1>(dwte, dwpe, dout, tokens, sorted_positions, bucket_starts, num_buckets, B, T,
                                   C, stream);
}
