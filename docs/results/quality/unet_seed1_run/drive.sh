#!/bin/bash
# Session 41's hold, by the GPU kind the hold is given:
# - an H200: the default with --unet.keep_colour_sentence=true (every clause-dropped caption variant keeps the
#   colour sentence); VAE, CLIP and judge repeat default_run7's bit for bit, so the pair differs in the UNet's
#   caption variants alone.
# - an H100: the plain default with --unet.train.seed=1: VAE, CLIP and judge repeat recolour_run's bit for bit and
#   only the UNet's draw (init, batches, noise) changes: is the 15-point colour gap between kinds within the
#   UNet's own run-to-run spread?
# Then its sweep (the generation default, two seed sets; guidance 5.5), then clip_colours on its CLIP and judge.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  echo "KIND H200: keep colour sentence" >>$LOG
  python train_all.py --data .data/pokemon --run runs/A --unet.keep_colour_sentence=true > $R/out/A.log 2>&1
else
  echo "KIND H100: unet seed 1" >>$LOG
  python train_all.py --data .data/pokemon --run runs/A --unet.train.seed=1 > $R/out/A.log 2>&1
fi
echo "A_DONE rc=$? $(el) s" >>$LOG
[ -z "$NO_SWEEP" ] && python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
  --guidance 4 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 \
  --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
[ -z "$NO_SWEEP" ] && python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A55.json \
  --guidance 5.5 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 > $R/out/sweep_A55.log 2>&1
echo "SWEEP_A55_DONE rc=$? $(el) s" >>$LOG
python -m benchmarks.clip_colours --clip runs/A/clip --data .data/pokemon --out $R/out/clip_colours_A.json > $R/out/cc.log 2>&1
python -m benchmarks.clip_colours --clip runs/A/judge --data .data/pokemon --out $R/out/clip_colours_A_judge.json >> $R/out/cc.log 2>&1
echo "FINISHED $(el) s" >>$LOG
