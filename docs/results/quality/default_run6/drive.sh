#!/bin/bash
# One device hold (planned in session 34): the plain default command, which has not run in full since the long
# captions' trimming (the last default run is default_run5), then its sweep at guidance 3 and 4 over two seed sets.
# Everything lands in /tmp/r/out. PYTHONPATH: the device's python -m did not put the working directory on the path.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
python train_all.py --data .data/pokemon --run runs/A > $R/out/A.log 2>&1
echo "A_DONE rc=$? $(el) s" >>$LOG
python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json --guidance 3 4 \
  --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
echo "FINISHED $(el) s" >>$LOG
