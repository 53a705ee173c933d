#!/bin/bash
# poll.sh SECONDS [MARKER]: wait up to SECONDS for MARKER in the drive log, then copy /tmp/r/out to $OUT
# ($OUT keeps at most 8 files: the logs, sweeps and showcases as one tarball, then the run folder's parts)
S=$1; M=${2:-FINISHED}; T=$(( $(date +%s) + S ))
while [ $(date +%s) -lt $T ]; do grep -q "$M" /tmp/r/out/drive.log 2>/dev/null && break; sleep 5; done
mkdir -p $OUT; cd /tmp/r/out 2>/dev/null && {
  tar czf $OUT/small.tgz --exclude=parts . 2>/dev/null
  # the run folder as it stands (grids, logs, metrics; no weights or caches), in case the machine goes first
  # split at 15 MB: one file over 16 MiB does not come back (session 54's run_partial.tgz did not, at 23-28 MB)
  [ -d parts ] || tar czf - -C $OLDPWD --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
    --exclude='*cache*' runs/A 2>/dev/null | split -b 15M - $OUT/run_partial.tgz.
  [ -d parts ] && cp parts/* $OUT/ 2>/dev/null
}
ls -la $OUT | tail -n +2
tail -n 4 /tmp/r/out/drive.log; tr '\r' '\n' < /tmp/r/out/A.log 2>/dev/null | grep -Ev '^\s*$' | tail -n 6 | cut -c1-200
