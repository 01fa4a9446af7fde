# Sourced by the device scripts (seed_gpu.sh, text_gpu.sh): installs the wheels carried in .whl into /tmp/site
# and sets SITE_PATH, the PYTHONPATH entries that go before a tree's own directory.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
SITE_PATH=/tmp/site
# The fa4 extra installed with --target: its .pth (which puts CUTLASS's DSL on the path) is not read there.
if [[ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]]; then SITE_PATH+=:/tmp/site/nvidia_cutlass_dsl/dsl_packages; fi
