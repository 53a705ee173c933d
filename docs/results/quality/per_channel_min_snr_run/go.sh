#!/bin/bash
# picks the session's plan by the card that came: an H100 runs the per-channel + Min-SNR-plus-one default
# (pairs with per_channel_run/); an H200 runs the plain default with its guidance sweep 4.5 / 5 / 4
cd "$(dirname "$0")/.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
  export FULL_FLAGS="--unet.latent_normalisation=per_channel --unet.loss.min_snr_plus_one=true" SWEEPS="g4_a1 g4_a4"
else
  export FULL_FLAGS="" SWEEPS="g4.5_a1 g5_a1 g4_a1"
fi
export PLAN="full pack traj_a1 sweeps"
setsid bash .devrun/drive.sh > /tmp/drive.out 2>&1 < /dev/null &
