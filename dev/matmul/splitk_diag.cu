// splitk_diag.cu: cuBLASLt's accumulating GEMM (beta = 1, the weight gradient's layout: A op N, B op T, bf16 in and
// out, fp32 compute) at a few shapes, each heuristic candidate's configuration (algorithm id, tile, split-K count,
// reduction scheme, ...) and its worst relative error against a float64 product on the host: in place (C = D, two
// descriptors as matmul.cu makes them), in place with one descriptor, out of place; with the workspace zeroed and
// filled with 0xff. It found the split-K 2 candidates at k = 4097 that matmul.cu's split-K check now passes over.
//
//   nvcc -std=c++17 -O3 -Xcompiler -fopenmp -gencode=arch=compute_90,code=sm_90 -I <cublasLt include> \
//        dev/matmul/splitk_diag.cu -o splitk_diag -L <cublasLt lib> -l:libcublasLt.so.13 -lgomp
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <cmath>
#include <random>
#define CK(x) do { auto e = (x); if (e) { printf("ERR %s line %d: %d\n", #x, __LINE__, (int)e); exit(1);} } while (0)
static float bf(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static uint16_t tobf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
int attr(cublasLtMatmulAlgo_t* a, cublasLtMatmulAlgoConfigAttributes_t at) {
    uint32_t v = 0; size_t w = 0; cublasLtMatmulAlgoConfigGetAttribute(a, at, &v, sizeof(v), &w); return (int)v; }
int main(int argc, char** argv) {
    int shapes[][3] = {{256, 512, 4097}, {256, 512, 4096}, {512, 256, 4097}, {768, 768, 4097}, {256, 512, 1000},
                       {256, 512, 5000}, {768, 2304, 4099}};
    cublasLtHandle_t h; CK(cublasLtCreate(&h));
    const size_t WS = 32u << 20; void* ws; CK(cudaMalloc(&ws, WS));
    std::mt19937 rng(1); std::normal_distribution<float> nd(0, 1);
    for (auto& s : shapes) {
        int m = s[0], n = s[1], k = s[2];
        // A: inp (k=N rows, m=C cols) row-major = (m x k) col-major, op N; B: dout (k, n) row-major = (n x k) col-major, op T
        std::vector<uint16_t> A((size_t)m * k), B((size_t)n * k), C0((size_t)m * n);
        for (auto& v : A) v = tobf(nd(rng)); for (auto& v : B) v = tobf(nd(rng)); for (auto& v : C0) v = tobf(nd(rng));
        std::vector<double> ref((size_t)m * n);
        std::vector<float> Af(A.size()), Bf(B.size());
        for (size_t i = 0; i < A.size(); i++) Af[i] = bf(A[i]);
        for (size_t i = 0; i < B.size(); i++) Bf[i] = bf(B[i]);
        #pragma omp parallel for
        for (int j = 0; j < n; j++) {
            double* r = &ref[(size_t)j * m];
            for (int i = 0; i < m; i++) r[i] = bf(C0[i + (size_t)j * m]);
            for (int p = 0; p < k; p++) { const double b = Bf[j + (size_t)p * n]; const float* a = &Af[(size_t)p * m];
                for (int i = 0; i < m; i++) r[i] += (double)a[i] * b; } }
        void *dA, *dB, *dC, *dD; CK(cudaMalloc(&dA, A.size() * 2)); CK(cudaMalloc(&dB, B.size() * 2));
        CK(cudaMalloc(&dC, C0.size() * 2)); CK(cudaMalloc(&dD, C0.size() * 2));
        CK(cudaMemcpy(dA, A.data(), A.size() * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dB, B.data(), B.size() * 2, cudaMemcpyHostToDevice));
        cublasLtMatmulDesc_t desc; CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        int32_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_T;
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, 4));
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, 4));
        cublasLtMatrixLayout_t la, lb, lc, ld;
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, m, k, m)); CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, n, k, n));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, m, n, m)); CK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, m, n, m));
        cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t wsb = WS; CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, 8));
        uint32_t al = 256; for (auto at : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
            CK(cublasLtMatmulPreferenceSetAttribute(pref, at, &al, 4));
        cublasLtMatmulHeuristicResult_t res[16]; int got = 0;
        CK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, ld, pref, 16, res, &got));
        printf("== m=%d n=%d k=%d: %d candidates\n", m, n, k, got);
        std::vector<uint16_t> out(C0.size());
        auto err = [&](void* p) {
            CK(cudaMemcpy(out.data(), p, out.size() * 2, cudaMemcpyDeviceToHost));
            double worst = 0, ratio = 0;
            for (size_t i = 0; i < out.size(); i++) { double e = fabs(bf(out[i]) - ref[i]) / (fabs(ref[i]) + sqrt((double)k) * 0.05);
                if (e > worst) { worst = e; ratio = bf(out[i]) / ref[i]; } }
            char b[64]; snprintf(b, sizeof(b), "%.2e(got/ref %.3f)", worst, ratio); return std::string(b); };
        const float alpha = 1, beta = 1;
        for (int c = 0; c < got; c++) {
            auto* a = &res[c].algo;
            printf("#%2d id=%d tile=%d splitk=%d red=%d swz=%d custom=%d stages=%d cluster=%d ws=%zu |", c,
                   attr(a, CUBLASLT_ALGO_CONFIG_ID), attr(a, CUBLASLT_ALGO_CONFIG_TILE_ID), attr(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                   attr(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME), attr(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                   attr(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION), attr(a, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                   attr(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), res[c].workspaceSize);
            for (int garbage = 0; garbage < 2; garbage++) {
                CK(cudaMemset(ws, garbage ? 0xff : 0, WS));
                // in place, separate descriptors (as matmul.cu)
                CK(cudaMemcpy(dD, C0.data(), C0.size() * 2, cudaMemcpyHostToDevice));
                CK(cublasLtMatmul(h, desc, &alpha, dA, la, dB, lb, &beta, dD, lc, dD, ld, a, ws, WS, 0));
                printf(" ws%d inplace %s", garbage, err(dD).c_str());
                CK(cudaMemcpy(dD, C0.data(), C0.size() * 2, cudaMemcpyHostToDevice));
                CK(cublasLtMatmul(h, desc, &alpha, dA, la, dB, lb, &beta, dD, lc, dD, lc, a, ws, WS, 0));
                printf(" samedesc %s", err(dD).c_str());
                CK(cudaMemcpy(dC, C0.data(), C0.size() * 2, cudaMemcpyHostToDevice));
                CK(cudaMemset(dD, 0, C0.size() * 2));
                CK(cublasLtMatmul(h, desc, &alpha, dA, la, dB, lb, &beta, dC, lc, dD, ld, a, ws, WS, 0));
                printf(" outofplace %s;", err(dD).c_str());
            }
            printf("\n");
        }
        cudaFree(dA); cudaFree(dB); cudaFree(dC); cudaFree(dD);
    }
    printf("cublasLt version %zu\n", cublasLtGetVersion());
}
