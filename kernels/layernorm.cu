// LayerNorm over the last dimension C (eps 1e-5), forward (optionally fused with the residual add)
// and backward.
//
// forward:  mean = sum(x)/C, var = sum((x-mean)^2)/C, rstd = 1/sqrt(var+eps),
//           out = (x-mean)*rstd*weight + bias.
//           fused: residual = bf16(inp1 + inp2) is stored and normalized as stored (the rounded value),
//           so the backward, which reads the stored residual, sees the same x.
// backward: xhat = (x-mean)*rstd, dnorm = dout*weight,
//           dinp += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm*xhat)),
//           dweight += sum_rows dout*xhat, dbias += sum_rows dout,
//           optionally dinp_sum += sum_rows dinp (the new dinp, as stored): dinp is the residual stream's
//           gradient, and its column sum is the bias gradient of the projection that wrote into that stream
//           (attproj after ln2's backward, fcproj after ln1's and lnf's): summed here, where the rows are in
//           registers, instead of another pass over them in bias.cu.
//
// One warp per row: lane l holds the 8-channel vectors l, l+32, ... (VPL of them; C = 768 -> 3), kept
// in registers between the statistics and the output, so each row is read from memory once. Row sums
// are xor-butterfly warp reductions. Requires C % 8 == 0 and C <= 2048 (common.cuh's row helpers); GPT-2
// widths (768 ... 1600) are multiples of 64.
// backward: a warp's rows stream through shared memory by cp.async, two buffers deep: row i+1's dout,
// inp and dinp are in flight while row i is computed (a warp's next loads no longer wait for its
// reductions and stores), at no register cost. dweight/dbias: each warp
// keeps fp32 per-channel sums of its rows in its own slice of shared memory (registers would cost 48
// more per thread at C = 768 and halve the warps in flight); at the end the block adds its 4 warps'
// sums in warp order and writes one fp32 partial row [dweight | dbias] (2C floats) to scratch;
// column_sum_add then adds the partial rows in block order into the bf16 dweight/dbias (and the fp32 dinp_sum: a
// third per-warp slice and partial block of rows, when asked for). A block owns
// LN_ROWS_PER_BLOCK consecutive rows, so the partials, and the result, depend only on N.
#include "common.cuh"

constexpr int LN_THREADS = 256;        // forward: 8 rows per block
constexpr int LN_WARPS = LN_THREADS / 32;
constexpr int LN_BWD_THREADS = 128;    // backward: 128 registers at C = 768, so small blocks
constexpr int LN_BWD_WARPS = LN_BWD_THREADS / 32;
constexpr int LN_ROWS_PER_WARP = 16;
constexpr int LN_ROWS_PER_BLOCK = LN_BWD_WARPS * LN_ROWS_PER_WARP;  // one partial row per 64 rows
constexpr float LN_EPS = 1e-5f;

template <int VPL, bool RESIDUAL>
__global__ void __launch_bounds__(LN_THREADS)
    layernorm_forward_kernel(bf16* __restrict__ residual, bf16* __restrict__ out, float* __restrict__ mean,
                             float* __restrict__ rstd, const bf16* __restrict__ inp1, const bf16* __restrict__ inp2,
                             const bf16* __restrict__ weight, const bf16* __restrict__ bias, int N, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * LN_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const int vecs = C / 8;
    const size_t off = (size_t)row * C;

    x128 x[VPL];
    load_row<VPL, RESIDUAL>(x, residual, inp1, inp2, off, lane, vecs);
    const float m = row_sum(x, lane, vecs, [](float v) { return v; }) / C;
    const float s = rsqrtf(row_sum(x, lane, vecs, [m](float v) { return (v - m) * (v - m); }) / C + LN_EPS);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        const int c = (lane + 32 * j) * 8;
        if (lane + 32 * j < vecs) {
            const x128 w = load128(weight + c), b = load128(bias + c);
            x128 o;
#pragma unroll
            for (int k = 0; k < 8; k++)
                o[k] = __float2bfloat16_rn(((float)x[j][k] - m) * s * (float)w[k] + (float)b[k]);
            store128(out + off + c, o);
        }
    }
}

template <bool RESIDUAL>
static void layernorm_forward_launch(bf16* residual, bf16* out, float* mean, float* rstd, const bf16* inp1,
                                     const bf16* inp2, const bf16* weight, const bf16* bias, int N, int C,
                                     cudaStream_t stream) {
    const int vpl = check_rows(N, C, "layernorm_forward", {residual, out, inp1, inp2, weight, bias});
    if (N == 0) return;
    dispatch_row_vectors(vpl, [&](auto v) {
        layernorm_forward_kernel<decltype(v)::value, RESIDUAL><<<ceil_div(N, LN_WARPS), LN_THREADS, 0, stream>>>(
            residual, out, mean, rstd, inp1, inp2, weight, bias, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

void layernorm_forward(bf16* out, float* mean, float* rstd, const bf16* inp, const bf16* weight,
                       const bf16* bias, int N, int C, cudaStream_t stream) {
    layernorm_forward_launch<false>(nullptr, out, mean, rstd, inp, nullptr, weight, bias, N, C, stream);
}

void fused_residual_layernorm_forward(bf16* residual, bf16* out, float* mean, float* rstd, const bf16* inp1,
                                      const bf16* inp2, const bf16* weight, const bf16* bias, int N, int C,
                                      cudaStream_t stream) {
    layernorm_forward_launch<true>(residual, out, mean, rstd, inp1, inp2, weight, bias, N, C, stream);
}

// Dynamic shared memory: each warp's fp32 sums [dweight | dbias (| dinp)], (2 + DINP_SUM) x VPL*256 floats,
// then each warp's two row buffers [dout | inp | dinp], 2 x 3 x VPL*256 bf16.
// partials: one row of 2C floats per block, [dweight sums | dbias sums] of the block's rows; with DINP_SUM,
// after the blocks' rows (at gridDim.x * 2C), one row of C floats per block, the sums of the new dinp.
template <int VPL, bool DINP_SUM>
__global__ void __launch_bounds__(LN_BWD_THREADS, VPL <= 3 ? 4 : 1)  // C <= 768: 16 warps per SM
    layernorm_backward_kernel(bf16* __restrict__ dinp, float* __restrict__ partials, const bf16* __restrict__ dout,
                              const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                              const float* __restrict__ mean, const float* __restrict__ rstd, int N, int C) {
    constexpr int W = VPL * 32 * 8;  // channels a warp covers
    constexpr int SLICES = DINP_SUM ? 3 : 2;  // per-warp fp32 sums of W channels each
    extern __shared__ float4 warp_sums[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int vecs = C / 8;
    float4* dw_sum = warp_sums + warp * (SLICES * W / 4);  // this warp's dweight sums, 2 float4 per vector
    float4* db_sum = dw_sum + W / 4;                       // and dbias sums
    float4* di_sum = db_sum + W / 4;                       // and dinp sums (DINP_SUM)
    for (int i = lane; i < SLICES * W / 4; i += 32) dw_sum[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __syncwarp();
    // this warp's row buffers: buffer b holds [dout | inp | dinp] of a row; each lane copies and reads
    // back only its own vectors, so cp.async's own wait orders them (no barrier)
    x128* rows = reinterpret_cast<x128*>(warp_sums + LN_BWD_WARPS * (SLICES * W / 4)) + warp * (2 * 3 * W / 8);
    auto stage = [&](int i) {  // starts the copies of the warp's i-th row into buffer i % 2
        const int row = blockIdx.x * LN_ROWS_PER_BLOCK + i * LN_BWD_WARPS + warp;
        if (i < LN_ROWS_PER_WARP && row < N) {
            x128* buf = rows + (i % 2) * (3 * W / 8);
            const size_t off = (size_t)row * C;
#pragma unroll
            for (int j = 0; j < VPL; j++)
                if (lane + 32 * j < vecs) {
                    const int v = lane + 32 * j;
                    cp_async_16(buf + v, dout + off + 8 * v);
                    cp_async_16(buf + W / 8 + v, inp + off + 8 * v);
                    cp_async_16(buf + 2 * W / 8 + v, dinp + off + 8 * v);
                }
        }
        cp_async_commit();  // an empty group past the last row keeps the wait below uniform
    };
    stage(0);

    for (int i = 0; i < LN_ROWS_PER_WARP; i++) {
        const int row = blockIdx.x * LN_ROWS_PER_BLOCK + i * LN_BWD_WARPS + warp;
        if (row >= N) break;
        const size_t off = (size_t)row * C;
        stage(i + 1);
        cp_async_wait<1>();  // row i has landed; row i+1 stays in flight
        const x128* buf = rows + (i % 2) * (3 * W / 8);
        // the weights only while registers allow (C <= 1024)
        x128 g[VPL], x[VPL], w[VPL], di[VPL];
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int v = lane + 32 * j;
                g[j] = buf[v];
                x[j] = buf[W / 8 + v];
                di[j] = buf[2 * W / 8 + v];
                if (VPL <= 4) w[j] = load128(weight + 8 * v);
            }
        const float m = mean[row], s = rstd[row];
        float sum_dn = 0.0f, sum_dnx = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int v = lane + 32 * j;
                if (VPL > 4) w[j] = load128(weight + 8 * v);
                float dw[8], db[8];
                *reinterpret_cast<float4*>(dw) = dw_sum[2 * v];
                *reinterpret_cast<float4*>(dw + 4) = dw_sum[2 * v + 1];
                *reinterpret_cast<float4*>(db) = db_sum[2 * v];
                *reinterpret_cast<float4*>(db + 4) = db_sum[2 * v + 1];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float xhat = ((float)x[j][k] - m) * s, d = (float)g[j][k];
                    const float dn = d * (float)w[j][k];
                    sum_dn += dn;
                    sum_dnx += dn * xhat;
                    db[k] += d;
                    dw[k] += d * xhat;
                }
                dw_sum[2 * v] = *reinterpret_cast<float4*>(dw);
                dw_sum[2 * v + 1] = *reinterpret_cast<float4*>(dw + 4);
                db_sum[2 * v] = *reinterpret_cast<float4*>(db);
                db_sum[2 * v + 1] = *reinterpret_cast<float4*>(db + 4);
            }
        const float mean_dn = warp_sum(sum_dn) / C, mean_dnx = warp_sum(sum_dnx) / C;
#pragma unroll
        for (int j = 0; j < VPL; j++)
            if (lane + 32 * j < vecs) {
                const int v = lane + 32 * j;
                if (VPL > 4) w[j] = load128(weight + v * 8);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const float xhat = ((float)x[j][k] - m) * s;
                    const float dn = (float)g[j][k] * (float)w[j][k];
                    di[j][k] = __float2bfloat16_rn((float)di[j][k] + s * (dn - mean_dn - xhat * mean_dnx));
                }
                store128(dinp + off + v * 8, di[j]);
                if (DINP_SUM) {
                    float4 lo = di_sum[2 * v], hi = di_sum[2 * v + 1];
                    lo.x += (float)di[j][0], lo.y += (float)di[j][1], lo.z += (float)di[j][2], lo.w += (float)di[j][3];
                    hi.x += (float)di[j][4], hi.y += (float)di[j][5], hi.z += (float)di[j][6], hi.w += (float)di[j][7];
                    di_sum[2 * v] = lo;
                    di_sum[2 * v + 1] = hi;
                }
            }
    }

    // the block's partial rows: the warps' sums added in warp order
    __syncthreads();
    const float* sums = reinterpret_cast<const float*>(warp_sums);
    float* dst = partials + (size_t)blockIdx.x * 2 * C;
    float* dst_dinp = partials + (size_t)gridDim.x * 2 * C + (size_t)blockIdx.x * C;
    for (int c = threadIdx.x; c < SLICES * C; c += LN_BWD_THREADS) {
        const int slice = c / C, idx = slice * W + c % C;
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < LN_BWD_WARPS; w++) t += sums[w * SLICES * W + idx];
        if (slice < 2)
            dst[c] = t;
        else
            dst_dinp[c - 2 * C] = t;
    }
}

size_t layernorm_backward_scratch_floats(int N, int C) {
    return (size_t)ceil_div(N, LN_ROWS_PER_BLOCK) * 3 * C;  // [dweight | dbias] rows, then dinp_sum rows
}

template <bool DINP_SUM>
static void layernorm_backward_launch(bf16* dinp, const bf16* dout, const bf16* inp, const bf16* weight,
                                      const float* mean, const float* rstd, float* scratch, int vpl, int blocks,
                                      int N, int C, cudaStream_t stream) {
    dispatch_row_vectors(vpl, [&](auto v) {
        constexpr int VPL = decltype(v)::value;
        // sums 8 KB * VPL (12 KB with DINP_SUM), row buffers 12 KB * VPL (60 / 72 KB at C = 768: 3 blocks per
        // SM on sm_90)
        constexpr int smem =
            LN_BWD_WARPS * VPL * 32 * 8 * ((DINP_SUM ? 3 : 2) * sizeof(float) + 2 * 3 * sizeof(bf16));
        auto kernel = layernorm_backward_kernel<VPL, DINP_SUM>;
        if (smem > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        kernel<<<blocks, LN_BWD_THREADS, smem, stream>>>(dinp, scratch, dout, inp, weight, mean, rstd, N, C);
        CUDA_CHECK_LAUNCH();
    });
}

void layernorm_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                        const bf16* weight, const float* mean, const float* rstd, float* scratch,
                        size_t scratch_floats, int N, int C, cudaStream_t stream, float* dinp_sum) {
    const int vpl = check_rows(N, C, "layernorm_backward", {dinp, dout, inp, weight});
    if (N == 0) return;
    require(scratch_floats >= layernorm_backward_scratch_floats(N, C), "layernorm_backward: scratch too small");
    const int blocks = ceil_div(N, LN_ROWS_PER_BLOCK);
    if (dinp_sum)
        layernorm_backward_launch<true>(dinp, dout, inp, weight, mean, rstd, scratch, vpl, blocks, N, C, stream);
    else
        layernorm_backward_launch<false>(dinp, dout, inp, weight, mean, rstd, scratch, vpl, blocks, N, C, stream);
    column_sum_add(dweight, dbias, C, scratch, blocks, 2 * C, stream);
    if (dinp_sum) column_sum_add(dinp_sum, dinp_sum, C, scratch + (size_t)blocks * 2 * C, blocks, C, stream);
}
