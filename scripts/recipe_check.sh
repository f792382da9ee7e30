#!/usr/bin/env bash
# The README's "Your data with official SAM" recipe, end to end, with stand-ins for what users download:
# a vit_b SAM checkpoint with random weights saved exactly as Meta's .pth (a state_dict), an open_clip
# ViT-B-16 weights file with random weights (~600 MB), and synthetic shadow pictures laid out as SBU.
# The commands are the README's, with a short training run (1 PPO iteration of 60 steps).
#   bash scripts/recipe_check.sh [WORK_DIR]        (about 5 minutes on 2 CPU cores; nothing downloaded)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_venv.sh dev  # (the [dev] extras; not this script's arguments)
WORK=$(realpath -m "${1:-/tmp/alignsam_recipe}")
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"

python - <<'EOF'
import os, shutil, torch, open_clip
from segment_anything import sam_model_registry
from alignsam_ray.data import generate_task

torch.manual_seed(0)
torch.save(sam_model_registry["vit_b"]().state_dict(), "sam_vit_b_01ec64.pth")
torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), "open_clip_vit_b16.bin")
src = generate_task("synthetic_shadow", "synthetic", n_train=4, n_test=2, seed=0, progress=False)
for split, folder in (("train", "SBUTrain4KRecoveredSmall"), ("test", "SBU-Test")):
    for kind, sbu in (("images", "ShadowImages"), ("masks", "ShadowMasks")):
        os.makedirs(f"data/SBU/{folder}/{sbu}", exist_ok=True)
        for name in os.listdir(f"{src}/{split}/{kind}"):
            ext = ".jpg" if kind == "images" else ".png"
            from PIL import Image
            Image.open(f"{src}/{split}/{kind}/{name}").save(f"data/SBU/{folder}/{sbu}/{os.path.splitext(name)[0]}{ext}")
shutil.copy(f"{src}/test/images/{sorted(os.listdir(f'{src}/test/images'))[0]}", "photo.png")
print("stand-ins ready:", sorted(os.listdir(".")))
EOF

step() { local t0=$SECONDS; echo "\$ $*"; "$@"; echo "[recipe] $1 $2: $((SECONDS - t0)) s"; }
step alignsam embed --data sbu:data/SBU --sam vit_b --checkpoint sam_vit_b_01ec64.pth --out stores/shadow \
    --clip-model ViT-B-16 --clip-weights open_clip_vit_b16.bin
step alignsam train --store stores/shadow train.iterations=1 ppo.train_batch_size=60 ppo.minibatch_size=30 \
    resources.num_env_runners=1
step alignsam evaluate --checkpoint runs/shadow --out eval/shadow
step alignsam export --checkpoint runs/shadow --out bundles/shadow
step alignsam segment photo.png --bundle bundles/shadow --sam-checkpoint sam_vit_b_01ec64.pth --out masks/ \
    --clip-weights open_clip_vit_b16.bin
ls masks/
echo "[recipe] the README's recipe ran end to end in $WORK"
