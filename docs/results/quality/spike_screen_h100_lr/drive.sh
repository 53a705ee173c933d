#!/bin/bash
# Session 50's hold (one H100, 2026-12-07): the VAE and CLIP stages at their defaults (on an H100 the VAE and CLIP
# of recolour_run/ and spike_screen_h100/ to the digit), then the spike screen of two lower peak learning rates,
# two UNet seeds each, the stage's rollback off. The plain recipe (4e-4) on the same stages and seeds is
# spike_screen_h100/'s. A full run did not fit: six failed starts and one refused call had taken 645 of the
# session's 1,800 device seconds.
cd "$(dirname "$0")/.."  # it ran from .devrun/, so this is the checkout's root
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): plan screen" >>$LOG
python -m vae.train --data .data/pokemon --out runs/S/vae > $R/out/S_vae.log 2>&1
echo "S_VAE_DONE rc=$? $(el) s" >>$LOG
python -m clip.train --data .data/pokemon --out runs/S/clip > $R/out/S_clip.log 2>&1
echo "S_CLIP_DONE rc=$? $(el) s" >>$LOG
python -m benchmarks.spike_screen --data .data/pokemon --vae runs/S/vae --clip runs/S/clip --out $R/out/spike \
  --steps 300 --seeds 0 1 --concurrent 2 --setting "lr3e4: --lr=3e-4" --setting "lr2e4: --lr=2e-4" \
  > $R/out/screen.log 2>&1
echo "SCREEN_DONE rc=$? $(el) s" >>$LOG
echo "FINISHED $(el) s" >>$LOG
