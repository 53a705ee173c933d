#!/bin/bash
# Session 45's hold: the default with --vae.train.seed=1 (another VAE draw; CLIP, judge and UNet seeds as the default).
# On an H100 its CLIP and judge repeat recolour_run's bit for bit, so the pair differs in the VAE alone.
# Then the new VAE read channel by channel, then the sweep at the generation default (two seed sets), then the same
# with the guidance interval reaching sigma 20 (one seed set) if the budget allows.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): default with --vae.train.seed=1" >>$LOG
python train_all.py --data .data/pokemon --run runs/A --vae.train.seed=1 > $R/out/A.log 2>&1
echo "A_DONE rc=$? $(el) s" >>$LOG
python -m benchmarks.latent_channels --vae runs/A/vae --data .data/pokemon --out $R/out/latent_channels.json \
  > $R/out/latent_channels.log 2>&1
echo "CHANNELS_DONE rc=$? $(el) s" >>$LOG
if [ ! -e $R/no_sweep ]; then
  python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
    --guidance 4 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 \
    --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
  echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
fi
if [ ! -e $R/no_sweep2 ]; then
  python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A_wide.json \
    --guidance 4 --rescale 0.7 --interval 0.28,20 --steps 25 --seed-sets 1 > $R/out/sweep_A_wide.log 2>&1
  echo "SWEEP_WIDE_DONE rc=$? $(el) s" >>$LOG
fi
echo "FINISHED $(el) s" >>$LOG
