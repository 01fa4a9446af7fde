#!/usr/bin/env bash
# Text-only serving on the device (Step3-VL-10B's shapes, dummy weights, bf16): TTFT of one prompt at a time
# (64, 512 and 1536 input tokens), then a text throughput run (512 in / 256 out, uniform lengths as SGLang's
# random dataset draws them, 512 prompts at concurrency 64). One server per tree, so trees compare on one host.
#
#   usage (on the device, in a tree with .whl carried):  bash benchmarks/text_gpu.sh [TREE...]   (default: .)
#   SERVER_FLAGS: extra `launch_server` flags for every tree; results in $OUT/<tree name>/
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/device_env.sh
export PYTHONUNBUFFERED=1
MODEL_DIR=/tmp/step3-vl-10b-dummy
PYTHONPATH=$SITE_PATH:$PWD python3 -c "from stepserve.testing import real_dummy_checkpoint; real_dummy_checkpoint('$MODEL_DIR')"
for tree in "${@:-.}"; do
  name=$(basename "$(cd "$tree" && pwd)"); dir="$OUT/$name"; mkdir -p "$dir"
  (
    cd "$tree" || exit 1
    export PYTHONPATH=$SITE_PATH:$PWD
    python3 -m stepserve.launch_server --model "$MODEL_DIR" --load-format dummy --served-model-name stepfun-ai/Step3-VL-10B \
      --host 127.0.0.1 --port 30000 --context-length 32768 ${SERVER_FLAGS:-} > "$dir/server.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
    curl -sf localhost:30000/health >/dev/null || { echo "$name: server did not start"; tail -30 "$dir/server.log"; exit 1; }
    grep -E "ready|captured" "$dir/server.log" | head
    bench="python3 -m stepserve.bench_serving --backend sglang-oai-chat --host 127.0.0.1 --port 30000 \
      --model stepfun-ai/Step3-VL-10B --tokenizer $MODEL_DIR --dataset-name random --disable-tqdm"
    for n in 64 512 1536; do
      echo "== $name: one $n-token prompt at a time, 8 tokens out"
      $bench --random-input-len $n --random-output-len 8 --random-range-ratio 1 --num-prompts 20 \
        --max-concurrency 1 --seed $n 2>&1 | tee "$dir/ttft_$n.txt" | grep -E "Mean TTFT|Median TTFT"
    done
    echo "== $name: 512 in / 256 out, 512 prompts at concurrency 64"
    $bench --random-input-len 512 --random-output-len 256 --num-prompts 512 --max-concurrency 64 2>&1 \
      | tee "$dir/throughput.txt" | grep -E "Request throughput|Output token throughput|Mean TTFT|Mean TPOT"
    kill -INT $server; wait $server
  )
done
