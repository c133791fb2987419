// matmul.cu: the linear layers (y = x @ W^T + b) and their backward, through cuBLASLt.
//
// The math (row-major, as every tensor in gpt2cu; N = B*T rows):
//   forward   out (N, OC)      = inp (N, C) @ W (OC, C)^T + bias (OC)
//             with gelu_pre:   gelu_pre = that, out = gelu(gelu_pre)          (tanh GeLU)
//   backward  dinp (N, C)      = dout (N, OC) @ W (OC, C)      [* gelu'(dinp_gelu_pre)]
//             dweight (OC, C) += dout (N, OC)^T @ inp (N, C)
//             dbias (OC)      += colsum(dout)                 (bias_backward, bias.cu)
//
// The mapping onto cuBLASLt, which is column-major: a row-major (R, Cc) matrix with row stride Cc is,
// byte for byte, the column-major (Cc, R) matrix with ld = Cc, i.e. its transpose. So every row-major
// product Y = X1 @ X2 is computed as the column-major product Y^T = X2^T @ X1^T, and cuBLASLt's
//   D (m x n) = op(A) (m x k) @ op(B) (k x n)   [+ beta C],   A stored (m x k) if N, (k x m) if T
// is called with:
//   forward   out^T (OC x N) = W (OC x C) @ inp^T (C x N):
//             A = W seen as col-major (C x OC), ld C, op T -> (OC x C);
//             B = inp seen as col-major (C x N), ld C, op N;
//             m = OC, n = N, k = C, D = out seen as col-major (OC x N), ld OC.
//             The bias is a vector of length m = OC broadcast over the n = N columns: exactly the
//             cuBLASLt BIAS epilogue. GELU_AUX(_BIAS) writes the pre-activation to the aux matrix,
//             which has the shape of D (OC x N col-major), so its ld is OC (elements).
//   dinp      dinp^T (C x N) = W^T (C x OC) @ dout^T (OC x N):
//             A = W seen as col-major (C x OC), ld C, op N;  B = dout seen as (OC x N), ld OC, op N;
//             m = C, n = N, k = OC, D = dinp seen as (C x N), ld C.
//             DGELU multiplies D element-wise by gelu'(aux), aux shaped like D: dinp_gelu_pre (N, C)
//             row-major = (C x N) col-major, so the aux ld is C.
//   dweight   dweight^T (C x OC) = inp^T (C x N) @ dout (N x OC):
//             A = inp seen as col-major (C x N), ld C, op N;  B = dout seen as (OC x N), ld OC, op T;
//             m = C, n = OC, k = N, D = C = dweight seen as (C x OC), ld C, beta = 1 (accumulate).
//
// Types: A, B, C, D, bias and aux are bf16 (CUDA_R_16BF); compute CUBLAS_COMPUTE_32F, scale type fp32.
//
// Requirements (a launcher throws std::runtime_error otherwise):
//   - N, C, OC > 0.
//   - forward with gelu_pre: OC % 8 == 0 (cuBLASLt: the GELU aux ld must be divisible by 8);
//     gelu_pre must not alias out.
//   - backward with dinp_gelu_pre: C % 8 == 0 (the DGELU aux ld); dinp_gelu_pre must not alias dinp.
//   - pointers need only bf16 (2-byte) alignment: each pointer's alignment (up to 256 bytes) is part of
//     the cache key and is passed to the heuristic, so a misaligned view gets a (slower) algorithm that
//     supports it instead of a failure. 16-byte-aligned pointers and C, OC multiples of 8 are fast.
//   - matmul_backward: dinp or dweight may be null (that product is skipped); dbias null skips the
//     bias gradient; the scratch is used only for dbias (bias_backward_scratch_floats(N, OC) floats).
//
// State (per device): one cuBLASLt handle, and one 32 MiB workspace per stream that calls a matmul,
// both created on that stream's first call. cudaMalloc is not allowed during CUDA-graph capture, so the
// first matmul call on each stream must come before capture (a warm-up step); a first call under
// capture throws a clear error instead. A workspace per stream keeps matmuls on different streams from
// racing on it. Matmul descriptors, layouts and the heuristic's algorithm are cached per (device,
// shape, transposes, lds, epilogue, beta, pointer alignments); cached calls only set the bias/aux
// pointers and launch: no allocation, no synchronisation. cuBLASLt's results are run-to-run
// deterministic for a fixed algorithm and workspace on one GPU model.
#include "kernels.h"

#include <cublasLt.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;  // 32 MiB

[[noreturn]] void mm_fail(const std::string& msg) { throw std::runtime_error(msg); }

void mm_check_cublas(cublasStatus_t st, const char* call, const char* who, const std::string& ctx = "") {
    if (st != CUBLAS_STATUS_SUCCESS) {
        mm_fail(std::string(who) + ": " + call + " failed: " + cublasLtGetStatusName(st) + " (" +
                std::to_string(static_cast<int>(st)) + ", " + cublasLtGetStatusString(st) + ")" +
                (ctx.empty() ? "" : " [" + ctx + "]"));
    }
}

void mm_check_cuda(cudaError_t e, const char* call, const char* who) {
    if (e != cudaSuccess) {
        mm_fail(std::string(who) + ": " + call + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                ")");
    }
}

// Largest power of two (capped at 256) dividing the address; 256 for null (unused) pointers.
uint32_t mm_alignment(const void* p) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a == 0) return 256;
    uintptr_t low = a & (~a + 1);
    return low >= 256 ? 256u : static_cast<uint32_t>(low);
}

struct GemmKey {
    int device;
    int transa, transb;
    int m, n, k;
    int64_t lda, ldb, ldd, aux_ld;
    uint32_t epilogue;
    int accumulate;
    uint32_t align_a, align_b, align_c, align_d, align_bias, align_aux;

    bool operator==(const GemmKey& o) const {
        return device == o.device && transa == o.transa && transb == o.transb && m == o.m && n == o.n &&
               k == o.k && lda == o.lda && ldb == o.ldb && ldd == o.ldd && aux_ld == o.aux_ld &&
               epilogue == o.epilogue && accumulate == o.accumulate && align_a == o.align_a &&
               align_b == o.align_b && align_c == o.align_c && align_d == o.align_d && align_bias == o.align_bias &&
               align_aux == o.align_aux;
    }
};

struct GemmKeyHash {
    size_t operator()(const GemmKey& key) const {
        uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
        auto mix = [&h](uint64_t v) {
            h ^= v;
            h *= 1099511628211ull;
        };
        mix(static_cast<uint64_t>(key.device));
        mix(static_cast<uint64_t>(key.transa) | (static_cast<uint64_t>(key.transb) << 8));
        mix(static_cast<uint64_t>(key.m));
        mix(static_cast<uint64_t>(key.n));
        mix(static_cast<uint64_t>(key.k));
        mix(static_cast<uint64_t>(key.lda));
        mix(static_cast<uint64_t>(key.ldb));
        mix(static_cast<uint64_t>(key.ldd));
        mix(static_cast<uint64_t>(key.aux_ld));
        mix(static_cast<uint64_t>(key.epilogue) | (static_cast<uint64_t>(key.accumulate) << 32));
        mix(static_cast<uint64_t>(key.align_a) | (static_cast<uint64_t>(key.align_b) << 16) |
            (static_cast<uint64_t>(key.align_c) << 32) | (static_cast<uint64_t>(key.align_d) << 48));
        mix(static_cast<uint64_t>(key.align_bias) | (static_cast<uint64_t>(key.align_aux) << 16));
        return static_cast<size_t>(h);
    }
};

// Descriptors live for the whole process (never destroyed: destroying them at exit could run after the
// CUDA context is gone).
struct GemmPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
};

struct StreamKey {
    int device;
    cudaStream_t stream;
    bool operator==(const StreamKey& o) const { return device == o.device && stream == o.stream; }
};
struct StreamKeyHash {
    size_t operator()(const StreamKey& k) const {
        return std::hash<uintptr_t>()(reinterpret_cast<uintptr_t>(k.stream)) * 31u + static_cast<size_t>(k.device);
    }
};

std::mutex g_mutex;
std::unordered_map<int, cublasLtHandle_t> g_handles;                        // device -> handle
std::unordered_map<StreamKey, void*, StreamKeyHash> g_workspaces;           // (device, stream) -> 32 MiB
std::unordered_map<GemmKey, GemmPlan, GemmKeyHash> g_plans;

bool mm_is_capturing(cudaStream_t stream, const char* who) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    mm_check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing", who);
    return status != cudaStreamCaptureStatusNone;
}

// Caller holds g_mutex.
cublasLtHandle_t mm_handle(int device, cudaStream_t stream, const char* who) {
    auto it = g_handles.find(device);
    if (it != g_handles.end()) return it->second;
    if (mm_is_capturing(stream, who)) {
        mm_fail(std::string(who) + ": the first matmul on a device must run before CUDA-graph capture "
                                   "(it creates the cuBLASLt handle); run one warm-up step first");
    }
    cublasLtHandle_t h = nullptr;
    mm_check_cublas(cublasLtCreate(&h), "cublasLtCreate", who);
    g_handles.emplace(device, h);
    return h;
}

// Caller holds g_mutex.
void* mm_workspace(int device, cudaStream_t stream, const char* who) {
    StreamKey key{device, stream};
    auto it = g_workspaces.find(key);
    if (it != g_workspaces.end()) return it->second;
    if (mm_is_capturing(stream, who)) {
        mm_fail(std::string(who) + ": the first matmul on a stream must run before CUDA-graph capture (it "
                                   "allocates that stream's 32 MiB cuBLASLt workspace); run one warm-up step "
                                   "on every stream that does matmuls first");
    }
    void* ws = nullptr;
    mm_check_cuda(cudaMalloc(&ws, kWorkspaceBytes), "cudaMalloc(cuBLASLt workspace, 32 MiB)", who);
    g_workspaces.emplace(key, ws);
    return ws;
}

struct Gemm {
    cublasOperation_t transa, transb;
    int m, n, k;
    int64_t lda, ldb, ldd;
    const void* A;
    const void* B;
    void* D;  // also C when accumulate
    bool accumulate;
    cublasLtEpilogue_t epilogue;
    const void* bias;  // BIAS epilogues
    void* aux;         // GELU_AUX (output) / DGELU (input) epilogues
    int64_t aux_ld;
};

std::string mm_context(const Gemm& g) {
    return "m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
           " transa=" + (g.transa == CUBLAS_OP_T ? "T" : "N") + " transb=" + (g.transb == CUBLAS_OP_T ? "T" : "N") +
           " lda=" + std::to_string(g.lda) + " ldb=" + std::to_string(g.ldb) + " ldd=" + std::to_string(g.ldd) +
           " epilogue=" + std::to_string(static_cast<int>(g.epilogue)) + " aux_ld=" + std::to_string(g.aux_ld) +
           " beta=" + (g.accumulate ? "1" : "0") + " align(A,B,D,bias,aux)=" + std::to_string(mm_alignment(g.A)) +
           "," + std::to_string(mm_alignment(g.B)) + "," + std::to_string(mm_alignment(g.D)) + "," +
           std::to_string(mm_alignment(g.bias)) + "," + std::to_string(mm_alignment(g.aux));
}

void mm_set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const void* value, size_t size,
                 const char* name, const char* who, const std::string& ctx) {
    mm_check_cublas(cublasLtMatmulDescSetAttribute(desc, attr, value, size), name, who, ctx);
}

void mm_set_pointers(cublasLtMatmulDesc_t desc, const Gemm& g, const char* who, const std::string* ctx) {
    static const std::string empty;
    const std::string& c = ctx ? *ctx : empty;
    if (g.bias) {
        const void* bias = g.bias;
        mm_set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias),
                    "cublasLtMatmulDescSetAttribute(BIAS_POINTER)", who, c);
    }
    if (g.aux) {
        void* aux = g.aux;
        mm_set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux),
                    "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_POINTER)", who, c);
    }
}

// Caller holds g_mutex.
GemmPlan& mm_plan(cublasLtHandle_t handle, int device, const Gemm& g, const char* who) {
    GemmKey key{device,
                static_cast<int>(g.transa),
                static_cast<int>(g.transb),
                g.m,
                g.n,
                g.k,
                g.lda,
                g.ldb,
                g.ldd,
                g.aux ? g.aux_ld : 0,
                static_cast<uint32_t>(g.epilogue),
                g.accumulate ? 1 : 0,
                mm_alignment(g.A),
                mm_alignment(g.B),
                mm_alignment(g.D),  // C is D
                mm_alignment(g.D),
                mm_alignment(g.bias),
                mm_alignment(g.aux)};
    auto it = g_plans.find(key);
    if (it != g_plans.end()) return it->second;

    const std::string ctx = mm_context(g);
    GemmPlan plan;
    mm_check_cublas(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate",
                    who, ctx);
    int32_t ta = static_cast<int32_t>(g.transa), tb = static_cast<int32_t>(g.transb);
    mm_set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta), "cublasLtMatmulDescSetAttribute(TRANSA)",
                who, ctx);
    mm_set_desc(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb), "cublasLtMatmulDescSetAttribute(TRANSB)",
                who, ctx);
    uint32_t epi = static_cast<uint32_t>(g.epilogue);
    mm_set_desc(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi),
                "cublasLtMatmulDescSetAttribute(EPILOGUE)", who, ctx);
    if (g.bias) {
        int32_t bias_type = CUDA_R_16BF;
        mm_set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type),
                    "cublasLtMatmulDescSetAttribute(BIAS_DATA_TYPE)", who, ctx);
    }
    if (g.aux) {
        // The aux (GELU input) element type defaults to D's type, bf16: left at its default.
        int64_t aux_ld = g.aux_ld;
        mm_set_desc(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld),
                    "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_LD)", who, ctx);
    }
    // The heuristic reads the bias/aux pointer values to learn their alignment: set them now.
    mm_set_pointers(plan.desc, g, who, &ctx);

    const uint64_t a_rows = g.transa == CUBLAS_OP_N ? g.m : g.k, a_cols = g.transa == CUBLAS_OP_N ? g.k : g.m;
    const uint64_t b_rows = g.transb == CUBLAS_OP_N ? g.k : g.n, b_cols = g.transb == CUBLAS_OP_N ? g.n : g.k;
    mm_check_cublas(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, a_rows, a_cols, g.lda),
                    "cublasLtMatrixLayoutCreate(A)", who, ctx);
    mm_check_cublas(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, b_rows, b_cols, g.ldb),
                    "cublasLtMatrixLayoutCreate(B)", who, ctx);
    mm_check_cublas(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16BF, g.m, g.n, g.ldd), "cublasLtMatrixLayoutCreate(C)",
                    who, ctx);
    mm_check_cublas(cublasLtMatrixLayoutCreate(&plan.d, CUDA_R_16BF, g.m, g.n, g.ldd), "cublasLtMatrixLayoutCreate(D)",
                    who, ctx);

    cublasLtMatmulPreference_t pref = nullptr;
    mm_check_cublas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate", who, ctx);
    uint64_t ws_bytes = kWorkspaceBytes;
    uint32_t al_a = key.align_a, al_b = key.align_b, al_c = key.align_c, al_d = key.align_d;
    struct {
        cublasLtMatmulPreferenceAttributes_t attr;
        const void* value;
        size_t size;
        const char* name;
    } prefs[] = {
        {CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes),
         "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a),
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b),
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c),
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)"},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d),
         "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)"},
    };
    for (const auto& p : prefs) {
        cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, p.attr, p.value, p.size);
        if (st != CUBLAS_STATUS_SUCCESS) {
            cublasLtMatmulPreferenceDestroy(pref);
            mm_check_cublas(st, p.name, who, ctx);
        }
    }
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, pref, 1, &result, &returned);
    cublasLtMatmulPreferenceDestroy(pref);
    mm_check_cublas(st, "cublasLtMatmulAlgoGetHeuristic", who, ctx);
    if (returned == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
        mm_fail(std::string(who) + ": cublasLtMatmulAlgoGetHeuristic found no algorithm for this matmul [" + ctx +
                "]");
    }
    if (result.workspaceSize > kWorkspaceBytes) {
        mm_fail(std::string(who) + ": cuBLASLt algorithm wants " + std::to_string(result.workspaceSize) +
                " bytes of workspace, more than 32 MiB [" + ctx + "]");
    }
    plan.algo = result.algo;
    return g_plans.emplace(key, plan).first->second;
}

void mm_gemm(const Gemm& g, cudaStream_t stream, const char* who) {
    std::lock_guard<std::mutex> lock(g_mutex);
    int device = 0;
    mm_check_cuda(cudaGetDevice(&device), "cudaGetDevice", who);
    cublasLtHandle_t handle = mm_handle(device, stream, who);
    void* workspace = mm_workspace(device, stream, who);
    GemmPlan& plan = mm_plan(handle, device, g, who);
    mm_set_pointers(plan.desc, g, who, nullptr);
    const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
    cublasStatus_t st = cublasLtMatmul(handle, plan.desc, &alpha, g.A, plan.a, g.B, plan.b, &beta, g.D, plan.c, g.D,
                                       plan.d, &plan.algo, workspace, kWorkspaceBytes, stream);
    if (st != CUBLAS_STATUS_SUCCESS) mm_check_cublas(st, "cublasLtMatmul", who, mm_context(g));
    mm_check_cuda(cudaGetLastError(), "cublasLtMatmul (launch)", who);
}

void mm_check_dims(int N, int C, int OC, const char* who) {
    if (N <= 0 || C <= 0 || OC <= 0) {
        mm_fail(std::string(who) + ": sizes must be positive (N=" + std::to_string(N) + ", C=" + std::to_string(C) +
                ", OC=" + std::to_string(OC) + ")");
    }
}

void mm_require(bool ok, const char* who, const std::string& what) {
    if (!ok) mm_fail(std::string(who) + ": " + what);
}

}  // namespace

void matmul_forward(bf16* out, bf16* gelu_pre, const bf16* inp, const bf16* weight, const bf16* bias, int N, int C,
                    int OC, cudaStream_t stream) {
    const char* who = "matmul_forward";
    mm_check_dims(N, C, OC, who);
    mm_require(out && inp && weight, who, "out, inp and weight must be non-null");
    cublasLtEpilogue_t epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (gelu_pre) {
        mm_require(OC % 8 == 0, who,
                   "with gelu_pre, OC must be a multiple of 8 (cuBLASLt GELU aux ld), got OC=" + std::to_string(OC));
        mm_require(gelu_pre != out, who, "gelu_pre must not alias out");
        epi = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    }
    Gemm g{};
    g.transa = CUBLAS_OP_T;
    g.transb = CUBLAS_OP_N;
    g.m = OC;
    g.n = N;
    g.k = C;
    g.lda = C;  // W (OC, C) row-major = (C x OC) col-major
    g.ldb = C;  // inp (N, C) row-major = (C x N) col-major
    g.ldd = OC; // out (N, OC) row-major = (OC x N) col-major
    g.A = weight;
    g.B = inp;
    g.D = out;
    g.accumulate = false;
    g.epilogue = epi;
    g.bias = bias;
    g.aux = gelu_pre;
    g.aux_ld = OC;
    mm_gemm(g, stream, who);
}

void matmul_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp, const bf16* weight,
                     const bf16* dinp_gelu_pre, float* scratch, size_t scratch_floats, int N, int C, int OC,
                     cudaStream_t stream) {
    const char* who = "matmul_backward";
    mm_check_dims(N, C, OC, who);
    mm_require(dout != nullptr, who, "dout must be non-null");
    if (dinp) {
        mm_require(weight != nullptr, who, "weight must be non-null when dinp is computed");
        Gemm g{};
        g.transa = CUBLAS_OP_N;
        g.transb = CUBLAS_OP_N;
        g.m = C;
        g.n = N;
        g.k = OC;
        g.lda = C;   // W (OC, C) row-major = (C x OC) col-major
        g.ldb = OC;  // dout (N, OC) row-major = (OC x N) col-major
        g.ldd = C;   // dinp (N, C) row-major = (C x N) col-major
        g.A = weight;
        g.B = dout;
        g.D = dinp;
        g.accumulate = false;
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        g.bias = nullptr;
        g.aux = nullptr;
        g.aux_ld = 0;
        if (dinp_gelu_pre) {
            mm_require(C % 8 == 0, who,
                       "with dinp_gelu_pre, C must be a multiple of 8 (cuBLASLt DGELU aux ld), got C=" +
                           std::to_string(C));
            mm_require(static_cast<const void*>(dinp_gelu_pre) != static_cast<const void*>(dinp), who,
                       "dinp_gelu_pre must not alias dinp");
            g.epilogue = CUBLASLT_EPILOGUE_DGELU;
            g.aux = const_cast<bf16*>(dinp_gelu_pre);  // read only (DGELU input)
            g.aux_ld = C;
        }
        mm_gemm(g, stream, who);
    }
    if (dweight) {
        mm_require(inp != nullptr, who, "inp must be non-null when dweight is computed");
        Gemm g{};
        g.transa = CUBLAS_OP_N;
        g.transb = CUBLAS_OP_T;
        g.m = C;
        g.n = OC;
        g.k = N;
        g.lda = C;   // inp (N, C) row-major = (C x N) col-major
        g.ldb = OC;  // dout (N, OC) row-major = (OC x N) col-major, op T -> (N x OC)
        g.ldd = C;   // dweight (OC, C) row-major = (C x OC) col-major
        g.A = inp;
        g.B = dout;
        g.D = dweight;
        g.accumulate = true;
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        g.bias = nullptr;
        g.aux = nullptr;
        g.aux_ld = 0;
        mm_gemm(g, stream, who);
    }
    if (dbias) {
        bias_backward(dbias, dout, scratch, scratch_floats, N, OC, stream);
    }
}
