#!/usr/bin/env bash
# The main job, on a fresh machine: sets up .venv (scripts/setup_env.sh), trains the tiny SPHINX-X
# preset (a Mixtral-style MoE decoder, small timm encoders) on the demo data (scikit-image's
# photographs with multi-turn dialogues about them, and text-only dialogues) until the loss has
# fallen, then asks the trained model a question about a demo photograph.
#
# Outputs under $OUTPUT (default runs/demo): metrics.jsonl, loss.png, checkpoints/, final/.
# Extra arguments go to sphinx-train (e.g. --steps 100). On a GPU machine it trains on the GPU.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
out="${OUTPUT:-runs/demo}"
python -m sphinx_model.train --preset tiny --data demo --steps 300 --batch-size 8 --token-budget 1024 \
    --output "$out" "$@"
photo="$(python -m sphinx_model.demo --photo cat)"
echo
echo "Q (about $photo): What animal is this?"
python -m sphinx_model.chat --checkpoint "$out/final" --image "$photo" \
    "What animal is this?"
