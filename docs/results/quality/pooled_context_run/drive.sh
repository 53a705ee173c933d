#!/bin/bash
# Session 47's hold: the default with --unet.model.pooled_context=true (pooled text added to the time embedding).
# On an H100 its VAE, CLIP and judge repeat recolour_run's bit for bit; on an H200 default_run7's.
# Then the VAE read channel by channel, then the sweep at the generation default (two seed sets), then guidance 3 and 5.
# As it ran (one H100): failed starts had taken 391 of the session's 1,800 device seconds, so /tmp/r/no_sweep2 and
# then /tmp/r/no_sweep were made while the run trained; the two-set sweep ran after it in a call of its own, the
# same command (its JSON holds it); the guidance 3 / 5 sweep did not run.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): default with --unet.model.pooled_context=true" >>$LOG
python train_all.py --data .data/pokemon --run runs/A --unet.model.pooled_context=true > $R/out/A.log 2>&1
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
  python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A_g35.json \
    --guidance 3 5 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 > $R/out/sweep_A_g35.log 2>&1
  echo "SWEEP_G35_DONE rc=$? $(el) s" >>$LOG
fi
echo "FINISHED $(el) s" >>$LOG
