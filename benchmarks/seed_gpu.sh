#!/usr/bin/env bash
# One device call: GPU tests, kernel micro-benchmarks, the seed's two bench_serving commands against
# `stepserve serve --load-format dummy` at Step3-VL-10B's real shapes, the transformers peer, the vision
# tower and prefill micro-benchmarks. Results land in $OUT (logs, JSONL, JSON); benchmarks/seed_report.py
# then writes $OUT/summary.json and $OUT/summary.md (every target, measured, met or not) and prints the table.
#
#   usage (on the device, repo root, with .whl carried):  bash benchmarks/seed_gpu.sh [STAGES]
#   STAGES: comma list of tests,kernels,ttft,latency,throughput,peer,vision,prefill (default: all)
#   NUM_PROMPTS_TP: prompts for the throughput run (default 1000)
#   SERVER_FLAGS: extra `launch_server` flags (e.g. "--quantization fp8 --kv-cache-dtype fp8_e4m3 --quantize-vision");
#     the vision stage benchmarks the tower the way that server runs it
set -uo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${1:-tests,kernels,ttft,latency,throughput,peer,vision,prefill}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
source benchmarks/device_env.sh
export PYTHONPATH=$SITE_PATH:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# The commit of this tree: a `git archive` copy inside another checkout must not report that checkout's HEAD.
if [[ "$(git rev-parse --show-toplevel 2>/dev/null)" == "$PWD" ]]; then git rev-parse --short HEAD; else
  echo "${COMMIT:-unknown: not a git checkout (set COMMIT)}"; fi | tee "$OUT/commit.txt"
echo "${SERVER_FLAGS:-}" > "$OUT/server_flags.txt"

if has tests; then
  python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
fi
if has kernels; then
  python3 benchmarks/kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -30
fi

MODEL_DIR=/tmp/step3-vl-10b-dummy
python3 -c "from stepserve.testing import real_dummy_checkpoint; real_dummy_checkpoint('$MODEL_DIR')"
if has ttft; then
  python3 benchmarks/ttft_breakdown.py --model-dir "$MODEL_DIR" 2>&1 | grep -v Loading | tee "$OUT/ttft.txt" | tail -3
fi
BENCH="python3 -m stepserve.bench_serving --backend sglang-oai-chat --host 127.0.0.1 --port 30000 \
  --model stepfun-ai/Step3-VL-10B --tokenizer $MODEL_DIR --dataset-name image --image-count 2 \
  --image-resolution 720p --random-input-len 128 --random-output-len 1024 --disable-tqdm --output-details"
if has latency || has throughput; then
  # TORCH_LOGS: a torch.compile recompile while serving (a user waits for it) shows in the server log.
  TORCH_LOGS=${TORCH_LOGS:-recompiles} python3 -m stepserve.launch_server --model "$MODEL_DIR" --load-format dummy --served-model-name stepfun-ai/Step3-VL-10B \
    --host 127.0.0.1 --port 30000 --context-length 32768 ${SERVER_FLAGS:-} > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do curl -sf localhost:30000/health >/dev/null && break; sleep 1; done
  curl -sf localhost:30000/health >/dev/null || { echo "server did not start"; tail -50 "$OUT/server.log"; exit 1; }
  grep -E "ready|KV cache|captured|loaded" "$OUT/server.log" | head
  if has latency; then
    $BENCH --num-prompts 10 --max-concurrency 1 --output-file "$OUT/bench.jsonl" 2>&1 | tee "$OUT/latency.txt"
  fi
  if has throughput; then
    $BENCH --num-prompts "${NUM_PROMPTS_TP:-1000}" --max-concurrency 100 --output-file "$OUT/bench.jsonl" 2>&1 \
      | tee "$OUT/throughput.txt"
    python3 benchmarks/itl_stalls.py "$OUT/bench.jsonl" --server-log "$OUT/server.log" 2>&1 | tee "$OUT/itl_stalls.txt"
  fi
  curl -s localhost:30000/metrics > "$OUT/metrics.txt"
  kill -INT $SERVER; wait $SERVER
fi
if has peer; then
  python3 benchmarks/transformers_peer.py 2>&1 | tee "$OUT/peer.txt" | tail -5
fi
if has vision; then
  VISION_FLAGS="--compile --kernels"
  [[ " ${SERVER_FLAGS:-} " == *" --quantize-vision "* ]] && VISION_FLAGS="$VISION_FLAGS --quantize-vision"
  python3 benchmarks/vision_tower.py $VISION_FLAGS 2>&1 | tee "$OUT/vision.txt" | tail -10
fi
if has prefill; then
  python3 benchmarks/prefill.py 2>&1 | tee "$OUT/prefill.txt" | tail -10
fi
echo
python3 benchmarks/seed_report.py "$OUT"
