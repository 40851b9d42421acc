#!/usr/bin/env bash
# One line naming this machine's CPU and the instruction sets that change what compiled runtimes run (AMX, bf16).
set -euo pipefail
model=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(amx_|avx512_bf16|avx512f$|avx2$)' | sort | tr '\n' ' ')
echo "cpu: ${model:-unknown}, $(nproc) cores; flags: ${flags:-none of amx_*, avx512_bf16, avx512f, avx2}"
