#!/bin/bash
# One device hold (session 31, run as `GEN=1 VARIANTS=B setsid bash drive.sh` on an H100; from the checkout's root):
# the generation benchmark alone on the GPU (GEN), the recipe judge trained again and its real-image values, then a
# half-length base (A) and UNet levers (B: min_snr_plus_one; C: a smaller UNet, not run) on A's VAE, CLIP and judge,
# side by side; each swept over two seed sets. Everything lands in /tmp/r/out.
cd "$(dirname "$0")/.."  # it ran as .devrun/drive.sh, so this is the checkout's root
R=/tmp/r; mkdir -p $R/out; LOG=$R/out/drive.log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --find-links .whl tqdm >>$LOG 2>&1
if [ -n "$GEN" ]; then  # the generation bar of issue 17, alone on the GPU, before anything trains
  python -m benchmarks.untrained_run --out $R/u > $R/out/gen.log 2>&1 && \
  python -m benchmarks.generate_speed --run $R/u --out $R/out/generate_speed.json >> $R/out/gen.log 2>&1
  echo "GEN rc=$? $(el) s" >>$LOG
fi
( while true; do echo "MEM $(date +%T) $(free -m | awk '/Mem/{print "host_used_mb="$3" avail_mb="$7}') $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits | tr -d ' ' | sed 's/,/MiB,/')%" >>$LOG; sleep 60; done ) &
( python -m clip.train --data .data/pokemon --out $R/judge --preset full --seed=1 --tokenizer_normalize=false > $R/out/judge.log 2>&1
  echo "JUDGE rc=$? $(el) s fingerprint=$(python -c "from engine.stage import file_fingerprint as f; print(f('$R/judge/model.safetensors'))")" >>$LOG
  python -m benchmarks.real_reference --data .data/pokemon --judge $R/judge --out $R/out/real_reference.json > $R/out/real_reference.log 2>&1
  echo "REAL_REFERENCE rc=$? $(el) s" >>$LOG ) &
H="--unet.lowres_epochs=18 --unet.epochs=3"
( python train_all.py --data .data/pokemon --run runs/A $H --vae.epochs=3 --vae.disc_start_step=700 > $R/out/A.log 2>&1
  echo "A_DONE rc=$? $(el) s" >>$LOG
  python -m benchmarks.sampling_sweep --run runs/A --data .data/pokemon --out $R/out/sweep_A.json --guidance 4 \
    --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 --first-order-at-guidance-edges off on > $R/out/sweep_A.log 2>&1
  echo "SWEEP_A_DONE rc=$? $(el) s" >>$LOG ) &
until [ -f runs/A/judge/model.safetensors ] && [ -f runs/A/clip/model.safetensors ] && [ -f runs/A/vae/model.safetensors ]; do sleep 5; done
sleep 5; echo "A_STAGES_READY $(el) s" >>$LOG
echo "A_JUDGE fingerprint=$(python -c "from engine.stage import file_fingerprint as f; print(f('runs/A/judge/model.safetensors'))" 2>&1)" >>$LOG
declare -A LEVER=([B]="--unet.loss.min_snr_plus_one=true" [C]="--unet.model.base_channels=96 --unet.model.head_dim=48")
for name in ${VARIANTS:-B C}; do
  ( python train_all.py --data .data/pokemon --run runs/$name --reuse vae=runs/A/vae --reuse clip=runs/A/clip \
      --judge runs/A/judge $H ${LEVER[$name]} > $R/out/$name.log 2>&1
    echo "${name}_DONE rc=$? $(el) s" >>$LOG
    python -m benchmarks.sampling_sweep --run runs/$name --data .data/pokemon --out $R/out/sweep_$name.json --guidance 4 \
      --rescale 0.7 --interval 0.28,7.5 --steps 25 --seed-sets 2 > $R/out/sweep_$name.log 2>&1
    echo "SWEEP_${name}_DONE rc=$? $(el) s" >>$LOG ) &
done
sleep 30
while pgrep -f "train_all.py|sampling_sweep" >/dev/null; do sleep 5; done
echo "FINISHED $(el) s" >>$LOG
