"""What the trainers of finished stages still hold when the next stage's trainer is built, under the old reference
cycle (recreated here as a self-reference): memory freed by a forced collection at that moment."""
import gc, os, sys, time, weakref
sys.path.insert(0, os.getcwd())
import torch
import engine.trainer as T
live = weakref.WeakSet()
orig = T.Trainer.__init__
CYCLE = os.environ.get("CYCLE", "1") == "1"
def mem():
    if torch.cuda.is_available():
        torch.cuda.synchronize(); return torch.cuda.memory_allocated() / 2**30
    return 0.0
def init(self, *a, **k):
    out = str(a[2] if len(a) > 2 else k.get("out_dir"))
    before, n = mem(), len(live)
    names = sorted(t.out_dir.name for t in live)
    gc.collect()
    after = mem()
    print(f"\n[LINGER] {time.strftime('%H:%M:%S')} before the trainer of {out}: {n} earlier trainers alive {names}, "
          f"{len(live)} after a collection; allocated {before:.2f} GiB, {after:.2f} after: {before - after:.2f} GiB "
          f"held by them", flush=True)
    if out.rstrip("/").endswith("unet") and os.environ.get("STOP_AT_UNET") == "1":
        os._exit(0)
    orig(self, *a, **k)
    if CYCLE:
        self._old_cycle = self  # what the lambda over the trainer in its LambdaLR did
    live.add(self)
T.Trainer.__init__ = init
import train_all
train_all.main(sys.argv[1:])
