#!/usr/bin/env bash
# Set up a local virtual environment (once) and run a mimkit job in it.
#   bash run.sh demo            pretrain the CPU demo recipe and draw its reconstructions
#   bash run.sh test            lint and run the whole test suite
#   bash run.sh python ARGS...  any command inside the environment
set -euo pipefail
cd "$(dirname "$0")"

VENV="${MIMKIT_VENV:-.venv}"
PY="$VENV/bin/python"
stamp="$VENV/.mimkit-installed"
want="$(cat setup.py | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$PY" ]]; then
  echo "[mimkit] creating $VENV"
  python3 -m venv "$VENV"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[mimkit] installing mimkit and its dependencies into $VENV (a few minutes the first time)"
  # (the grep drops pip's notes about local index folders that some machines configure but lack)
  "$PY" -m pip install --quiet --upgrade pip 2> >(grep -v "is neither a file nor a directory" >&2)
  # DeepSpeed's CUDA/C++ ops are compiled on first use on GPUs; nothing is built at install time.
  DS_BUILD_OPS=0 "$PY" -m pip install --quiet -e ".[dev]" 2> >(grep -v "is neither a file nor a directory" >&2)
  echo "$want" > "$stamp"
fi
export PYTHONUNBUFFERED=1

job="${1:-}"
shift || true
case "$job" in
  demo)
    run_dir="${MIMKIT_DEMO_DIR:-runs/demo}"
    "$PY" tools/pretrain.py recipes/demo/mae_vit_tiny.yaml "run.dir=$run_dir" "$@"
    "$PY" tools/visualize.py recon "$run_dir"
    "$PY" tools/visualize.py curves "$run_dir"
    # the pretrained encoder next to a random init of its shape: k-NN, the cached linear probe and
    # in-context (Hummingbird-style) dense retrieval segmentation, ending with a table of the gains;
    # on synthetic:textures, the set the demo trains on (synthetic:shapes stays available by its URI)
    "$PY" tools/compare_random.py --encoder "$run_dir" --train "synthetic:textures?size=64&train=1000&val=500" \
      --seg "synthetic:textures?size=64&train=256&val=128" --json "$run_dir/eval.json"
    ;;
  test)
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$PY" -m pytest "$@"
    ;;
  python)
    "$PY" "$@"
    ;;
  *)
    echo "usage: bash run.sh {demo|test|python ARGS...}" >&2
    exit 2
    ;;
esac
