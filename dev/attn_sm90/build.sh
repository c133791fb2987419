#!/bin/bash
# builds dev/attn_sm90/libattn.so from kernels/attention*.cu (+ bias.cu: the backward's bias gradient off Hopper) (run from the repository root)
set -e
NVCC=${NVCC:-nvcc}
OUTDIR=${1:-dev/attn_sm90}
F="${EXTRA_FLAGS} -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC -Ikernels"
$NVCC $F -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -c kernels/attention_sm90.cu -o $OUTDIR/attention_sm90.o 2> $OUTDIR/ptxas_sm90.txt || { cat $OUTDIR/ptxas_sm90.txt; exit 1; }
$NVCC $F -DGPT2CU_HAVE_SM90_ATTENTION -gencode=arch=compute_90,code=sm_90 -c kernels/attention.cu -o $OUTDIR/attention.o
$NVCC $F -gencode=arch=compute_90,code=sm_90 -c kernels/bias.cu -o $OUTDIR/bias.o
$NVCC $F -gencode=arch=compute_90,code=sm_90 -c dev/attn_sm90/harness.cu -o $OUTDIR/harness.o
$NVCC -shared -o $OUTDIR/libattn.so $OUTDIR/attention_sm90.o $OUTDIR/attention.o $OUTDIR/bias.o $OUTDIR/harness.o
grep -i "registers\|spill\|warn" $OUTDIR/ptxas_sm90.txt | sort | uniq -c | head -20
