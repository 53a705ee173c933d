#!/bin/bash
# Session 44's hold: the default with --unet.latent_normalisation=per_channel (EDM2's per-channel latent
# normalisation: each latent channel shifted and scaled to zero mean, unit std). Whichever GPU kind comes, its VAE,
# CLIP and judge repeat that kind's earlier runs bit for bit (H100: recolour_run, unet_seed1_run, keep_colour_run;
# H200: default_run7), so the pair differs in the latent normalisation alone.
# Then its sweep at the generation default (two seed sets), then the VAE read channel by channel.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): per-channel latent normalisation" >>$LOG
python train_all.py --data .data/pokemon --run runs/A --unet.latent_normalisation=per_channel > $R/out/A.log 2>&1
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
echo "FINISHED $(el) s" >>$LOG
