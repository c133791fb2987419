// Sampling the next token of B sequences from their logits on the device, so that only B tokens and B
// log-probabilities reach the host (gpt2cu/rl/rollout.py). For row b of logits x (the first V of Vp
// columns) and the host's uniform draw u = uniforms[b] in [0, 1):
//   temperature 0: token = argmax_j x_j (the first of equal maxima), logprob = 0;
//   else:          z_j = x_j / temperature; with 0 < top_k < V only the j with x_j >= the top_k-th
//                  largest x are kept (ties at that value all kept, as a threshold from np.partition);
//                  w_j = exp(z_j - max z) (0 where dropped), total = sum_j w_j;
//                  token = the first j whose cumulative mass w_0 + ... + w_j exceeds u * total,
//                  logprob = z_token - max z - log(total).
// The numpy reference is numpy_ops.sample_logits (float64 and a sequential cumulative sum): the prefix
// sums here are fp32 and blockwise, so a draw within rounding of a boundary between two tokens (~1e-6 of
// the mass) may take the neighbour.
//
// One block per row; thread t owns a contiguous chunk of the vocabulary, so the prefix sum over tokens is
// the sequential sum within each chunk after a block scan of the chunk sums. The top_k-th largest value
// is found by a two-pass radix select on the bf16 bits (mapped to unsigned keys ordered as the values):
// a histogram of the high byte picks the bin holding it, a histogram of the low bytes within that bin
// the exact value.
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;

// bf16 bits -> a 16-bit key ordered as the values (-0 taken as +0, so equal values have equal keys)
__device__ __forceinline__ unsigned order_key(bf16 x) {
    unsigned u = __bfloat16_as_ushort(x);
    if (u == 0x8000u) u = 0;
    return (u & 0x8000u) ? (~u & 0xFFFFu) : (u | 0x8000u);
}

// in the top-k bin of hist: the bin where the count of keys from the top reaches k (thread 0 scans;
// every thread gets the bin and the rank left within it)
__device__ void find_bin(const int* hist, int& k, int& bin) {
    __shared__ int found_bin, found_k;
    if (threadIdx.x == 0) {
        int b = 255;
        while (b > 0 && hist[b] < k) k -= hist[b--];
        found_bin = b;
        found_k = k;
    }
    __syncthreads();
    bin = found_bin;
    k = found_k;
}

// inclusive prefix sum over the block in thread order (blockDim.x a multiple of 32)
__device__ float block_inclusive_scan(float v) {
    __shared__ float warp_totals[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float up = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += up;
    }
    if (lane == 31) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < blockDim.x / 32 ? warp_totals[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float up = __shfl_up_sync(FULL_MASK, t, o);
            if (lane >= o) t += up;
        }
        warp_totals[lane] = t;
    }
    __syncthreads();
    return warp > 0 ? v + warp_totals[warp - 1] : v;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_logits_kernel(int* tokens, float* logprobs, const bf16* __restrict__ logits,
                         const float* __restrict__ uniforms, int V, int Vp, float temperature, int top_k) {
    __shared__ int hist[256];
    __shared__ float inclusive[SAMPLE_THREADS];
    __shared__ float best_value[32];
    __shared__ int best_index[32];
    __shared__ int chosen, chosen_chunk;
    const bf16* x = logits + (size_t)blockIdx.x * Vp;
    const int per = ceil_div(V, (int)blockDim.x);
    const int begin = min(V, (int)threadIdx.x * per), end = min(V, begin + per);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    // the max (and, greedy, its first index): chunks are in token order, so ties go to the lower thread
    float mx = -INFINITY;
    int arg = V;
    for (int j = begin; j < end; j++) {
        const float v = (float)x[j];
        if (v > mx || arg == V) mx = v, arg = j;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_down_sync(FULL_MASK, mx, o);
        const int i = __shfl_down_sync(FULL_MASK, arg, o);
        if (v > mx || (v == mx && i < arg)) mx = v, arg = i;
    }
    if (lane == 0) best_value[warp] = mx, best_index[warp] = arg;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; w++)
            if (best_value[w] > mx || (best_value[w] == mx && best_index[w] < arg))
                mx = best_value[w], arg = best_index[w];
        best_value[0] = mx, best_index[0] = min(arg, V - 1);
    }
    __syncthreads();
    mx = best_value[0];
    if (temperature == 0.0f) {
        if (threadIdx.x == 0) tokens[blockIdx.x] = best_index[0], logprobs[blockIdx.x] = 0.0f;
        return;
    }

    // the top_k-th largest key: tokens with a smaller key are dropped
    unsigned threshold = 0;
    if (top_k > 0 && top_k < V) {
        int k = top_k, high, low;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int j = begin; j < end; j++) atomicAdd(&hist[order_key(x[j]) >> 8], 1);
        __syncthreads();
        find_bin(hist, k, high);
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int j = begin; j < end; j++) {
            const unsigned key = order_key(x[j]);
            if ((int)(key >> 8) == high) atomicAdd(&hist[key & 0xFF], 1);
        }
        __syncthreads();
        find_bin(hist, k, low);
        threshold = (unsigned)(high << 8 | low);
    }

    const float zmax = mx / temperature;
    auto weight = [&](int j) {
        return order_key(x[j]) >= threshold ? expf((float)x[j] / temperature - zmax) : 0.0f;
    };
    float chunk = 0.0f;
    for (int j = begin; j < end; j++) chunk += weight(j);
    const float incl = block_inclusive_scan(chunk);
    inclusive[threadIdx.x] = incl;
    if (threadIdx.x == 0) chosen = -1, chosen_chunk = -1;
    __syncthreads();
    const float total = inclusive[blockDim.x - 1];
    // below total (u * total may round up to total). The chunk drawn: the last chunk of positive weight that
    // starts at or before the target. The scan's entries are rounded in different association orders, so
    // consecutive ones may step back by an ulp; "the chunk whose [exclusive, inclusive) holds the target" could
    // then be none, or one of zero weight, where this choice always exists (chunk 0's exclusive is 0) and is
    // that chunk whenever the entries do not decrease.
    const float target = fminf(uniforms[blockIdx.x] * total, nextafterf(total, 0.0f));
    const float excl = threadIdx.x > 0 ? inclusive[threadIdx.x - 1] : 0.0f;
    if (chunk > 0.0f && excl <= target) atomicMax(&chosen_chunk, (int)threadIdx.x);
    __syncthreads();
    if ((int)threadIdx.x == chosen_chunk) {
        // the sum within the chunk restarts from 0, as `chunk` was summed; past its end (rounding of
        // target - excl) the chunk's last token of positive weight
        const float local = target - excl;
        float run = 0.0f;
        int pick = -1;
        for (int j = begin; j < end; j++) {
            const float w = weight(j);
            if (w > 0.0f) pick = j;
            run += w;
            if (w > 0.0f && run > local) break;
        }
        chosen = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int t = chosen >= 0 ? chosen : best_index[0];  // none only for a row of NaN weights (all -inf)
        tokens[blockIdx.x] = t;
        logprobs[blockIdx.x] = ((float)x[t] / temperature - zmax) - logf(total);
    }
}

void sample_logits(int* tokens, float* logprobs, const bf16* logits, const float* uniforms, int B, int V, int Vp,
                   float temperature, int top_k, cudaStream_t stream) {
    require(B >= 0 && V >= 1 && Vp >= V, "sample_logits: bad sizes");
    require(temperature >= 0.0f, "sample_logits: negative temperature");
    require(top_k >= 0, "sample_logits: negative top_k");
    if (B == 0) return;
    sample_logits_kernel<<<B, SAMPLE_THREADS, 0, stream>>>(tokens, logprobs, logits, uniforms, V, Vp, temperature,
                                                           top_k);
    CUDA_CHECK_LAUNCH();
}
