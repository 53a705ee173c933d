#!/bin/bash
# session 56: the plain default on whichever card comes, then its sweep with the steps above the window guided at 4
# (g4_a4), its colour trajectory at --guidance-above 4, then the g4_a1 sweep and trajectory for the pairing
cd "$(dirname "$0")/.."
export FULL_FLAGS="" SWEEPS="g4_a4 g4_a1"
export PLAN="full pack g4_a4 traj_a4 g4_a1 traj_a1"; mkdir -p /tmp/r; echo 1 > /tmp/r/seed_sets
setsid bash .devrun/drive.sh > /tmp/drive.out 2>&1 < /dev/null &
