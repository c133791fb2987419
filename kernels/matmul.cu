// matmul.cu: the linear layers (y = x @ W^T + b) and their backward, through cuBLASLt; on Hopper the GEMMs with a
// GeLU epilogue (the forward's, the backward's DGELU) run gemm_sm90.cu's kernel instead (below).
//
// The math (row-major, as every tensor in gpt2cu; N = B*T rows):
//   forward   out (N, OC)      = inp (N, C) @ W (OC, C)^T + bias (OC)
//             with gelu_pre:   gelu_pre = that, out = gelu(gelu_pre)          (tanh GeLU)
//             with residual:   out = that + residual (N, OC), rounded once    (a block's residual add: the
//                              projection's output never makes its own round trip through DRAM)
//   backward  dinp (N, C)      = dout (N, OC) @ W (OC, C)      [* gelu'(dinp_gelu_pre)]
//             [dinp_head_dot (B, C / hs, T) = per head of hs columns, rowsum(dinp * head_dot_with), dinp as stored]
//             dweight (OC, C) += dout (N, OC)^T @ inp (N, C)
//             dbias (OC)      += colsum(dout)                 (bias_backward, bias.cu)
//             with dinp_gelu_dbias: dinp_gelu_dbias (C) += colsum(dinp), the bias gradient of the layer whose
//             output dinp_gelu_pre was (GPT-2's fc: its bias's gradient is the column sum of this dinp)
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
//             cuBLASLt BIAS epilogue. A residual is cuBLASLt's C with beta = 1, laid out as D.
//             GELU_AUX(_BIAS) writes the pre-activation to the aux matrix, which has the shape of D
//             (OC x N col-major), so its ld is OC (elements).
//   dinp      dinp^T (C x N) = W^T (C x OC) @ dout^T (OC x N):
//             A = W seen as col-major (C x OC), ld C, op N;  B = dout seen as (OC x N), ld OC, op N;
//             m = C, n = N, k = OC, D = dinp seen as (C x N), ld C.
//             DGELU multiplies D element-wise by gelu'(aux), aux shaped like D: dinp_gelu_pre (N, C)
//             row-major = (C x N) col-major, so the aux ld is C.
//   dweight   dweight^T (C x OC) = inp^T (C x N) @ dout (N x OC):
//             A = inp seen as col-major (C x N), ld C, op N;  B = dout seen as (OC x N), ld OC, op T;
//             m = C, n = OC, k = N, D = C = dweight seen as (C x OC), ld C, beta = 1 (accumulate).
//
// Hopper (compute capability 9.x, in a build with sm_90: GPT2CU_HAVE_SM90_GEMM): the forward with gelu_pre runs
// gemm_sm90.cu's kernel (its GeLU epilogue overlapped with another tile's products; on an H200 at GPT-2's fc
// shape 14% faster than cuBLASLt's GELU_AUX_BIAS, which runs at 78% of torch.matmul's plain rate) when its shapes
// fit: OC a multiple of 128, C a multiple of 64, every pointer 16-byte aligned; any N rows. The backward's dinp
// with dinp_gelu_pre runs the same kernel with the DGELU epilogue where C is a multiple of 128 and OC of 64 (the
// product's n and k) and dinp, dout, dinp_gelu_pre are 16-byte aligned: the weight (OC, C) is first transposed
// into the scratch (bf16_transpose, transpose.cu: a few microseconds at fc's 768 x 3072), so that the kernel reads
// it K-major like the forward's weight (the MN-major variant of gemm-sm90 lost to cuBLASLt: gemm_sm90.cu's
// header). Other shapes and the other GEMMs stay on cuBLASLt. Same rounding as cuBLASLt's epilogues (pre =
// round(acc + bias), out = round(gelu(acc + bias)), dinp = round(acc * gelu'(pre)) from fp32), deterministic, no
// workspace, nothing allocated (capture safe). With dinp_head_dot (the output projection of attention, whose dinp is
// the attention backward's dO) the same kernel's HeadDot epilogue computes the attention backward's D = rowsum(dO *
// O) per head from the rounded dinp, where C is a multiple of 128 and OC of 64 (the weight transposed as above): the
// preprocess's pass over dO and O is left out (GPT-2 d12, B = 64, T = 1024: 300 MB of DRAM traffic, dout and O in,
// dinp out, against 400 MB for the plain GEMM and the preprocess). Elsewhere cuBLASLt's dinp, then that preprocess
// (attention_backward_preprocess): the caller never branches. GPT2CU_SM90_GEMM=0 in the environment (read once) or
// matmul_set_sm90(0) send all of them to cuBLASLt too: whole-step and per-GEMM comparisons. The forward with a residual
// runs the same kernel's Residual epilogue where OC is a multiple of 128, C of 64 and the pointers 16-byte aligned:
// the residual tile comes by TMA under the products, where cuBLASLt's C with beta = 1 (elsewhere) is read in its
// epilogue unhidden; up to K = kResidualSm90MaxK (below), where the epilogue is a large part of the time.
// dinp_gelu_dbias on the Hopper path: the DGELU epilogue writes the column sums of each 128-row tile of dinp (its
// bf16 values, summed in fp32) to the scratch after the transposed weight, and bias.cu's finishing reduction adds
// them into dinp_gelu_dbias: no second pass over dinp (gemm_sm90.cu's header). Elsewhere (cuBLASLt's DGELU) it is
// bias_backward on dinp after the GEMM: the same sums to within fp32 order, and the caller does not branch.
//
// Types: A, B, C, D, bias and aux are bf16 (CUDA_R_16BF); compute CUBLAS_COMPUTE_32F, scale type fp32.
//
// Requirements (a launcher throws std::runtime_error otherwise):
//   - N, C, OC > 0.
//   - forward with gelu_pre: OC % 8 == 0 (cuBLASLt: the GELU aux ld must be divisible by 8);
//     gelu_pre must not alias out. residual and gelu_pre not both; residual may be out itself (in place).
//   - backward with dinp_gelu_pre: C % 8 == 0 (the DGELU aux ld); dinp_gelu_pre must not alias dinp.
//   - gelu_pre and dinp_gelu_pre 16-byte aligned (cuBLASLt's aux takes no alignment hint: a view 2 bytes off
//     failed with a misaligned-address fault on an H200).
//   - the other pointers need only bf16 (2-byte) alignment: each pointer's alignment (up to 256 bytes) is part of
//     the cache key and is passed to the heuristic, so a misaligned view gets a (slower) algorithm that
//     supports it instead of a failure. 16-byte-aligned pointers and C, OC multiples of 8 are fast.
//   - matmul_backward: dinp or dweight may be null (that product is skipped); dbias null skips the
//     bias gradient; dinp_gelu_dbias needs dinp and dinp_gelu_pre. The scratch holds dbias's partial sums
//     (bias_backward_scratch_floats(N, OC) floats) and, with dinp_gelu_pre or dinp_head_dot, the transposed weight
//     (OC * C bf16), then with dinp_gelu_dbias the column sums per row tile (gemm_sm90_row_tiles(N) x C floats):
//     matmul_backward_scratch_floats, the same on every GPU.
//   - dinp_head_dot: with dinp and without dinp_gelu_pre; head_size 64 or 128 dividing C, T dividing N, dinp and
//     head_dot_with 16-byte aligned (attention_backward_preprocess's), dinp_head_dot 4-byte aligned.
//
// State (per device): one cuBLASLt handle, and one 32 MiB workspace per stream that calls a matmul,
// both created on that stream's first call. cudaMalloc is not allowed during CUDA-graph capture, so the
// first matmul call on each stream must come before capture (a warm-up step); a first call under
// capture throws a clear error instead. A workspace per stream keeps matmuls on different streams from
// racing on it. Matmul descriptors, layouts and the chosen algorithm are cached per (device, shape,
// transposes, lds, epilogue, beta, pointer alignments, tuning mode); cached calls only set the bias/aux
// pointers and launch: no allocation, no synchronisation. cuBLASLt's results are run-to-run
// deterministic for a fixed algorithm and workspace on one GPU model.
//
// Algorithm choice (the first call of each cache key). cuBLASLt's heuristic ranks up to kCandidates
// algorithms; its first is often not the fastest for these shapes (the LM head's long-k dweight, the
// GeLU epilogue). With tuning on (the default; GPT2CU_GEMM_TUNE=0 or matmul_set_tuning(0) turn it off)
// every candidate runs a few times after a warm-up on the real inputs but into scratch outputs (D, and
// the aux matrix when the epilogue writes one; with beta = 1 the real D is read as C only), so no
// caller data changes; a candidate replaces the heuristic's first only when it is faster by more than
// kTuneMargin, so noise does not pick. Bit-exact resume across processes needs the same algorithm in
// every process, so a choice is used only once it is in the cache file (GPT2CU_GEMM_CACHE, default
// $XDG_CACHE_HOME or ~/.cache, gpt2cu/gemm-algos.txt), keyed by device name, SM count, cuBLASLt version
// and the cache key; the file is read first, written atomically (temporary file + rename) under an
// flock, so concurrent processes (ranks) on one machine agree. Where the file cannot be written, or the
// call is under graph capture (the trainer's eager first step makes every plan before capture), the
// heuristic's first is used (under capture it is also recorded, so later processes agree). Whichever way a
// candidate is picked, one that splits k is taken only once its product on the call's inputs matched the
// unsplit product (cuBLASLt 13.1 gave wrong sums with some; see "split-K products checked" below); under
// capture, where nothing can run, split-K candidates are passed over.
#include "kernels.h"
#include "env_switch.h"
#include "gemm_sm90.h"  // declarations only; the kernel is called only in a build with it (GPT2CU_HAVE_SM90_GEMM)

#include <cublasLt.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;  // 32 MiB
constexpr int kCandidates = 16;                 // the heuristic's top algorithms timed per cache key
constexpr float kTuneMargin = 0.02f;            // another candidate must beat the first by more than 2%
constexpr int kTuneRounds = 3;                  // each candidate's time: the best of 3 interleaved rounds
constexpr float kTuneRoundUs = 300.0f;          // of about this long each (repeated calls)
// The residual forward runs on gemm_sm90 up to this K, cuBLASLt's C (beta = 1) beyond: on an H200 in GPT-2's step
// attention's projection (K = 768) gained on gemm_sm90 (-0.43 ms a d12 step), the MLP's (K = 3072) lost (+0.35 ms
// more with it there), where the product, not the epilogue, is the kernel's time. With gemm_sm90's clusters it still
// lost (+1.6 ms a step, tenth session, docs/perf.md), as did the qkv forward's bias on gemm_sm90 (+0.4 ms).
constexpr int kResidualSm90MaxK = 1024;

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
    int tuned;  // the tuning mode the plan was made under (both kinds can coexist: bench_kernels)

    bool operator==(const GemmKey& o) const {
        return device == o.device && transa == o.transa && transb == o.transb && m == o.m && n == o.n &&
               k == o.k && lda == o.lda && ldb == o.ldb && ldd == o.ldd && aux_ld == o.aux_ld &&
               epilogue == o.epilogue && accumulate == o.accumulate && align_a == o.align_a &&
               align_b == o.align_b && align_c == o.align_c && align_d == o.align_d && align_bias == o.align_bias &&
               align_aux == o.align_aux && tuned == o.tuned;
    }
};

struct GemmKeyHash {
    size_t operator()(const GemmKey& key) const {
        uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
        auto mix = [&h](uint64_t v) {
            h ^= v;
            h *= 1099511628211ull;
        };
        mix(static_cast<uint64_t>(key.device) | (static_cast<uint64_t>(key.tuned) << 32));
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
std::vector<std::string> g_report;  // one line per algorithm choice made in this process
EnvSwitch g_tuning("GPT2CU_GEMM_TUNE", 1, 0);  // matmul_set_tuning: 1 tuned, 0 the heuristic's first

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
    void* D;
    const void* C;  // read when accumulate (beta = 1): D itself, or another matrix laid out as D
    bool accumulate;
    cublasLtEpilogue_t epilogue;
    const void* bias;  // BIAS epilogues
    void* aux;         // GELU_AUX (output) / DGELU (input) epilogues
    int64_t aux_ld;
};

bool mm_writes_aux(cublasLtEpilogue_t e) {
    return e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
}

std::string mm_context(const Gemm& g) {
    return "m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
           " transa=" + (g.transa == CUBLAS_OP_T ? "T" : "N") + " transb=" + (g.transb == CUBLAS_OP_T ? "T" : "N") +
           " lda=" + std::to_string(g.lda) + " ldb=" + std::to_string(g.ldb) + " ldd=" + std::to_string(g.ldd) +
           " epilogue=" + std::to_string(static_cast<int>(g.epilogue)) + " aux_ld=" + std::to_string(g.aux_ld) +
           " beta=" + (g.accumulate ? "1" : "0") + " align(A,B,C,D,bias,aux)=" + std::to_string(mm_alignment(g.A)) +
           "," + std::to_string(mm_alignment(g.B)) + "," + std::to_string(mm_alignment(g.C)) + "," +
           std::to_string(mm_alignment(g.D)) + "," + std::to_string(mm_alignment(g.bias)) + "," +
           std::to_string(mm_alignment(g.aux));
}

void mm_set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const void* value, size_t size,
                 const char* name, const char* who, const std::string& ctx) {
    mm_check_cublas(cublasLtMatmulDescSetAttribute(desc, attr, value, size), name, who, ctx);
}

void mm_set_aux(cublasLtMatmulDesc_t desc, void* aux, const char* who, const std::string& ctx) {
    mm_set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux),
                "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_POINTER)", who, ctx);
}

void mm_set_pointers(cublasLtMatmulDesc_t desc, const Gemm& g, const char* who, const std::string* ctx) {
    static const std::string empty;
    const std::string& c = ctx ? *ctx : empty;
    if (g.bias) {
        const void* bias = g.bias;
        mm_set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias),
                    "cublasLtMatmulDescSetAttribute(BIAS_POINTER)", who, c);
    }
    if (g.aux) mm_set_aux(desc, g.aux, who, c);
}

// ---- the cache file of algorithm choices ---------------------------------------------------------
// One line per choice: key <TAB> the algorithm's 64 bytes in hex <TAB> how it was chosen. cuBLASLt
// documents cublasLtMatmulAlgo_t as serializable for reuse with the same library version (in the key);
// a stored algorithm is still checked (cublasLtMatmulAlgoCheck) before use.

std::string mm_cache_path() {
    const char* env = std::getenv("GPT2CU_GEMM_CACHE");
    if (env && *env) return env;
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    if (xdg && *xdg) return std::string(xdg) + "/gpt2cu/gemm-algos.txt";
    const char* home = std::getenv("HOME");
    if (home && *home) return std::string(home) + "/.cache/gpt2cu/gemm-algos.txt";
    return "";
}

void mm_make_parent_dirs(const std::string& path) {
    for (size_t i = path.find('/', 1); i != std::string::npos; i = path.find('/', i + 1))
        mkdir(path.substr(0, i).c_str(), 0755);  // existing directories: EEXIST, ignored
}

// An exclusive flock on <path>.lock for the read-choose-write of one entry (released on destruction).
struct CacheLock {
    int fd = -1;
    explicit CacheLock(const std::string& path) {
        mm_make_parent_dirs(path);
        fd = open((path + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0 && flock(fd, LOCK_EX) != 0) {
            close(fd);
            fd = -1;
        }
    }
    ~CacheLock() {
        if (fd >= 0) close(fd);  // releases the lock
    }
    bool ok() const { return fd >= 0; }
};

std::map<std::string, std::string> mm_cache_read(const std::string& path) {  // key -> rest of the line
    std::map<std::string, std::string> entries;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
        const size_t tab = line.find('\t');
        if (line.empty() || line[0] == '#' || tab == std::string::npos) continue;
        entries[line.substr(0, tab)] = line.substr(tab + 1);
    }
    return entries;
}

bool mm_cache_write(const std::string& path, const std::map<std::string, std::string>& entries) {
    const std::string tmp = path + ".tmp." + std::to_string(getpid());
    {
        std::ofstream out(tmp, std::ios::trunc);
        out << "# gpt2cu cuBLASLt algorithm choices (kernels/matmul.cu): key\talgorithm (hex)\thow chosen\n";
        for (const auto& e : entries) out << e.first << '\t' << e.second << '\n';
        out.flush();
        if (!out) {
            std::remove(tmp.c_str());
            return false;
        }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        return false;
    }
    return true;
}

std::string mm_algo_hex(const cublasLtMatmulAlgo_t& algo) {
    static const char* digits = "0123456789abcdef";
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&algo);
    std::string s;
    for (size_t i = 0; i < sizeof(algo); i++) {
        s += digits[p[i] >> 4];
        s += digits[p[i] & 15];
    }
    return s;
}

bool mm_algo_from_hex(const std::string& s, cublasLtMatmulAlgo_t* algo) {
    if (s.size() < 2 * sizeof(*algo)) return false;
    unsigned char* p = reinterpret_cast<unsigned char*>(algo);
    for (size_t i = 0; i < sizeof(*algo); i++) {
        unsigned v = 0;
        if (std::sscanf(s.c_str() + 2 * i, "%2x", &v) != 1) return false;
        p[i] = static_cast<unsigned char>(v);
    }
    return true;
}

// "NVIDIA_H200 cc9.0 132sm cublasLt=130100": the part of a cache key that names the GPU and library.
std::string mm_device_text(int device, const char* who) {
    cudaDeviceProp prop{};
    mm_check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties", who);
    std::string name = prop.name;
    std::replace(name.begin(), name.end(), ' ', '_');
    return name + " cc" + std::to_string(prop.major) + "." + std::to_string(prop.minor) + " " +
           std::to_string(prop.multiProcessorCount) + "sm cublasLt=" + std::to_string(cublasLtGetVersion());
}

std::string mm_cache_key(const GemmKey& k, int device, const char* who) {
    std::ostringstream s;
    s << mm_device_text(device, who) << " op=" << (k.transa == CUBLAS_OP_T ? 'T' : 'N')
      << (k.transb == CUBLAS_OP_T ? 'T' : 'N') << " m=" << k.m << " n=" << k.n << " k=" << k.k << " ld=" << k.lda
      << "," << k.ldb << "," << k.ldd << "," << k.aux_ld << " epilogue=" << k.epilogue << " beta=" << k.accumulate
      << " align=" << k.align_a << "," << k.align_b << "," << k.align_c << "," << k.align_d << "," << k.align_bias
      << "," << k.align_aux << " splitk=checked";  // choices recorded before the split-K check are not reused
    return s.str();
}

// ---- choosing among the heuristic's candidates ---------------------------------------------------

struct Candidate {
    cublasLtMatmulAlgo_t algo;
    size_t workspace;
};

// The heuristic's candidates (best first) that fit the workspace.
std::vector<Candidate> mm_candidates(cublasLtHandle_t handle, const GemmPlan& plan, const GemmKey& key, int count,
                                     const char* who, const std::string& ctx) {
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
    std::vector<cublasLtMatmulHeuristicResult_t> results(count);
    int returned = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, pref, count,
                                                       results.data(), &returned);
    cublasLtMatmulPreferenceDestroy(pref);
    mm_check_cublas(st, "cublasLtMatmulAlgoGetHeuristic", who, ctx);
    std::vector<Candidate> out;
    for (int i = 0; i < returned; i++)
        if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= kWorkspaceBytes)
            out.push_back({results[i].algo, results[i].workspaceSize});
    if (out.empty()) {
        mm_fail(std::string(who) + ": cublasLtMatmulAlgoGetHeuristic found no algorithm for this matmul (within 32 "
                                   "MiB of workspace) [" + ctx + "]");
    }
    return out;
}

// Microseconds per call of each candidate (infinity for one that fails to launch), or an empty vector
// when the scratch outputs cannot be allocated. Runs on `stream` and waits for it.
std::vector<float> mm_time_candidates(cublasLtHandle_t handle, GemmPlan& plan, const Gemm& g,
                                      const std::vector<Candidate>& cands, void* workspace, cudaStream_t stream,
                                      const char* who, const std::string& ctx) {
    const size_t d_bytes = static_cast<size_t>(g.ldd) * g.n * 2;
    const size_t aux_bytes = mm_writes_aux(g.epilogue) ? static_cast<size_t>(g.aux_ld) * g.n * 2 : 0;
    void* scratch = nullptr;
    if (cudaMalloc(&scratch, d_bytes + aux_bytes) != cudaSuccess) {
        cudaGetLastError();  // clear the allocation failure
        return {};
    }
    void* d = scratch;
    const void* c = g.accumulate ? g.C : scratch;  // beta = 1 reads the real C, writes the scratch
    if (aux_bytes) mm_set_aux(plan.desc, static_cast<char*>(scratch) + d_bytes, who, ctx);
    const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
    auto launch = [&](const Candidate& cand) {
        return cublasLtMatmul(handle, plan.desc, &alpha, g.A, plan.a, g.B, plan.b, &beta, c, plan.c, d, plan.d,
                              &cand.algo, workspace, kWorkspaceBytes, stream);
    };
    const int n = static_cast<int>(cands.size());
    std::vector<float> us(n, 0.0f);
    std::vector<cudaEvent_t> events(2 * n * kTuneRounds + 2, nullptr);
    for (auto& e : events) mm_check_cuda(cudaEventCreate(&e), "cudaEventCreate", who);
    for (int i = 0; i < n; i++)  // warm-up; a candidate that cannot launch is out
        if (launch(cands[i]) != CUBLAS_STATUS_SUCCESS) us[i] = INFINITY;
    mm_check_cuda(cudaGetLastError(), "cublasLtMatmul (tuning launch)", who);
    // calls per timing: about kTuneRoundUs of the heuristic's first
    cudaEvent_t e0 = events[2 * n * kTuneRounds], e1 = events[2 * n * kTuneRounds + 1];
    mm_check_cuda(cudaEventRecord(e0, stream), "cudaEventRecord", who);
    launch(cands[0]);
    mm_check_cuda(cudaEventRecord(e1, stream), "cudaEventRecord", who);
    mm_check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize", who);
    float first_ms = 0.0f;
    mm_check_cuda(cudaEventElapsedTime(&first_ms, e0, e1), "cudaEventElapsedTime", who);
    const int reps = std::max(1, std::min(32, static_cast<int>(kTuneRoundUs / std::max(1e3f * first_ms, 1.0f))));
    for (int r = 0; r < kTuneRounds; r++)  // rounds interleave the candidates: clock drift hits them alike
        for (int i = 0; i < n; i++) {
            if (us[i] == INFINITY) continue;
            cudaEvent_t* e = &events[2 * (r * n + i)];
            mm_check_cuda(cudaEventRecord(e[0], stream), "cudaEventRecord", who);
            for (int j = 0; j < reps; j++) launch(cands[i]);
            mm_check_cuda(cudaEventRecord(e[1], stream), "cudaEventRecord", who);
        }
    mm_check_cuda(cudaGetLastError(), "cublasLtMatmul (tuning launch)", who);
    mm_check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (tuning)", who);
    for (int i = 0; i < n; i++) {
        if (us[i] == INFINITY) continue;
        float best = INFINITY;
        for (int r = 0; r < kTuneRounds; r++) {
            float ms = 0.0f;
            mm_check_cuda(cudaEventElapsedTime(&ms, events[2 * (r * n + i)], events[2 * (r * n + i) + 1]),
                          "cudaEventElapsedTime", who);
            best = std::min(best, 1e3f * ms / reps);
        }
        us[i] = best;
    }
    for (auto& e : events) cudaEventDestroy(e);
    mm_check_cuda(cudaFree(scratch), "cudaFree (tuning scratch)", who);
    return us;
}

// ---- split-K products checked --------------------------------------------------------------------
// cuBLASLt 13.1 (130100) on an H200 got some split-K products wrong: at k = 4097 each split-K 2 algorithm the
// heuristic offered for (m, n) = (256, 512), (512, 256) and (768, 768), beta = 1, returned sums off by 10 to 100
// times, in place or not, whatever the workspace held; split-K 3 there, and split-K 2 at k = 4096 and 5000, were
// right. So a split-K candidate is used only once its product on the call's own inputs matches the same tile's
// unsplit product. The check runs when a plan is made (not under graph capture: there split-K candidates are passed
// over); a choice in the cache file was checked when recorded (the cache key says so).

int mm_splitk(const cublasLtMatmulAlgo_t& algo) {
    int32_t splits = 1;
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits),
                                             &written) != CUBLAS_STATUS_SUCCESS)
        return 1;
    return splits;
}

// The reference for a split-K algorithm: the same tile unsplit, else the heuristic's first unsplit candidate.
bool mm_unsplit(cublasLtHandle_t handle, const GemmPlan& plan, const cublasLtMatmulAlgo_t& algo,
                const std::vector<Candidate>& cands, cublasLtMatmulAlgo_t* out) {
    cublasLtMatmulAlgo_t a = algo;
    int32_t one = 1;
    uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    cublasLtMatmulHeuristicResult_t check{};
    if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof(one)) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none, sizeof(none)) ==
            CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, &a, &check) ==
            CUBLAS_STATUS_SUCCESS &&
        check.workspaceSize <= kWorkspaceBytes) {
        *out = a;
        return true;
    }
    for (const Candidate& c : cands)
        if (mm_splitk(c.algo) == 1) {
            *out = c.algo;
            return true;
        }
    return false;
}

float mm_bf16_value(uint16_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

// Whether `algo` and `ref` give the same product on g's inputs, into scratch outputs. With beta = 1 the C they read is
// a zeroed scratch, so the product alone is compared (an accumulator much larger than it would hide its errors) on
// the same beta = 1 path. They differ by summation order and one bf16 rounding, a few ulps; a wrong product is off by
// far more than the bound, 2^-5 of |value| + the product's rms. -1: the check could not run (no memory for the
// scratch outputs) or proves nothing (a product of zeros).
int mm_products_agree(cublasLtHandle_t handle, GemmPlan& plan, const Gemm& g, const cublasLtMatmulAlgo_t& algo,
                      const cublasLtMatmulAlgo_t& ref, void* workspace, cudaStream_t stream, const char* who,
                      const std::string& ctx) {
    const size_t count = static_cast<size_t>(g.ldd) * g.n, d_bytes = count * 2;
    const size_t aux_bytes = mm_writes_aux(g.epilogue) ? static_cast<size_t>(g.aux_ld) * g.n * 2 : 0;
    char* scratch = nullptr;  // got, want, the zeroed C, the aux output
    if (cudaMalloc(reinterpret_cast<void**>(&scratch), 3 * d_bytes + aux_bytes) != cudaSuccess) {
        cudaGetLastError();  // clear the allocation failure
        return -1;
    }
    char* zeros = scratch + 2 * d_bytes;
    mm_check_cuda(cudaMemsetAsync(zeros, 0, d_bytes, stream), "cudaMemsetAsync (split-K check)", who);
    if (aux_bytes) mm_set_aux(plan.desc, scratch + 3 * d_bytes, who, ctx);
    const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
    std::vector<uint16_t> got(count), want(count);
    bool launched = true;
    for (int r = 0; r < 2; r++) {
        char* d = scratch + r * d_bytes;
        const void* c = zeros;
        launched = launched && cublasLtMatmul(handle, plan.desc, &alpha, g.A, plan.a, g.B, plan.b, &beta, c, plan.c,
                                              d, plan.d, r ? &ref : &algo, workspace, kWorkspaceBytes,
                                              stream) == CUBLAS_STATUS_SUCCESS;
    }
    mm_check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize (split-K check)", who);
    mm_check_cuda(cudaMemcpy(got.data(), scratch, d_bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (split-K check)", who);
    mm_check_cuda(cudaMemcpy(want.data(), scratch + d_bytes, d_bytes, cudaMemcpyDeviceToHost),
                  "cudaMemcpy (split-K check)", who);
    mm_check_cuda(cudaFree(scratch), "cudaFree (split-K check)", who);
    if (!launched) return 0;
    double squares = 0.0;
    size_t finite = 0;
    for (int64_t j = 0; j < g.n; j++)  // column j of D, col-major: m values, then ldd - m unwritten
        for (int64_t i = 0; i < g.m; i++) {
            const float v = mm_bf16_value(want[j * g.ldd + i]);
            if (std::isfinite(v)) {
                squares += static_cast<double>(v) * v;
                finite++;
            }
        }
    const double rms = finite ? std::sqrt(squares / finite) : 0.0;
    if (rms == 0.0) return -1;
    for (int64_t j = 0; j < g.n; j++)
        for (int64_t i = 0; i < g.m; i++) {
            const float a = mm_bf16_value(got[j * g.ldd + i]), b = mm_bf16_value(want[j * g.ldd + i]);
            if (!std::isfinite(a) || !std::isfinite(b)) {
                if (std::isfinite(a) != std::isfinite(b)) return 0;
                continue;
            }
            if (std::fabs(static_cast<double>(a) - b) > 0x1p-5 * (std::fabs(static_cast<double>(b)) + rms)) return 0;
        }
    return 1;
}

// Warned once per process: a choice that cannot be recorded is not made.
void mm_warn_no_cache(const std::string& path) {
    static bool warned = false;
    if (warned) return;
    warned = true;
    std::fprintf(stderr,
                 "gpt2cu matmul: cannot write the GEMM algorithm cache '%s' (set GPT2CU_GEMM_CACHE to a writable "
                 "file): using cuBLASLt's heuristic choice, untuned\n",
                 path.empty() ? "(no HOME)" : path.c_str());
}

// Sets plan.algo for a new plan; appends a line to g_report. Caller holds g_mutex.
void mm_choose(cublasLtHandle_t handle, GemmPlan& plan, const GemmKey& key, const Gemm& g, int device,
               cudaStream_t stream, const char* who, const std::string& ctx) {
    const std::string cache_key = mm_cache_key(key, device, who);
    std::vector<Candidate> cands = mm_candidates(handle, plan, key, kCandidates, who, ctx);
    const bool capturing = mm_is_capturing(stream, who);
    cublasLtMatmulAlgo_t unsplit{};
    bool any_unsplit = false;
    for (const Candidate& c : cands) any_unsplit = any_unsplit || mm_splitk(c.algo) == 1;
    if (!any_unsplit && mm_unsplit(handle, plan, cands[0].algo, cands, &unsplit))
        cands.push_back({unsplit, 0});  // every candidate splits k: the first's tile unsplit is the fallback

    // trusted[i]: 1 unsplit or checked, 0 passed over, -1 not yet looked at; `passed` says why, for the report
    std::vector<int> trusted(cands.size(), -1);
    std::string passed;
    auto trust = [&](int i) {
        if (trusted[i] < 0) {
            cublasLtMatmulAlgo_t ref{};
            int agree = 1;
            if (mm_splitk(cands[i].algo) != 1)
                agree = capturing || !mm_unsplit(handle, plan, cands[i].algo, cands, &ref)
                            ? -1
                            : mm_products_agree(handle, plan, g, cands[i].algo, ref,
                                                mm_workspace(device, stream, who), stream, who, ctx);
            trusted[i] = agree == 1;
            if (agree != 1)
                passed += "; split-K #" + std::to_string(i) +
                          (agree == 0 ? " disagreed with its unsplit product" : " not checked") + ", passed over";
        }
        return trusted[i] == 1;
    };
    auto first_trusted = [&]() {
        for (int i = 0; i < static_cast<int>(cands.size()); i++)
            if (trust(i)) return i;
        passed += "; none checked: the first taken";
        return 0;
    };
    auto heuristic_pick = [&](int i) {
        return i == 0 ? std::string("heuristic's first") : "heuristic's #" + std::to_string(i);
    };

    if (!key.tuned) {
        const int pick = first_trusted();
        plan.algo = cands[pick].algo;
        g_report.push_back(cache_key + "\tuntuned: " + heuristic_pick(pick) + passed);
        return;
    }
    if (cands.size() == 1) {
        plan.algo = cands[first_trusted()].algo;
        g_report.push_back(cache_key + "\tone candidate" + passed);
        return;
    }
    const std::string path = mm_cache_path();
    CacheLock lock(path);
    if (path.empty() || !lock.ok()) {
        mm_warn_no_cache(path);
        const int pick = first_trusted();
        plan.algo = cands[pick].algo;
        g_report.push_back(cache_key + "\tno cache file: " + heuristic_pick(pick) + passed);
        return;
    }
    std::map<std::string, std::string> entries = mm_cache_read(path);
    auto found = entries.find(cache_key);
    if (found != entries.end()) {
        cublasLtMatmulAlgo_t algo{};
        cublasLtMatmulHeuristicResult_t check{};
        if (mm_algo_from_hex(found->second, &algo) &&
            cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, &algo, &check) ==
                CUBLAS_STATUS_SUCCESS &&
            check.workspaceSize <= kWorkspaceBytes) {
            plan.algo = algo;
            g_report.push_back(cache_key + "\tfrom the cache: " + found->second.substr(found->second.find('\t') + 1));
            return;
        }
    }
    std::string how;
    int pick = 0;
    const int n = static_cast<int>(cands.size());
    if (capturing) {
        pick = first_trusted();
        how = "under graph capture: " + heuristic_pick(pick) + " of " + std::to_string(n);
    } else {
        std::vector<float> us =
            mm_time_candidates(handle, plan, g, cands, mm_workspace(device, stream, who), stream, who, ctx);
        if (us.empty()) {
            pick = first_trusted();
            how = "no memory for the scratch outputs: " + heuristic_pick(pick) + " of " + std::to_string(n);
        } else {
            // the fastest, if it beats the first trusted by kTuneMargin, else that first; split-K ones checked
            for (;;) {
                int first = -1, fastest = -1;
                for (int i = 0; i < n; i++) {
                    if (us[i] == INFINITY || trusted[i] == 0) continue;
                    if (first < 0) first = i;
                    if (fastest < 0 || us[i] < us[fastest]) fastest = i;
                }
                if (first < 0) {
                    pick = first_trusted();
                    break;
                }
                pick = us[fastest] < (1.0f - kTuneMargin) * us[first] ? fastest : first;
                if (trust(pick)) break;
            }
            char buf[160];
            std::snprintf(buf, sizeof(buf), "tuned: #%d of %d, %.1f us (heuristic's first %.1f us)", pick, n,
                          us[pick], us[0]);
            how = buf;
        }
    }
    how += passed;
    entries[cache_key] = mm_algo_hex(cands[pick].algo) + "\t" + how;
    plan.algo = cands[pick].algo;
    if (!mm_cache_write(path, entries)) {
        mm_warn_no_cache(path);
        pick = first_trusted();
        plan.algo = cands[pick].algo;
        g_report.push_back(cache_key + "\tcache not writable: " + heuristic_pick(pick) + passed);
        return;
    }
    g_report.push_back(cache_key + "\t" + how);
}

// Caller holds g_mutex.
GemmPlan& mm_plan(cublasLtHandle_t handle, int device, const Gemm& g, cudaStream_t stream, const char* who) {
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
                mm_alignment(g.C),
                mm_alignment(g.D),
                mm_alignment(g.bias),
                mm_alignment(g.aux),
                g_tuning.get()};
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
    mm_choose(handle, plan, key, g, device, stream, who, ctx);
    return g_plans.emplace(key, plan).first->second;
}

void mm_gemm(const Gemm& g, cudaStream_t stream, const char* who) {
    std::lock_guard<std::mutex> lock(g_mutex);
    int device = 0;
    mm_check_cuda(cudaGetDevice(&device), "cudaGetDevice", who);
    cublasLtHandle_t handle = mm_handle(device, stream, who);
    void* workspace = mm_workspace(device, stream, who);
    GemmPlan& plan = mm_plan(handle, device, g, stream, who);
    mm_set_pointers(plan.desc, g, who, nullptr);
    const float alpha = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
    cublasStatus_t st = cublasLtMatmul(handle, plan.desc, &alpha, g.A, plan.a, g.B, plan.b, &beta, g.C, plan.c, g.D,
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

// ---- the Hopper path ---------------------------------------------------------------------------
EnvSwitch g_sm90("GPT2CU_SM90_GEMM", 1, 0);  // matmul_set_sm90: 1 on, 0 off

#ifdef GPT2CU_HAVE_SM90_GEMM
// whether the epilogue GEMMs (GeLU, DGELU, head dot, residual) may take gemm_sm90.cu's kernel on the current device
// (the switch on, compute capability 9.x: cached per device)
bool mm_sm90(const char* who) {
    if (!g_sm90.get()) return false;
    constexpr int kMaxDevices = 64;
    static std::atomic<int> is_sm90[kMaxDevices];  // 0 unknown, 1 yes, 2 no
    int device = 0;
    mm_check_cuda(cudaGetDevice(&device), "cudaGetDevice", who);
    if (device >= kMaxDevices) return false;
    int known = is_sm90[device].load(std::memory_order_relaxed);
    if (known == 0) {
        int major = 0;
        mm_check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                      "cudaDeviceGetAttribute", who);
        known = major == 9 ? 1 : 2;
        is_sm90[device].store(known, std::memory_order_relaxed);
    }
    return known == 1;
}
#endif

// floats of scratch holding the weight (OC, C) transposed, bf16
size_t mm_transposed_weight_floats(int C, int OC) { return ((size_t)C * OC + 1) / 2; }
// floats of scratch the DGELU kernel's column sums of dinp (N, C) take, one row per row tile, after the weight
size_t mm_dgelu_colsum_floats(int N, int C) { return (size_t)gemm_sm90_row_tiles(N) * C; }

}  // namespace

bool matmul_sm90_active() {
#ifdef GPT2CU_HAVE_SM90_GEMM
    return mm_sm90("matmul_sm90_active");
#else
    return false;
#endif
}

size_t matmul_backward_scratch_floats(int N, int C, int OC, bool dbias, bool dgelu, bool dgelu_dbias) {
    dgelu = dgelu || dgelu_dbias;
    return std::max({dbias ? bias_backward_scratch_floats(N, OC) : size_t(0),
                     dgelu ? mm_transposed_weight_floats(C, OC) + (dgelu_dbias ? mm_dgelu_colsum_floats(N, C) : 0)
                           : size_t(0),
                     dgelu_dbias ? bias_backward_scratch_floats(N, C) : size_t(0)});  // cuBLASLt's path
}

void matmul_forward(bf16* out, bf16* gelu_pre, const bf16* inp, const bf16* weight, const bf16* bias,
                    const bf16* residual, int N, int C, int OC, cudaStream_t stream) {
    const char* who = "matmul_forward";
    mm_check_dims(N, C, OC, who);
    mm_require(out && inp && weight, who, "out, inp and weight must be non-null");
    mm_require(!(residual && gelu_pre), who, "residual and gelu_pre cannot both be given");
    if (residual && residual != out) {  // in place, or apart: both kernels read a tile of it before writing that tile
        const uintptr_t r = reinterpret_cast<uintptr_t>(residual), o = reinterpret_cast<uintptr_t>(out),
                        bytes = static_cast<uintptr_t>(N) * OC * sizeof(bf16);
        mm_require(r + bytes <= o || o + bytes <= r, who, "residual must be out itself or not overlap it");
    }
#ifdef GPT2CU_HAVE_SM90_GEMM
    if (residual && C <= kResidualSm90MaxK && mm_sm90(who) &&
        gemm_sm90_supported(N, OC, C, {out, inp, weight, bias, residual})) {
        gemm_residual_forward_sm90(out, inp, weight, bias, residual, N, OC, C, stream);
        return;
    }
#endif
    cublasLtEpilogue_t epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (gelu_pre) {
        mm_require(OC % 8 == 0, who,
                   "with gelu_pre, OC must be a multiple of 8 (cuBLASLt GELU aux ld), got OC=" + std::to_string(OC));
        mm_require(gelu_pre != out, who, "gelu_pre must not alias out");
        mm_require(reinterpret_cast<uintptr_t>(gelu_pre) % 16 == 0, who, "gelu_pre must be 16-byte aligned");
        epi = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
#ifdef GPT2CU_HAVE_SM90_GEMM
        if (mm_sm90(who) && gemm_sm90_supported(N, OC, C, {out, gelu_pre, inp, weight, bias})) {
            gemm_gelu_forward_sm90(out, gelu_pre, inp, weight, bias, N, OC, C, stream);
            return;
        }
#endif
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
    g.C = residual ? residual : out;
    g.accumulate = residual != nullptr;
    g.epilogue = epi;
    g.bias = bias;
    g.aux = gelu_pre;
    g.aux_ld = OC;
    mm_gemm(g, stream, who);
}

void matmul_backward(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp, const bf16* weight,
                     const bf16* dinp_gelu_pre, bf16* dinp_gelu_dbias, float* scratch, size_t scratch_floats, int N,
                     int C, int OC, cudaStream_t stream, float* dinp_head_dot, const bf16* head_dot_with,
                     int head_size, int T, bf16* gelu_of_pre) {
    const char* who = "matmul_backward";
    mm_check_dims(N, C, OC, who);
    mm_require(dout != nullptr, who, "dout must be non-null");
    mm_require(!dinp_gelu_dbias || (dinp && dinp_gelu_pre), who, "dinp_gelu_dbias needs dinp and dinp_gelu_pre");
    if (gelu_of_pre) {
        mm_require(dinp && dinp_gelu_pre && gelu_of_pre != dinp && gelu_of_pre != dinp_gelu_pre &&
                       reinterpret_cast<uintptr_t>(gelu_of_pre) % 16 == 0,
                   who, "gelu_of_pre needs dinp and dinp_gelu_pre, must alias neither, and be 16-byte aligned");
    }
    if (dinp_head_dot) {
        mm_require(dinp && head_dot_with && !dinp_gelu_pre, who,
                   "dinp_head_dot needs dinp and head_dot_with, and no dinp_gelu_pre");
        mm_require((head_size == 64 || head_size == 128) && C % head_size == 0 && T > 0 && N % T == 0 &&
                       reinterpret_cast<uintptr_t>(dinp_head_dot) % 4 == 0,
                   who, "dinp_head_dot: head_size 64 or 128 dividing C, T dividing N, 4-byte aligned");
        mm_require(scratch_floats >= mm_transposed_weight_floats(C, OC), who,
                   "scratch too small: matmul_backward_scratch_floats with the head-dot epilogue");
    }
    if (dinp) {
        mm_require(weight != nullptr, who, "weight must be non-null when dinp is computed");
        if (dinp_gelu_pre) {
            mm_require(C % 8 == 0, who,
                       "with dinp_gelu_pre, C must be a multiple of 8 (cuBLASLt DGELU aux ld), got C=" +
                           std::to_string(C));
            mm_require(static_cast<const void*>(dinp_gelu_pre) != static_cast<const void*>(dinp), who,
                       "dinp_gelu_pre must not alias dinp");
            mm_require(reinterpret_cast<uintptr_t>(dinp_gelu_pre) % 16 == 0, who,
                       "dinp_gelu_pre must be 16-byte aligned");
            mm_require(scratch_floats >= matmul_backward_scratch_floats(N, C, OC, false, true, dinp_gelu_dbias), who,
                       "scratch too small: matmul_backward_scratch_floats with the DGELU epilogue");
        }
        bool done = false;
#ifdef GPT2CU_HAVE_SM90_GEMM
        // dinp (N, C) = dout (N, OC) @ (W^T (C, OC))^T: the product's n = C, k = OC, W^T K-major; dinp's column sums
        // per row tile after the weight in the scratch
        if (dinp_gelu_pre && mm_sm90(who) &&
            gemm_sm90_supported(N, C, OC, {dinp, dout, dinp_gelu_pre, scratch, gelu_of_pre})) {
            bf16* wt = reinterpret_cast<bf16*>(scratch);
            float* colsums = dinp_gelu_dbias ? scratch + mm_transposed_weight_floats(C, OC) : nullptr;
            bf16_transpose(wt, weight, OC, C, stream);
            gemm_dgelu_sm90(dinp, colsums, dout, wt, dinp_gelu_pre, N, C, OC, stream, gelu_of_pre);
            if (dinp_gelu_dbias) bias_backward_finish(dinp_gelu_dbias, colsums, gemm_sm90_row_tiles(N), C, stream);
            done = true;
        }
        if (dinp_head_dot && mm_sm90(who) && gemm_sm90_supported(N, C, OC, {dinp, dout, head_dot_with, scratch})) {
            bf16* wt = reinterpret_cast<bf16*>(scratch);
            bf16_transpose(wt, weight, OC, C, stream);
            gemm_head_dot_sm90(dinp, dinp_head_dot, dout, wt, head_dot_with, N, C, OC, T, head_size, stream);
            done = true;
        }
#endif
        if (!done) {
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
            g.C = dinp;
            g.accumulate = false;
            g.epilogue = dinp_gelu_pre ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DEFAULT;
            g.bias = nullptr;
            g.aux = const_cast<bf16*>(dinp_gelu_pre);  // read only (DGELU input)
            g.aux_ld = dinp_gelu_pre ? C : 0;
            mm_gemm(g, stream, who);
            if (dinp_gelu_dbias) bias_backward(dinp_gelu_dbias, dinp, scratch, scratch_floats, N, C, stream);
            if (gelu_of_pre) gelu_forward(gelu_of_pre, dinp_gelu_pre, (size_t)N * C, stream);
            if (dinp_head_dot)
                attention_backward_preprocess(dinp_head_dot, dinp, head_dot_with, N / T, T, C / head_size, head_size,
                                              stream);
        }
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
        g.C = dweight;
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

int matmul_set_tuning(int mode) {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_tuning.set(mode < 0 ? mode : mode ? 1 : 0);
}

int matmul_set_sm90(int mode) {
    return g_sm90.set(mode < 0 ? mode : mode ? 1 : 0);
}

int matmul_set_sm90_cluster(int size) {
#ifdef GPT2CU_HAVE_SM90_GEMM
    return gemm_sm90_set_cluster(size);
#else
    mm_require(size == -1 || size == 1 || size == 2, "matmul_set_sm90_cluster", "1, 2, or -1 to ask");
    return 1;
#endif
}

std::string matmul_tuning_report() {
    std::lock_guard<std::mutex> lock(g_mutex);
    std::string out;
    for (const auto& line : g_report) out += line + "\n";
    return out;
}
