#!/bin/bash
# Session 42's hold: the default with --unet.keep_colour_sentence=true (every clause-dropped caption variant keeps
# the colour sentence). Whichever GPU kind comes, its VAE, CLIP and judge repeat that kind's earlier runs bit for
# bit (H100: recolour_run and unet_seed1_run, two UNet seeds of the plain default; H200: default_run7), so the
# pair differs in the UNet's caption variants alone.
# Then its sweep at the generation default (two seed sets). Nothing else: this session's hold came late (two
# failed starts), and its CLIP and judge are an earlier run's bit for bit (their colour probes are committed).
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
( while true; do echo "MEM $(date +%T) $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ')" >>$LOG; sleep 60; done ) &
echo "KIND $(nvidia-smi --query-gpu=name --format=csv,noheader): keep colour sentence" >>$LOG
python train_all.py --data .data/pokemon --run runs/A --unet.keep_colour_sentence=true > $R/out/A.log 2>&1
echo "A_DONE rc=$? $(el) s" >>$LOG
[ -z "$NO_SWEEP" ] && python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json \
  --guidance 4 --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 \
  --showcase $R/out/showcase_A > $R/out/sweep_A.log 2>&1
echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG
echo "FINISHED $(el) s" >>$LOG
