#!/bin/bash
# The next hold (planned in session 35), by the GPU kind the hold is given:
# - an H200: the plain default command (is the sixth run's drop, on an H100, the captions' trimming or the GPU
#   kind? the fifth run's range is the H200 reference);
# - an H100: the default with --unet.balance_twins=true (silhouette twins drawn at 1 / group size), whose VAE, CLIP
#   and judge then repeat the sixth run's bit for bit, so its figures compare with default_run6 directly.
# Then its sweep: the generation default at trailing and karras timestep spacing (session 37), two seed sets.
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
  echo "KIND H100: balance_twins" >>$LOG
  python train_all.py --data .data/pokemon --run runs/A --unet.balance_twins=true > $R/out/A.log 2>&1
fi
echo "A_DONE rc=$? $(el) s" >>$LOG
# the sweep (skip with NO_SWEEP=1 when the budget is short): the default sampling at both timestep spacings
[ -z "$NO_SWEEP" ] && python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
  --guidance 4 --rescale 0.7 --interval 0.28,7.5 --steps 25 --timestep-spacing trailing karras --seed-sets 2 \
  --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
echo "FINISHED $(el) s" >>$LOG
