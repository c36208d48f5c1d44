#!/usr/bin/env bash
# Every GPU path of the project, on one GPU, in under 8 minutes, with a summary table at the end:
#   1. train.py: torch.compile + bf16 + channels_last, memory loader, CUDA
#   2. train.py: the DataLoader, fp16 + GradScaler, grad clipping, EMA, mixup
#   3. eval.py and scripts/visualize.py on the checkpoint of 2 (eval must reproduce its final val top-1)
#   4. torchrun, one process: NCCL + DDP compiled (graph breaks counted), and NCCL + SyncBatchNorm
#   5. host syncs per training step in CUDA's sync debug mode (target: 0)
#   6. the channel max: adaptive_max_pool2d against amax, NCHW and NHWC (cbam/attention/pooling.py keeps the faster)
#   7. packing: 1, 2 and 4 small jobs sharing the GPU (hydra/launcher=joblib), total img/s
#   8. scripts/benchmark.py: ResNet-50 at 224 px and CIFAR ResNet-18 at 32 px, bf16 + channels_last,
#      eager and compiled, for none / se / channel_only / cbam
# Synthetic data (no dataset, no network), W&B offline. Logs and CSVs go to a work dir, archived as
# $OUT/gpu_check.tar.gz when OUT is set.
#
#   bash scripts/gpu_check.sh            # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run  # every command at toy size on the CPU, compile off: checks the commands
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# the project's venv (make install) where there is one: a bare `python` may lack the package
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export WANDB_MODE=offline WANDB_DIR="$WORK" WANDB_SILENT=true HYDRA_FULL_ERROR=1
SUMMARY="$WORK/summary.md"
printf '| check | status | result |\n|---|---|---|\n' > "$SUMMARY"

if [ $DRY = 1 ]; then
  DEVICE=cpu
  export TORCH_COMPILE_DISABLE=1  # compiling is what the GPU run measures; here only the commands are checked
  DATA=(data=synthetic data.image_size=16 data.source.train_size=64 data.source.val_size=32 data.batch_size=16
        data.eval_batch_size=32 data.num_workers=0 trainer.epochs=1 trainer.log_every_n_steps=1)
  BENCH=(steps=1 warmup=1 repeats=1 batch_size=4 loader=false)
  BIG=(data.image_size=32)  # ResNet-50's rows at toy size, not 224 px
  SWEEP_JOBS=(1 2)
else
  DEVICE=cuda
  DATA=(data=synthetic data.image_size=32 data.source.train_size=20000 data.source.val_size=5000
        data.batch_size=512 data.eval_batch_size=1024 trainer.epochs=2)
  BENCH=(steps=20 warmup=10 repeats=3 loader=false)
  BIG=()
  SWEEP_JOBS=(1 2 4)
fi

# run NAME COMMAND...: runs it with its output in $WORK/NAME.log; returns its status
run() {
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" > "$WORK/$name.log" 2>&1
  local status=$?
  [ $status = 0 ] || tail -n 20 "$WORK/$name.log" >&2
  return $status
}
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$SUMMARY"; }
status() { [ "$1" = 0 ] && echo ok || echo "FAILED ($1)"; }
summary_value() { "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@" 2>/dev/null || echo n/a; }

# 1. compile + bf16 + channels_last, memory loader
run train_compiled "$PY" train.py "${DATA[@]}" model=resnet18 attention=cbam trainer.device=$DEVICE \
  trainer.precision=bf16 trainer.channels_last=true trainer.compile=true hydra.run.dir="$WORK/compiled"
s=$?; row "train: compile + bf16 + channels_last, memory loader" "$(status $s)" \
  "$(summary_value "$WORK/compiled/summary.json" "f\"{s['train_img_per_s']:.0f} train img/s, val top-1 {s['final']['val/top1']:.2f}\"")"

# 2. DataLoader, fp16 + GradScaler + clipping + EMA + mixup
run train_loader "$PY" train.py "${DATA[@]}" model=resnet18 attention=cbam trainer.device=$DEVICE data.loader=torch \
  trainer.precision=fp16 trainer.channels_last=true trainer.compile=false trainer.grad_clip=1.0 trainer.ema_decay=0.999 \
  trainer.mixup.mixup_alpha=0.2 trainer.mixup.cutmix_alpha=1.0 hydra.run.dir="$WORK/loader"
s=$?; row "train: DataLoader, fp16 + GradScaler, clipping, EMA, mixup" "$(status $s)" \
  "$(summary_value "$WORK/loader/summary.json" "f\"{s['train_img_per_s']:.0f} train img/s, data wait {s.get('final', {}).get('train/data_wait_share', 'n/a')}\"")"

# 3. eval.py and visualize.py on that checkpoint
run eval "$PY" eval.py checkpoint="$WORK/loader/last.pt" device=$DEVICE output="$WORK/eval.json"
s=$?; row "eval.py reproduces the final val top-1" "$(status $s)" \
  "$("$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); s=json.load(open(sys.argv[2])); print(f\"eval {e['val/top1']:.2f} vs run {s['final']['val/top1']:.2f}\")" "$WORK/eval.json" "$WORK/loader/summary.json" 2>/dev/null || echo n/a)"
run visualize "$PY" scripts/visualize.py checkpoint="$WORK/loader/best.pt" device=$DEVICE output="$WORK/viz"
s=$?; row "scripts/visualize.py" "$(status $s)" "$(ls "$WORK/viz" 2>/dev/null | tr '\n' ' ')"

# 4. torchrun with one process: NCCL + DDP compiled (graph breaks counted), and NCCL + SyncBatchNorm
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py)
TORCH_LOGS=graph_breaks run ddp_compiled "${TORCHRUN[@]}" "${DATA[@]}" attention=cbam trainer.device=$DEVICE \
  trainer.precision=bf16 trainer.channels_last=true trainer.compile=true hydra.run.dir="$WORK/ddp"
s=$?; row "torchrun: DDP (NCCL on CUDA), compiled" "$(status $s)" \
  "$(grep -c 'Graph break' "$WORK/ddp_compiled.log") graph breaks; $(summary_value "$WORK/ddp/summary.json" "f\"world size {s['world_size']}\"")"
run ddp_sync_bn "${TORCHRUN[@]}" "${DATA[@]}" attention=cbam_official trainer.device=$DEVICE trainer.sync_bn=true \
  trainer.precision=bf16 trainer.channels_last=true trainer.compile=false hydra.run.dir="$WORK/ddp_sync_bn"
s=$?; row "torchrun: DDP + SyncBatchNorm" "$(status $s)" "$(grep -o 'rank 0 of [0-9]* on [^ ]* ([a-z:,]*)' "$WORK/ddp_sync_bn/train.log" | head -n 1)"

# 5. host syncs per training step (CUDA's sync debug mode; on the CPU it checks the command only)
run syncs "$PY" - "$DEVICE" "$WORK" "${DATA[@]}" <<'EOF'
import sys, warnings
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
import cbam  # noqa: F401  the config resolvers
from cbam.engine.run import RunContext, train

device, work, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
overrides = [o for o in overrides if not o.startswith(("data.source.train_size", "trainer.log_every", "trainer.epochs"))]
counts, batch = {}, None
for size in (4096, 8192) if device == "cuda" else (64, 128):
    with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
        # one epoch: the steps counted below are one epoch's
        cfg = compose("train", ["logger=none", *overrides, f"data.source.train_size={size}", f"trainer.device={device}",
                                "trainer.log_every_n_steps=100000", "trainer.compile=false", "attention=cbam",
                                "trainer.epochs=1"])
    batch = cfg.data.batch_size
    choices = {"attention": "cbam", "model": "resnet20", "data": "synthetic"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # a warning for each operation that waits for the device
        train(cfg, RunContext(run_dir=work / f"syncs-{size}", choices=choices))
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    counts[size] = sum("synchroniz" in str(w.message) for w in caught)
steps = (max(counts) - min(counts)) // batch
print(f"syncs by train size: {counts}; per step {(counts[max(counts)] - counts[min(counts)]) / steps:.3f}")
EOF
s=$?; row "host syncs per training step (target 0)" "$(status $s)" "$(grep -o 'per step .*' "$WORK/syncs.log")"

# 6. the channel max on this device: adaptive_max_pool2d vs amax, forward + backward
run channel_max "$PY" - "$DEVICE" <<'EOF'
import sys, time, torch
import torch.nn.functional as F
device = torch.device(sys.argv[1])
def timed(fn, x):
    for _ in range(3): fn(x).sum().backward()
    if device.type == "cuda": torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20): fn(x).sum().backward()
    if device.type == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - start) / 20 * 1e3
for layout in ("nchw", "nhwc"):
    x = torch.randn(256, 256, 56, 56, device=device, dtype=torch.bfloat16) if device.type == "cuda" else torch.randn(8, 16, 8, 8)
    x = x.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format).requires_grad_()
    a, m = timed(lambda t: F.adaptive_max_pool2d(t, 1), x), timed(lambda t: t.amax((2, 3), keepdim=True), x)
    print(f"{layout}: adaptive_max_pool2d {a:.3f} ms, amax {m:.3f} ms")
EOF
s=$?; row "channel max: adaptive_max_pool2d vs amax (fwd + bwd)" "$(status $s)" "$(tr '\n' ';' < "$WORK/channel_max.log")"

# 7. packing small jobs on one GPU
for n in "${SWEEP_JOBS[@]}"; do
  seeds=$(seq -s, 0 $((n - 1)))
  run "pack_$n" "$PY" train.py -m "${DATA[@]}" attention=cbam trainer.device=$DEVICE seed="$seeds" \
    hydra/launcher=joblib hydra.launcher.n_jobs="$n" hydra.sweep.dir="$WORK/pack_$n" logger=none
  s=$?; row "packing: $n job(s) on one GPU" "$(status $s)" \
    "$("$PY" -c "import json,glob,sys; r=[json.load(open(p))['train_img_per_s'] for p in glob.glob(sys.argv[1]+'/*/summary.json')]; print(f'{sum(r):.0f} img/s in all ({len(r)} jobs)')" "$WORK/pack_$n" 2>/dev/null || echo n/a)"
done

# 8. benchmark rows: every variant eager; the compiled rows for none and cbam only (each compile is minutes)
for spec in "resnet50 imagenet" "resnet18 cifar10"; do
  read -r model data <<< "$spec"
  extra=()
  [ "$model" = resnet50 ] && extra=("${BIG[@]}")
  for mode in "eager [none,se,channel_only,cbam] [bf16+cl]" "compiled [none,cbam] [bf16+cl+compile]"; do
    read -r kind variants modes <<< "$mode"
    name=bench_${model}_$kind
    run "$name" "$PY" scripts/benchmark.py model=$model data=$data "${extra[@]}" device=$DEVICE variants="$variants" \
      modes="$modes" "${BENCH[@]}" csv="$WORK/$name"
    s=$?; row "benchmark: $model ${extra[*]:-}, bf16 + channels_last, $kind" "$(status $s)" \
      "$(grep -E 'CBAM / none train ≥ 0.9 ' "$WORK/$name.log" | sed 's/^- //' | tr '|' '/')"
  done
done

echo
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='wandb' .
  echo "archived to $OUT/gpu_check.tar.gz" >&2
fi
! grep -q FAILED "$SUMMARY"
