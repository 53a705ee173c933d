#!/bin/bash
# Session 52's hold (one H100), run as:  PLAN="full sweep" FULL_FLAGS="--unet.lr=3e-4" setsid bash drive.sh &
# full: the default command with the UNet stage's peak learning rate 3e-4 (default 4e-4); on an H100 its VAE, CLIP
#       and judge train bit for bit as recolour_run/'s, and its UNet seed is recolour_run's, so the two pair.
# sweep: the generation default beside --guidance-above 2, two seed sets, with a showcase grid per setting.
# Everything lands in /tmp/r/out.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader)" >>$LOG
for STEP in $PLAN; do
  [ -e /tmp/r/no_$STEP ] && { echo "SKIP $STEP" >>$LOG; continue; }
  case $STEP in
    full)
      python train_all.py --data .data/pokemon --run runs/A $FULL_FLAGS > $R/out/A.log 2>&1
      echo "A_DONE rc=$? $(el) s" >>$LOG ;;
    sweep)
      python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
        --guidance 4 --rescale 0.7 --interval 0.28,7.5 --guidance-above ${ABOVE:-1 2} --steps 25 --seed-sets 2 \
        --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
      echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG ;;
  esac
done
echo "FINISHED $(el) s" >>$LOG
