#!/usr/bin/env bash
# The recipe ablation of docs/recipe.md: each row a cheap proxy run (width 0.5, 4 epochs) of configs/cifar10.yaml with
# one change against an earlier row, then the table of what each run's exits are worth, one round at a time into
# results/recipe/ablation.json.
#   bash benchmarks/ablation.sh            # from the repository root, in the project's virtual environment
# An arm whose folder holds a last.ckpt is skipped; delete the folder to run it again.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
PROXY=(--model.width 0.5 --trainer.max_epochs 4) TAG=w05-e4  # round 9 sets a longer proxy of its own
# Round 1 (rows 0-5): the recipe as it stood then, with label smoothing, self-distillation, batch 256 at lr 0.2 and a
# randomly initialised first conv; each arm's own flags come after these and win.
ROUND1=(--model.label_smoothing 0.1 --model.distillation_weight 0.5 --model.distillation_temperature 3.0
        --data.batch_size 256 --model.optimizer.lr 0.2 --model.whiten_stem false)

arm() {
  local name=$1; shift
  local run=logs/ablation/$TAG-$name
  [[ -f $run/checkpoints/last.ckpt ]] && return
  eecnn fit --config configs/cifar10.yaml "${PROXY[@]}" --data.data_dir "$DATA" "$@" \
    --trainer.logger.init_args.name ablation --trainer.logger.init_args.version "$TAG-$name" \
    --trainer.enable_progress_bar false
}

# 0. The recipe before: batch 256, OneCycle to lr 0.1, MLP exits, equal exit weights summing to one. It ran on the
#    code of commit d3f703d, which also decayed BatchNorm parameters and biases; this code never does.
arm baseline "${ROUND1[@]}" --data.batch_size 256 --model.optimizer.lr 0.1 --model.lr_schedule onecycle --model.warmup_fraction 0.15 \
  --model.head mlp --model.exit_weights '[0.25,0.25,0.25,0.25]'
# 1. Page's optimisation: batch 512, linear warm-up and decay to zero peaking at lr 0.4 (lr x weight decay 2e-4 a step,
#    4x before), no decay on norms and biases, and validation on an exponential moving average of the weights.
arm fast-optim "${ROUND1[@]}" --data.batch_size 512 --model.optimizer.lr 0.4 --model.head mlp --model.exit_weights '[0.25,0.25,0.25,0.25]' \
  --trainer.callbacks+=EMAWeightAveraging --trainer.callbacks.decay 0.99
#    1b. the same run's raw weights, to tell the average from the rest
python - <<'PY'
import shutil, torch
from pathlib import Path
src, dst = Path("logs/ablation/w05-e4-fast-optim"), Path("logs/ablation/w05-e4-fast-optim-raw-weights")
(dst / "checkpoints").mkdir(parents=True, exist_ok=True)
for events in src.glob("events.out.tfevents.*"):
    shutil.copy(events, dst)
checkpoint = torch.load(src / "checkpoints" / "last.ckpt", weights_only=True)
torch.save(checkpoint | {"state_dict": checkpoint["current_model_state"]}, dst / "checkpoints" / "last.ckpt")
PY
# 2. Pooled-grid exits and the final exit at weight 1 (the early ones 0.3 / 0.5 / 0.7), no weight average:
#    at batch 512 and lr 0.4 the loss, now 2.5 times larger, diverged; batch 256 and lr 0.2 became the default.
arm pool-final1-b512 "${ROUND1[@]}" --data.batch_size 512 --model.optimizer.lr 0.4
arm pool-final1-b256 "${ROUND1[@]}"
# 3. One change each against that default: the seed's MLP exits, no self-distillation, no label smoothing.
arm mlp-final1 "${ROUND1[@]}" --model.head mlp
arm no-distillation "${ROUND1[@]}" --model.distillation_weight 0
arm no-smoothing "${ROUND1[@]}" --model.label_smoothing 0

python benchmarks/exit_recipes.py \
  logs/ablation/w05-e4-{baseline,fast-optim,fast-optim-raw-weights,pool-final1-b256,mlp-final1,no-distillation,no-smoothing} \
  --data "$DATA" --output results/recipe/ablation.json --round 1

# Round 2 (issue 10, rows 6-8), from the recipe round 1 left (no smoothing, no distillation), each arm changing the one
# before: 6. that recipe, batch 256 at lr 0.2; 7. the first conv initialised as a whitening filter bank of 3x3 patches;
# 8. batch 64 at lr 0.05 (the same lr per image), which this CPU also runs 12 % faster: configs/cifar10.yaml as it is.
# The three ran side by side with one thread each (OMP_NUM_THREADS=1), so each took about 1.5 times as long as alone.
arm default --data.batch_size 256 --model.optimizer.lr 0.2 --model.whiten_stem false
arm whiten --data.batch_size 256 --model.optimizer.lr 0.2
arm whiten-b64
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{default,whiten,whiten-b64} --data "$DATA" \
  --output results/recipe/ablation.json --round 2

# Round 3 (rows 8b-12), one change each against row 8 (configs/cifar10.yaml), run two at a time side by side, one
# thread each: 8b. row 8 again at another seed, to read the table's noise; 9. four times the weight decay, at seeds
# 0 and 1; 10. MSDNet's conv exits; 11. twice the weight decay; 12. batch 32 at lr 0.025.
# They ran on zen4 (docs/benchmarks.md), with native bf16, where eecnn picks bf16-mixed; rows 0-8 ran in fp32 on zen2.
arm seed1 --seed_everything 1
arm wd2e-3 --model.optimizer.weight_decay 0.002
arm wd2e-3-seed1 --seed_everything 1 --model.optimizer.weight_decay 0.002
arm conv-head --model.head conv
arm wd1e-3 --model.optimizer.weight_decay 0.001
arm b32 --data.batch_size 32 --model.optimizer.lr 0.025
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{seed1,wd2e-3,wd2e-3-seed1,conv-head,wd1e-3,b32} --data "$DATA" \
  --output results/recipe/ablation.json --round 3

# Round 4 (rows 13-14), one change each against row 8, two at a time side by side, one thread each, on zen4:
# 13. the final exit alone in the loss (what training the early exits costs the trunk; the early heads stay
#     untrained, so only exit 4 and the threshold's absence mean anything); 14. twice the peak learning rate.
arm final-only --model.exit_weights '[0,0,0,1]'
arm lr0.1 --model.optimizer.lr 0.1
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{final-only,lr0.1} --data "$DATA" \
  --output results/recipe/ablation.json --round 4

# Round 5 (rows 15-16), one change each against row 8, two at a time side by side, one thread each, on zen3 in
# fp32 like rows 0-8: 15. every exit at full weight in the loss; 16. a weight average over the last quarter of the
# steps only (decay 0.998 from step 2100 of 2812), validated, tested and checkpointed.
arm exit-weights-1 --model.exit_weights '[1,1,1,1]'
arm ema-late --trainer.callbacks+=EMAWeightAveraging --trainer.callbacks.decay 0.998 \
  --trainer.callbacks.update_starting_at_step 2100
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{exit-weights-1,ema-late} --data "$DATA" \
  --output results/recipe/ablation.json --round 5

# Round 6 (rows 17-18), one change each against row 8, two at a time side by side, one thread each, on zen5a
# with native bf16: 17. random crops padded by 2 pixels instead of 4; 18. no dropout in the exit heads.
arm crop2 --data.crop_padding 2
arm head-dropout-0 --model.head_dropout '[0,0,0,0]'
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{crop2,head-dropout-0} --data "$DATA" \
  --output results/recipe/ablation.json --round 6

# Round 7 (rows 19-20), one change each against row 8, two at a time side by side, one thread each, on zen5b
# with native bf16: 19. airbench's alternating flips; 20. BatchNorm without scales in the stages (shifts only).
arm flip-alternate --data.horizontal_flip alternate
arm bn-no-scale --model.batchnorm_scale false
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{flip-alternate,bn-no-scale} --data "$DATA" \
  --output results/recipe/ablation.json --round 7

# Round 8 (rows 21 and 21b), against rows 8 and 8b (the same seeds), two at a time side by side, one thread each, on
# zen5d with native bf16: airbench's lookahead (early_exit.Lookahead: every 5 steps the network is reset to
# a running average of itself whose decay grows to 0.77 as progress cubed), at seed 0 and at seed 1.
arm lookahead --trainer.callbacks+=early_exit.Lookahead
arm lookahead-seed1 --seed_everything 1 --trainer.callbacks+=early_exit.Lookahead
python benchmarks/exit_recipes.py logs/ablation/w05-e4-{lookahead,lookahead-seed1} --data "$DATA" \
  --output results/recipe/ablation.json --round 8

# Round 9 (rows 22 and 23), a longer proxy that regularises like the shipped recipe: width 0.5 for 15 epochs with
# 8x8 cutout (configs/cifar10-30ep-cutout.yaml, its epochs halved), two at a time side by side, one thread each
# (OMP_NUM_THREADS=1), on zen5e with native bf16: 22. that proxy as it is; 23. self-distillation from the final
# exit (weight 0.5, temperature 3), which the 4-epoch proxy judged in round 1 when no exit was yet worth copying.
PROXY=(--config configs/cifar10-30ep-cutout.yaml --model.width 0.5 --trainer.max_epochs 15) TAG=w05-e15
arm base
arm distill --model.distillation_weight 0.5 --model.distillation_temperature 3
python benchmarks/exit_recipes.py logs/ablation/w05-e15-{base,distill} --data "$DATA" \
  --output results/recipe/ablation.json --round 9

# Round 10 (rows 24 and 25), distillation from a stronger network into every exit, on round 9's proxy, two at a time
# side by side, one thread each, on zen5g with native bf16 (a full-size run joined them after 6 minutes): 24. that
# proxy again, for the threshold rule at 40 and 60 % too; 25. every exit distilled from the residual teacher of
# configs/teacher.yaml (results/reproduce.sh step 1f trains it, on the same training split) at weight 0.5 and
# temperature 4.
TEACHER=logs/teacher/version_0/checkpoints/last.ckpt
PROXY=(--config configs/cifar10-30ep-cutout.yaml --model.width 0.5 --trainer.max_epochs 15) TAG=w05-e15
arm base
arm teacher-a05 --data.teacher_ckpts "[$TEACHER]" --model.distillation_weight 0.5 --model.distillation_temperature 4
python benchmarks/exit_recipes.py logs/ablation/w05-e15-{base,teacher-a05} --data "$DATA" --saved 50 40 60 \
  --output results/recipe/ablation.json --round 10
