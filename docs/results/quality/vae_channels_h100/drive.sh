#!/bin/bash
# Session 43's hold (late: too little device time was left for a full run): the VAE stage alone, seed 0 (the
# kind's earlier runs' VAE bit for bit) and seed 1, each then read by benchmarks.latent_channels. Session 46 ran it
# again, SEEDS=0, when benchmarks.latent_channels had come to decode the training latents too.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): vae seeds 0 and 1" >>$LOG
for S in ${SEEDS:-0}; do
  python -m vae.train --data .data/pokemon --out runs/V$S/vae --seed=$S > $R/out/V$S.log 2>&1
  echo "V${S}_DONE rc=$? $(el) s" >>$LOG
  python -m benchmarks.latent_channels --vae runs/V$S/vae --data .data/pokemon --out $R/out/latent_channels_seed$S.json \
    >> $R/out/V$S.log 2>&1
  echo "V${S}_CHANNELS rc=$? $(el) s" >>$LOG
done
echo "FINISHED $(el) s" >>$LOG
