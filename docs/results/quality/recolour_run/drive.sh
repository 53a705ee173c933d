#!/bin/bash
# The next hold (planned in session 38), by the GPU kind the hold is given:
# - an H200: the plain default command (balance_twins on since session 38): does the twins' effect hold on the
#   GPU kind of the five earlier default runs (their judge, e9c69396b33f0b62)?
# - an H100: the default with --unet.recolour.copies=2 (full length; only screened at half length), whose VAE, CLIP
#   and judge then repeat balance_twins_run's bit for bit, so it pairs with balance_twins_run directly.
# Then its sweep: the generation default, two seed sets. Then (PROBE_CL=1) the compiled channels-last step.
# Everything lands in /tmp/r/out.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  echo "KIND H200: default" >>$LOG
  python train_all.py --data .data/pokemon --run runs/A > $R/out/A.log 2>&1
else
  echo "KIND H100: recolour" >>$LOG
  python train_all.py --data .data/pokemon --run runs/A --unet.recolour.copies=2 > $R/out/A.log 2>&1
fi
echo "A_DONE rc=$? $(el) s" >>$LOG
# the sweep (skip with NO_SWEEP=1 when the budget is short): the generation default, two seed sets
[ -z "$NO_SWEEP" ] && python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
  --guidance 4 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 \
  --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
[ -n "$PROBE_CL" ] && timeout 420 python -m benchmarks.step_breakdown --set compile=true --set channels_last=true \
  --steps 5 --warmup 3 --top 30 --out $R/out/step_breakdown_h100_compiled_channels_last_512.json > $R/out/cl.log 2>&1
echo "FINISHED $(el) s" >>$LOG
