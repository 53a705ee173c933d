#!/bin/bash
# Session 56's drive: per_channel_min_snr_run/'s, copied to .devrun/ with its sweep line reading the seed-set count
# from /tmp/r/seed_sets (go.sh, this folder, wrote 1 there), and started by go.sh with FULL_FLAGS="" and
# PLAN="full pack g4_a4 traj_a4 g4_a1 traj_a1". The hold's device time ran out in the full step (README.md).
# full: the default command with FULL_FLAGS; pack: the run folder without weights or caches, tarred and split into
# 15-MB parts under out/parts at once (a machine taken back later loses nothing the parts hold);
# traj_aA: benchmarks.colour_trajectory at the generation default with guidance A above the window (8 seeds);
# gG_aA: the sampling sweep at guidance G in the window 0.28-7.5 and guidance A above it (1: the prompt alone),
# as many seed sets as /tmp/r/seed_sets says (2 when it is absent), its own JSON and showcase.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu,clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
KIND=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "KIND $KIND" >>$LOG
# sweeps: guidance 4 with the levels above the window on the prompt alone (1) or guided at 4 too, unless SWEEPS is set
# (e.g. SWEEPS="g4.5_a1 g5_a1").
SWEEPS=${SWEEPS:-g4_a1 g4_a4}
echo "FLAGS [$FULL_FLAGS] SWEEPS [$SWEEPS]" >>$LOG
PLAN=${PLAN/sweeps/$SWEEPS}
for STEP in $PLAN; do
  [ -e /tmp/r/no_$STEP ] && { echo "SKIP $STEP" >>$LOG; continue; }
  case $STEP in
    full)
      python train_all.py --data .data/pokemon --run runs/A $FULL_FLAGS > $R/out/A.log 2>&1
      echo "A_DONE rc=$? $(el) s" >>$LOG ;;
    pack)
      mkdir -p $R/out/parts
      tar czf - --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='*cache*' runs/A \
        | split -b 15M - $R/out/parts/runA.tgz.
      echo "PACKED $(ls $R/out/parts | wc -l) parts $(el) s" >>$LOG ;;
    traj_a*)
      A=${STEP#traj_a}
      python -m benchmarks.colour_trajectory --run runs/A --out $R/out/$STEP.json --plot $R/out/$STEP.png \
        --strip $R/out/${STEP}_strip.png --guidance-above $A > $R/out/$STEP.log 2>&1
      echo "TRAJ_${A}_DONE rc=$? $(el) s" >>$LOG ;;
    g*_a*)
      G=${STEP#g}; G=${G%_a*}; A=${STEP#*_a}
      python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_$STEP.json \
        --guidance $G --rescale 0.7 --interval 0.28,7.5 --guidance-above $A --steps 25 --seed-sets $(cat $R/seed_sets 2>/dev/null || echo ${SEED_SETS:-2}) \
        --showcase $R/out/showcase_$STEP > $R/out/sweep_$STEP.log 2>&1
      echo "SWEEP_${STEP}_DONE rc=$? $(el) s" >>$LOG ;;
  esac
done
echo "FINISHED $(el) s" >>$LOG
