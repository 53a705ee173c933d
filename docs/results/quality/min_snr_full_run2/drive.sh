#!/bin/bash
# One device hold (session 33): the full default command with --unet.loss.min_snr_plus_one=true, then its sweep at
# guidance 3 and 4 over two seed sets. Everything lands in /tmp/r/out.
cd "$(dirname "$0")/.."
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
python train_all.py --data .data/pokemon --run runs/B --unet.loss.min_snr_plus_one=true > $R/out/B.log 2>&1
echo "B_DONE rc=$? $(el) s" >>$LOG
echo "B_JUDGE fingerprint=$(python -c "from engine.stage import file_fingerprint as f; print(f('runs/B/judge/model.safetensors'))" 2>&1)" >>$LOG
python -m benchmarks.sampling_sweep --run runs/B --data .data/pokemon --out $R/out/sweep_B.json --guidance 3 4 \
  --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 --showcase $R/out/showcase_B > $R/out/sweep_B.log 2>&1
echo "SWEEP_B_DONE rc=$? $(el) s" >>$LOG
echo "FINISHED $(el) s" >>$LOG
