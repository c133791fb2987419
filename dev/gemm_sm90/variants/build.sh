# Builds lib_<variant>.so of gemm_sm90.cu with one sed edit each (the Exp epilogue's tile order, its exp2, its row sums) for ab.py.
# Run from the repo root: bash dev/gemm_sm90/variants/build.sh; python3 dev/gemm_sm90/variants/ab.py main,rowmajor,noexp,nosum
set -e
D=${AB_DIR:-/tmp/gemm_sm90_variants}; mkdir -p $D
build() {  # name sed-expr
  mkdir -p $D/src_$1 && cp kernels/*.cu kernels/*.cuh kernels/*.h $D/src_$1/
  if [ -n "$2" ]; then sed -i "$2" $D/src_$1/gemm_sm90.cu; fi
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
     -I $D/src_$1 $D/src_$1/gemm_sm90.cu dev/gemm_sm90/variants/wrap.cu -o $D/lib_$1.so
}
build main ""
build rowmajor 's/constexpr bool kMInner = kEpi == Epi::Exp;/constexpr bool kMInner = false;/'
build noexp 's/float x\([01]\) = fast_exp2(/float x\1 = (/'
build nosum 's/rowsum\[h\] += x0 + x1;//'
