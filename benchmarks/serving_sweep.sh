#!/usr/bin/env bash
# Serving benchmark sweep: start a server on the embedded model's weights, then `kestrel bench` on two
# workloads at three request rates. Results: benchmarks/results/<server>-serving-<workload>-<rate>.json
#   benchmarks/serving_sweep.sh                                   # Kestrel
#   VLLM_PYTHON=/path/to/vllm-env/bin/python benchmarks/serving_sweep.sh vllm   # the same against vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-kestrel}
port=${PORT:-30555}
rates=${RATES:-"1 3 8"}
n=${NUM_REQUESTS:-48}
mkdir -p benchmarks/results
if [[ $target == vllm ]]; then
  model_dir=$(.venv/bin/python -c "from kestrel.model.loader import resolve_model_dir; print(resolve_model_dir(None))")
  HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "${VLLM_PYTHON:?set VLLM_PYTHON to the python of a vLLM environment}" -m vllm.entrypoints.openai.api_server \
    --model "$model_dir" --served-model-name default --port "$port" --dtype bfloat16 --max-model-len 2048 \
    --enable-prefix-caching &
else
  .venv/bin/kestrel serve --port "$port" &
fi
server=$!
trap 'kill -TERM $server; wait $server || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "$target server exited"; exit 1; }
  sleep 2
done
for workload in shared-prefix random; do
  for rate in $rates; do
    echo "== $target $workload @ $rate req/s"
    .venv/bin/kestrel bench --base-url "http://127.0.0.1:$port" --workload "$workload" --num-requests "$n" \
      --request-rate "$rate" --input-len 256 --output-len 64 --system-prompt-len 512 --question-len 32 \
      --num-groups 4 --slo-ttft 2 --slo-tpot 0.25 --output "benchmarks/results/$target-serving-$workload-$rate.json" \
      2>/dev/null
  done
done
