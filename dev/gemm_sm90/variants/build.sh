# Builds lib_<variant>.so of gemm_sm90.cu with one sed edit each (of gemm_sm90.cu, gemm_sm90.h, sm90_common.cuh) for ab.py: the Exp epilogue's tile order, its exp2,
# its row sums; the DGelu epilogue without its pre loads (stale panels read) or without gelu' (out = acc * pre).
# Run from the repo root: bash dev/gemm_sm90/variants/build.sh [variant ...] (default: all); then
#   python3 dev/gemm_sm90/variants/ab.py main,rowmajor,noexp,nosum        (the LM head's and fc's shapes)
#   python3 dev/gemm_sm90/variants/ab.py main,nopre,nogradmath dgelu      (fc's shape, the DGelu variants)
#   python3 dev/gemm_sm90/variants/energy.py main,plain,nostore            (energy per FLOP, sustained)
set -e
D=${AB_DIR:-/tmp/gemm_sm90_variants}; mkdir -p $D
build() {  # name sed-expr
  mkdir -p $D/src_$1 && cp kernels/*.cu kernels/*.cuh kernels/*.h $D/src_$1/
  if [ -n "$2" ]; then sed -i "$2" $D/src_$1/gemm_sm90.cu $D/src_$1/gemm_sm90.h $D/src_$1/sm90_common.cuh; fi
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
     -I $D/src_$1 $D/src_$1/gemm_sm90.cu dev/gemm_sm90/variants/wrap.cu -o $D/lib_$1.so
}
want() { [ -z "$VARIANTS" ] || [[ " $VARIANTS " == *" $1 "* ]]; }
VARIANTS="$*"
want main && build main ""
# the Gelu and Exp epilogues on 128-column tiles where 192 would divide N
want n128 && build n128 's/return N % 192 == 0 ? 192 : 128;/return 128;/'
# 192-wide tiles with 40 / 232 registers (producer / consumers) instead of 24 / 240; the first product overwriting the
# accumulators in every epilogue but Gelu's (not only DGelu's)
want regs40 && build regs40 's/kProducerRegs = kBN == 128 ? 40 : 24, kConsumerRegs = kBN == 128 ? 232 : 240;/kProducerRegs = 40, kConsumerRegs = 232;/'
want overwrite && build overwrite 's/constexpr bool kOverwrite = kEpi == Epi::DGelu;/constexpr bool kOverwrite = kEpi != Epi::Gelu;/'
want rowmajor && build rowmajor 's/constexpr bool kMInner = kEpi == Epi::Exp;/constexpr bool kMInner = false;/'
want noexp && build noexp 's/float x\([01]\) = fast_exp2(/float x\1 = (/'
want nosum && build nosum 's/rowsum\[h\] += x0 + x1;//'
# the Exp epilogue reduced to a plain product's (no exp2, no row sums), then also without the tile's stores
want plain && build plain 's/float x\([01]\) = fast_exp2(/float x\1 = (/; s/rowsum\[h\] += x0 + x1;//'
# the epilogue's TMA stores (and pre loads) with L2's normal eviction priority instead of evict-first
want evictnormal && build evictnormal 's/createpolicy.fractional.L2::evict_first.b64/createpolicy.fractional.L2::evict_normal.b64/'
# the tile's stores of only half its panels (does the stores' cost scale with their bytes?)
want halfstore && build halfstore '/auto store_tile/,/bulk_commit/ s/p < 4/p < 2/'
# plain with row-major tiles: a plain product's epilogue (a proxy for a bias one) at shapes whose A does not stay in L2
want plainrow && build plainrow 's/float x\([01]\) = fast_exp2(/float x\1 = (/; s/rowsum\[h\] += x0 + x1;//; s/constexpr bool kMInner = kEpi == Epi::Exp;/constexpr bool kMInner = false;/'
want nostore && build nostore 's/float x\([01]\) = fast_exp2(/float x\1 = (/; s/rowsum\[h\] += x0 + x1;//; s/store_tile(m0, n0);//'
# the DGelu (and HeadDot) epilogue with no pre: no TMA loads of it, no wait for them (the panels' stale contents read)
want nopre && build nopre '/mbar_arrive_expect_tx(&pre_full\[cw\], kEpiBytes);/,+4d; s/mbar_wait(&pre_full\[cw\], it \& 1);//'
# the DGelu epilogue with out = acc * pre in place of acc * gelu'(pre)
want nogradmath && build nogradmath 's/pack_bf16x2(a0 \* gelu_grad(x.x), a1 \* gelu_grad(x.y))/pack_bf16x2(a0 * x.x, a1 * x.y)/'
true  # (a variant not asked for leaves its test's status behind)
