// splitk_sweep.cu: at the step's cuBLASLt shapes (matmul.cu's layouts: the weight gradients accumulating in place,
// the LM head's dX and dW, the plain dinp), each heuristic candidate as offered and again with every split-K count
// it accepts, timed; the fastest configurations re-timed in interleaved rounds, with their worst difference from the
// heuristic's first (relative to the output's largest magnitude). The question: does a split-K count the heuristic
// does not offer beat what matmul.cu's tuner picks (the fastest of the first 16 as offered)?
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -I <cublasLt include> dev/matmul/splitk_sweep.cu \
//        -o splitk_sweep -L <cublasLt lib> -l:libcublasLt.so.13
//   ./splitk_sweep [shape-name ...]
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#define CK(x) do { auto e = (x); if (e) { printf("ERR %s line %d: %d\n", #x, __LINE__, (int)e); exit(1); } } while (0)

struct Shape { const char* name; cublasOperation_t ta, tb; int m, n, k; bool accumulate; };
static const Shape kShapes[] = {  // d12, B=64, T=1024 (N = 65536); the LM head per chunk of 8192 rows
    {"qkv_dweight", CUBLAS_OP_N, CUBLAS_OP_T, 768, 2304, 65536, true},
    {"fc_dweight", CUBLAS_OP_N, CUBLAS_OP_T, 768, 3072, 65536, true},
    {"fcproj_dweight", CUBLAS_OP_N, CUBLAS_OP_T, 3072, 768, 65536, true},
    {"attproj_dweight", CUBLAS_OP_N, CUBLAS_OP_T, 768, 768, 65536, true},
    {"lm_dx", CUBLAS_OP_N, CUBLAS_OP_N, 768, 8192, 50304, false},
    {"lm_dw", CUBLAS_OP_N, CUBLAS_OP_T, 768, 50304, 8192, true},
    {"fc_dinp", CUBLAS_OP_N, CUBLAS_OP_N, 768, 65536, 3072, false},
    {"qkv_dinp", CUBLAS_OP_N, CUBLAS_OP_N, 768, 65536, 2304, false},
};

struct Config { cublasLtMatmulAlgo_t algo; int rank, splits, tile, cluster; bool offered; float us; };

static int get_attr(const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t at) {
    uint32_t v = 0; size_t w = 0; cublasLtMatmulAlgoConfigGetAttribute(&a, at, &v, sizeof(v), &w); return (int)v; }

int main(int argc, char** argv) {
    cublasLtHandle_t h; CK(cublasLtCreate(&h));
    const size_t WS = 32u << 20; void* ws; CK(cudaMalloc(&ws, WS));
    cudaStream_t st; CK(cudaStreamCreate(&st));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    std::mt19937 rng(1); std::normal_distribution<float> nd(0, 1);
    for (const Shape& s : kShapes) {
        if (argc > 1 && std::none_of(argv + 1, argv + argc, [&](const char* a) { return !strcmp(a, s.name); })) continue;
        const int64_t a_rows = s.ta == CUBLAS_OP_N ? s.m : s.k, a_cols = s.ta == CUBLAS_OP_N ? s.k : s.m;
        const int64_t b_rows = s.tb == CUBLAS_OP_N ? s.k : s.n, b_cols = s.tb == CUBLAS_OP_N ? s.n : s.k;
        const size_t na = (size_t)a_rows * a_cols, nb = (size_t)b_rows * b_cols, nd_ = (size_t)s.m * s.n;
        std::vector<uint16_t> host(std::max(na, std::max(nb, nd_)));
        auto fill = [&](void* dev, size_t n, float scale) {
            for (size_t i = 0; i < n; i++) { float f = nd(rng) * scale; uint32_t u; memcpy(&u, &f, 4); host[i] = u >> 16; }
            CK(cudaMemcpy(dev, host.data(), n * 2, cudaMemcpyHostToDevice)); };
        void *A, *B, *C0, *D;
        CK(cudaMalloc(&A, na * 2)); CK(cudaMalloc(&B, nb * 2)); CK(cudaMalloc(&C0, nd_ * 2));
        CK(cudaMalloc(&D, nd_ * 2));
        fill(A, na, 1.0f); fill(B, nb, 1.0f / sqrtf((float)s.k)); fill(C0, nd_, 1.0f);
        cublasLtMatmulDesc_t desc; CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        int32_t ta = s.ta, tb = s.tb;
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, 4));
        CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, 4));
        cublasLtMatrixLayout_t la, lb, lc;
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, a_rows, a_cols, a_rows));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, b_rows, b_cols, b_rows));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, s.m, s.n, s.m));
        cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t wsb = WS; CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, 8));
        cublasLtMatmulHeuristicResult_t res[64]; int got = 0;
        CK(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 64, res, &got));
        const float alpha = 1.0f, beta = s.accumulate ? 1.0f : 0.0f;
        auto run = [&](const cublasLtMatmulAlgo_t& algo) {
            return cublasLtMatmul(h, desc, &alpha, A, la, B, lb, &beta, D, lc, D, lc, &algo, ws, WS, st); };
        auto time_us = [&](const cublasLtMatmulAlgo_t& algo, int reps) {
            if (run(algo) != CUBLAS_STATUS_SUCCESS) return INFINITY;
            CK(cudaEventRecord(e0, st));
            for (int r = 0; r < reps; r++) run(algo);
            CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
            float ms = 0; CK(cudaEventElapsedTime(&ms, e0, e1)); return 1e3f * ms / reps; };
        std::vector<Config> cfgs;
        const int splits_tried[] = {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16};
        for (int i = 0; i < got; i++) {
            if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
            const cublasLtMatmulAlgo_t& a = res[i].algo;
            Config c{a, i, std::max(1, get_attr(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM)),
                     get_attr(a, CUBLASLT_ALGO_CONFIG_TILE_ID), get_attr(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), true, 0};
            cfgs.push_back(c);
            for (int sk : splits_tried) {
                if (sk == c.splits) continue;
                Config v = c; v.offered = false; v.splits = sk;
                uint32_t skv = sk;
                if (cublasLtMatmulAlgoConfigSetAttribute(&v.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &skv, 4)) continue;
                cublasLtMatmulHeuristicResult_t chk;
                if (cublasLtMatmulAlgoCheck(h, desc, la, lb, lc, lc, &v.algo, &chk) || chk.workspaceSize > WS) continue;
                if (get_attr(v.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) != sk) continue;
                cfgs.push_back(v);
            }
        }
        for (auto& c : cfgs) c.us = time_us(c.algo, 8);
        // the tuner's pick: the fastest of the first 16 as offered
        float tuner = INFINITY; for (auto& c : cfgs) if (c.offered && c.rank < 16) tuner = std::min(tuner, c.us);
        std::vector<int> order(cfgs.size()); for (size_t i = 0; i < order.size(); i++) order[i] = (int)i;
        std::sort(order.begin(), order.end(), [&](int x, int y) { return cfgs[x].us < cfgs[y].us; });
        std::vector<int> top(order.begin(), order.begin() + std::min<size_t>(10, order.size()));
        int first = -1, pick = -1;  // heuristic's #0; the tuner's pick
        for (size_t i = 0; i < cfgs.size(); i++) {
            if (cfgs[i].offered && cfgs[i].rank == 0) first = (int)i;
            if (cfgs[i].offered && cfgs[i].rank < 16 && cfgs[i].us == tuner) pick = (int)i;
        }
        for (int x : {first, pick}) if (x >= 0 && std::find(top.begin(), top.end(), x) == top.end()) top.push_back(x);
        std::vector<float> best(top.size(), INFINITY);
        for (int round = 0; round < 3; round++)
            for (size_t j = 0; j < top.size(); j++) best[j] = std::min(best[j], time_us(cfgs[top[j]].algo, 20));
        // reference output: the heuristic's first, in place on C0
        std::vector<uint16_t> ref(nd_), out(nd_);
        auto product = [&](const cublasLtMatmulAlgo_t& algo, std::vector<uint16_t>& dst) {
            CK(cudaMemcpy(D, C0, nd_ * 2, cudaMemcpyDeviceToDevice)); CK(run(algo)); CK(cudaStreamSynchronize(st));
            CK(cudaMemcpy(dst.data(), D, nd_ * 2, cudaMemcpyDeviceToHost)); };
        auto bf = [](uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; };
        product(cfgs[first].algo, ref);
        float ref_max = 0; for (auto v : ref) ref_max = std::max(ref_max, fabsf(bf(v)));
        const double flop = 2.0 * s.m * s.n * s.k;
        printf("\n%s: m=%d n=%d k=%d, %d offered, %zu configurations; heuristic's first %.1f us, tuner's pick %.1f us\n",
               s.name, s.m, s.n, s.k, got, cfgs.size(), cfgs[first].us, tuner);
        printf("  %-5s %-8s %6s %5s %7s %5s | %9s %7s %10s\n", "rank", "offered", "splits", "tile", "cluster", "",
               "best us", "TFLOP/s", "max diff");
        for (size_t j = 0; j < top.size(); j++) {
            const Config& c = cfgs[top[j]];
            product(c.algo, out);
            float diff = 0; for (size_t i = 0; i < nd_; i++) diff = std::max(diff, fabsf(bf(out[i]) - bf(ref[i])));
            printf("  %-5d %-8s %6d %5d %7d %5s | %9.1f %7.0f %10.2e%s\n", c.rank, c.offered ? "yes" : "no", c.splits,
                   c.tile, c.cluster, "", best[j], flop / best[j] * 1e-6, diff / ref_max,
                   top[j] == first ? "  <- heuristic's first" : top[j] == pick ? "  <- tuner's pick" : "");
        }
        cudaFree(A); cudaFree(B); cudaFree(C0); cudaFree(D);
        cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(desc);
    }
    return 0;
}
