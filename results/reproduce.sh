#!/usr/bin/env bash
# Reproduces everything in results/ from the shared CIFAR-10 copy, on the machine the README names.
#   bash results/reproduce.sh            # from the repository root, in the project's virtual environment
# Each step is resumable: the classifier run continues from its last checkpoint if one exists.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RUN=logs/full/e30-cutout8

# 1. The shipped classifier: configs/cifar10.yaml for 30 epochs with 8x8 cutout (configs/cifar10-30ep-cutout.yaml);
#    skipped once it has run all its epochs. Nothing else on the machine while it runs: it is timed (59 min alone on
#    a 2-core Xeon with AMX).
SHIPPED=(--config configs/cifar10.yaml --config configs/cifar10-30ep-cutout.yaml)
finished() {  # run folder, then its config flags: does the run's last checkpoint hold every epoch they ask for?
  local run=$1; shift
  [[ -f $run/checkpoints/last.ckpt ]] && eecnn fit "$@" --print_config | python -c 'import sys, torch, yaml
epochs = yaml.safe_load(sys.stdin)["trainer"]["max_epochs"]
sys.exit(torch.load(sys.argv[1], map_location="cpu", weights_only=True)["epoch"] + 1 < epochs)' \
    "$run/checkpoints/last.ckpt"
}
train() {  # run folder, then its config flags; resumes from the run's last checkpoint
  local run=$1; shift
  finished "$run" "$@" && return
  local resume=()
  [[ -f $run/checkpoints/last.ckpt ]] && resume=(--ckpt_path "$run/checkpoints/last.ckpt")
  /usr/bin/time -f "classifier training ($run): %e s wall" \
    eecnn fit "$@" --data.data_dir "$DATA" --trainer.logger.init_args.name "$(basename "$(dirname "$run")")" \
      --trainer.logger.init_args.version "$(basename "$run")" "${resume[@]}"
}
train "$RUN" "${SHIPPED[@]}"
# 1b. The default recipe, configs/cifar10.yaml as committed (8 epochs, sized to an hour here): its test figures
#     and its time to accuracy beside the shipped run's. Nothing else on the machine while it runs: it is timed.
DEFAULT_RUN=logs/default-recipe/version_0
train "$DEFAULT_RUN" --config configs/cifar10.yaml
# 1c. The default recipe at full size with row 15's change, every exit at full weight (94 min alone on a Zen 3 in
#     fp32), and for longer: 14 epochs as committed and with row 9's weight decay of 2e-3 (the proxy's winner
#     confirmed, or not, at full size; 47 and 54 min alone on a Zen 4 EPYC with native bf16), 20 epochs (the
#     classifier shipped before this one, 69 min there) and 20 epochs with cutout (71 min there): with the shipped
#     run they separate what the cutout and what the ten more epochs are worth; last, the shipped recipe with label
#     smoothing 0.1 (58 min alone on a 2-core Zen 5 EPYC with native bf16), the default with row 17's 2-pixel
#     crops (19 min there), the shipped recipe with them (66 min alone on a slower Zen 5 instance) and with every
#     exit at full weight (81 min there, its first epochs sharing the CPU with a CI run), and the shipped recipe
#     for 40 epochs (93 min alone on a Zen 5 instance at 392 images/s).
LONG_RUNS=(logs/full/e8-exit-weights-1 logs/full/e14 logs/full/e14-wd2e-3 logs/full/e20 logs/full/e20-cutout8
           logs/full/e30-cutout8-ls01 logs/full/e8-crop2 logs/full/e30-cutout8-crop2 logs/full/e30-cutout8-exit-weights-1
           logs/full/e40-cutout8)
train "${LONG_RUNS[0]}" --config configs/cifar10.yaml --model.exit_weights '[1,1,1,1]'
train "${LONG_RUNS[1]}" --config configs/cifar10.yaml --trainer.max_epochs 14
train "${LONG_RUNS[2]}" --config configs/cifar10.yaml --trainer.max_epochs 14 --model.optimizer.weight_decay 0.002
train "${LONG_RUNS[3]}" --config configs/cifar10.yaml --config configs/cifar10-20ep.yaml
train "${LONG_RUNS[4]}" --config configs/cifar10.yaml --config configs/cifar10-20ep.yaml --data.cutout 8
train "${LONG_RUNS[5]}" "${SHIPPED[@]}" --model.label_smoothing 0.1
train "${LONG_RUNS[6]}" --config configs/cifar10.yaml --data.crop_padding 2
train "${LONG_RUNS[7]}" "${SHIPPED[@]}" --data.crop_padding 2
train "${LONG_RUNS[8]}" "${SHIPPED[@]}" --model.exit_weights '[1,1,1,1]'
train "${LONG_RUNS[9]}" "${SHIPPED[@]}" --trainer.max_epochs 40
# 1d. The classifier shipped two releases ago, row 6's recipe for 20 epochs (batch 256 at lr 0.2, first conv at
#     random; 312.6 min over five sessions on the Zen 2): the README's comparison.
PREVIOUS_RUN=logs/reference/version_0
train "$PREVIOUS_RUN" --config configs/cifar10.yaml --config configs/cifar10-20ep.yaml --data.batch_size 256 \
  --model.optimizer.lr 0.2 --model.whiten_stem false
python benchmarks/exit_recipes.py "$DEFAULT_RUN" "${LONG_RUNS[@]}" "$RUN" --data "$DATA" --output results/default-recipe.json
# 1e. What each exit reaches when the network is trained for it alone (README, "What each exit reaches alone"): the
#     shipped recipe on the network cut after stage k (--model.num_stages k) with exit k alone in the loss, and the
#     whole network with the final exit alone (23, 35, 42 and 61 min on a Zen 5 EPYC at 409 images/s), against the
#     shipped classifier's exits (its fp16 weights, results/classifier.ckpt), spliced into them for the threshold rule.
ALONE_RUNS=(logs/alone/e30-exit1 logs/alone/e30-exit2 logs/alone/e30-exit3 logs/alone/e30-exit4)
train "${ALONE_RUNS[0]}" "${SHIPPED[@]}" --model.num_stages 1 --model.exit_weights '[1]'
train "${ALONE_RUNS[1]}" "${SHIPPED[@]}" --model.num_stages 2 --model.exit_weights '[0,1]'
train "${ALONE_RUNS[2]}" "${SHIPPED[@]}" --model.num_stages 3 --model.exit_weights '[0,0,1]'
train "${ALONE_RUNS[3]}" "${SHIPPED[@]}" --model.exit_weights '[0,0,0,1]'
python benchmarks/exits_alone.py results/classifier.ckpt "${ALONE_RUNS[@]/%//checkpoints/last.ckpt}" \
  --data "$DATA" --output results/exits-alone.json

# 2. Ship it in fp16, with its TensorBoard events for the training-curve plot.
eecnn-export "$RUN/checkpoints/last.ckpt" results/classifier.ckpt --half
rm -f results/events.out.tfevents.*
cp "$RUN"/events.out.tfevents.* "$RUN/config.yaml" results/
mv results/config.yaml results/classifier-config.yaml

# 3. One agent per seed along the trade-off against the threshold baselines, on the shipped classifier.
/usr/bin/time -f "sweep: %e s wall" \
  eecnn-sweep --classifier-ckpt results/classifier.ckpt --fixed-weights 0.1 0.3 --output results/sweep \
    -- --data.data_dir "$DATA"
# 3b. Ablations of the agent's state and experience (README, "What the agent adds").
eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/sweep-class-aware \
  -- --data.data_dir "$DATA" --model.class_aware true
eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/sweep-val-views \
  -- --data.data_dir "$DATA" --model.val_views 8

# 4. Ship the seed with the best validation reward (chosen on the validation split only), at the config's
#    target_flops_saved; its best checkpoint is tested through the engine, in fp32 on any CPU.
agent=$(python -c "import json; runs = json.load(open('results/sweep/sweep.json'))['runs']
print(max((r for r in runs if 'seed' in r), key=lambda r: r['val_reward'])['checkpoint'])")
eecnn-export "$agent" results/agent.ckpt
cp "$(dirname "$(dirname "$agent")")/config.yaml" results/agent-config.yaml
rm -rf results/report  # the report's folder holds one run's events and plots, not every rerun's
eecnn test --ckpt_path results/agent.ckpt --data.data_dir "$DATA" --trainer.precision 32-true \
  --trainer.logger.init_args.save_dir results --trainer.logger.init_args.name "" \
  --trainer.logger.init_args.version report

# 5. Benchmarks, each in one process on this machine.
python benchmarks/train_throughput.py --data "$DATA" --output results/train_throughput.json
python benchmarks/inference_throughput.py --agent results/agent.ckpt --data "$DATA" \
  --output results/inference_throughput.json
python benchmarks/agent_training.py --classifier-ckpt results/classifier.ckpt --data "$DATA" \
  --output results/agent_training.json
python benchmarks/time_to_accuracy.py "$RUN" "$PREVIOUS_RUN" "$DEFAULT_RUN" "${LONG_RUNS[@]}" \
  --output results/time_to_accuracy.json
# 6. Exits that reuse the earlier exits' answers (Zero Time Waste's ensemble), fitted after the fact: README.
python benchmarks/combined_exits.py results/classifier.ckpt --data "$DATA" --output results/combined_exits.json
# 7. What a 94 %-class fast recipe gets on this copy of the data: airbench94's own code, ported to the CPU, for its
#    9.9 epochs (12 min alone on a Zen 5 EPYC with native bf16) and for 30 (README, "How far this copy goes").
#    It needs airbench's repository (internet) at the commit the script names.
AIRBENCH=${AIRBENCH:-logs/cifar10-airbench}
[[ -d $AIRBENCH ]] || git clone -q https://github.com/KellerJordan/cifar10-airbench "$AIRBENCH"
git -C "$AIRBENCH" checkout -q f1c599c4af24aca803e3e65a6a7e52a502e09d0e
python benchmarks/airbench_reference.py "$AIRBENCH/legacy/airbench94.py" --data "$DATA" --output results/airbench.json
python benchmarks/airbench_reference.py "$AIRBENCH/legacy/airbench94.py" --data "$DATA" --epochs 30 \
  --output results/airbench-30ep.json
