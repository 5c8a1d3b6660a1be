#!/usr/bin/env bash
# GPU check for the ONNX Runtime engine. Run on a machine with an NVIDIA GPU
# and an ONNX Runtime *GPU* build (libonnxruntime.so with
# libonnxruntime_providers_cuda.so / _tensorrt.so beside it):
#
#   ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.31.1 scripts/gpu-check.sh
#
# It runs the ort-vs-tract parity test through the CUDA provider, and through
# TensorRT when its provider library is present, then the engine benchmark
# with the GPU providers first. A provider that cannot load makes the parity
# test fail (the engine label must name the provider asked for), so a silent
# CPU fallback cannot pass as a GPU result.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: no NVIDIA driver here" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to an ONNX Runtime GPU build}"
libdir=$(dirname "$ORT_DYLIB_PATH")
ls "$libdir"/libonnxruntime_providers_* 2>/dev/null || true

providers=()
[ -e "$libdir/libonnxruntime_providers_cuda.so" ] && providers+=(cuda)
[ -e "$libdir/libonnxruntime_providers_tensorrt.so" ] && providers+=(tensorrt)
if [ ${#providers[@]} -eq 0 ]; then
  echo "gpu-check: $libdir has no CUDA or TensorRT provider library: this is a CPU-only ONNX Runtime" >&2
  echo "gpu-check: running the CPU parity test and the fallback test instead" >&2
  cargo test --release --test engines -- --nocapture ort_cpu_and_tract_agree tensorrt_and_cuda_requested_without_a_gpu_fall_back_visibly
  PROVIDERS=cpu REPS=3 cargo bench --bench engines
  exit 0
fi

for p in "${providers[@]}"; do
  echo "== parity ort/$p vs tract"
  PETRESTORE_ORT_PROVIDERS=$p cargo test --release --test engines -- --nocapture ort_cpu_and_tract_agree
done
first=${providers[-1]}
echo "== engine benchmark, providers $first,cpu"
PROVIDERS="$first,cpu" REPS=3 cargo bench --bench engines
