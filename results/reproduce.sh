#!/usr/bin/env bash
# Reproduces everything in results/ from the shared CIFAR-10 copy (docs/benchmarks.md names the machines and times).
#   bash results/reproduce.sh            # from the repository root, in the project's virtual environment
# Each step is resumable: the classifier run continues from its last checkpoint if one exists. The recipe ablation is
# benchmarks/ablation.sh; airbench94's figures on this copy (results/recipe/airbench*.json) came from airbench's own
# code, which this repository does not hold (docs/recipe.md says how they were measured).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RUN=logs/full/e30-cutout8

# 1. The shipped recipe without its teacher, shipped before it (step 1f adds the teacher): configs/cifar10.yaml for 30
#    epochs with 8x8 cutout (configs/cifar10-30ep-cutout.yaml); skipped once it has run all its epochs. Nothing else
#    on the machine while it runs: it is timed.
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
# 1c. The default recipe at full size with row 15's change, every exit at full weight, and for longer: 14 epochs as
#     committed and with row 9's weight decay of 2e-3 (the proxy's winner confirmed, or not, at full size), 20 epochs
#     (the classifier shipped before this one) and 20 epochs with cutout: with the shipped run they separate what the
#     cutout and what the ten more epochs are worth; last, the shipped recipe with label smoothing 0.1, the default
#     with row 17's 2-pixel crops, the shipped recipe with them and with every exit at full weight, and the shipped
#     recipe for 40 epochs (docs/recipe.md, "The full-size runs").
LONG_RUNS=(logs/full/e8-exit-weights-1 logs/full/e14 logs/full/e14-wd2e-3 logs/full/e20 logs/full/e20-cutout8
           logs/full/e30-cutout8-ls01 logs/full/e8-crop2 logs/full/e30-cutout8-crop2 logs/full/e30-cutout8-exit-weights-1
           logs/full/e40-cutout8)
train "${LONG_RUNS[0]}" --config configs/cifar10.yaml --model.exit_weights '[1,1,1,1]'
train "${LONG_RUNS[1]}" --config configs/cifar10.yaml --trainer.max_epochs 14
train "${LONG_RUNS[2]}" --config configs/cifar10.yaml --trainer.max_epochs 14 --model.optimizer.weight_decay 0.002
train "${LONG_RUNS[3]}" --config configs/cifar10.yaml --trainer.max_epochs 20
train "${LONG_RUNS[4]}" --config configs/cifar10.yaml --trainer.max_epochs 20 --data.cutout 8
train "${LONG_RUNS[5]}" "${SHIPPED[@]}" --model.label_smoothing 0.1
train "${LONG_RUNS[6]}" --config configs/cifar10.yaml --data.crop_padding 2
train "${LONG_RUNS[7]}" "${SHIPPED[@]}" --data.crop_padding 2
train "${LONG_RUNS[8]}" "${SHIPPED[@]}" --model.exit_weights '[1,1,1,1]'
train "${LONG_RUNS[9]}" "${SHIPPED[@]}" --trainer.max_epochs 40
# 1d. The first classifier shipped, row 6's recipe for 20 epochs (batch 256 at lr 0.2, first conv at
#     random): the comparison in docs/recipe.md.
PREVIOUS_RUN=logs/reference/version_0
train "$PREVIOUS_RUN" --config configs/cifar10.yaml --trainer.max_epochs 20 --data.batch_size 256 \
  --model.optimizer.lr 0.2 --model.whiten_stem false
python benchmarks/exit_recipes.py "$DEFAULT_RUN" "${LONG_RUNS[@]}" "$RUN" --data "$DATA" --output results/recipe/full-size.json
# 1e. What each exit reaches when the network is trained for it alone (docs/recipe.md): step 1's recipe on the
#     network cut after stage k (--model.num_stages k) with exit k alone in the loss, and the whole network with the
#     final exit alone, against step 1's exits (measured on its fp16 export, shipped before), spliced into them for
#     the threshold rule.
ALONE_RUNS=(logs/alone/e30-exit1 logs/alone/e30-exit2 logs/alone/e30-exit3 logs/alone/e30-exit4)
train "${ALONE_RUNS[0]}" "${SHIPPED[@]}" --model.num_stages 1 --model.exit_weights '[1]'
train "${ALONE_RUNS[1]}" "${SHIPPED[@]}" --model.num_stages 2 --model.exit_weights '[0,1]'
train "${ALONE_RUNS[2]}" "${SHIPPED[@]}" --model.num_stages 3 --model.exit_weights '[0,0,1]'
train "${ALONE_RUNS[3]}" "${SHIPPED[@]}" --model.exit_weights '[0,0,0,1]'
python benchmarks/exits_alone.py "$RUN/checkpoints/last.ckpt" "${ALONE_RUNS[@]/%//checkpoints/last.ckpt}" \
  --data "$DATA" --output results/recipe/exits-alone.json
# 1f. The shipped classifier: distillation from a stronger network (docs/recipe.md). The residual teacher of
#     configs/teacher.yaml, trained on the same training split; what it knows beside step 1's final exit;
#     step 1's recipe with every exit distilled from it (configs/distill.yaml: weight 0.5, temperature 4; the
#     teacher's predictions cached once in logs/teacher_cache/), against step 1's run (measured on its fp16 export).
TEACHER_RUN=logs/teacher/version_0
train "$TEACHER_RUN" "${SHIPPED[@]}" --config configs/teacher.yaml
SHIPPED+=(--config configs/distill.yaml)
DISTILLED_RUN=logs/distill/full-teacher-a05
train "$DISTILLED_RUN" "${SHIPPED[@]}"
python benchmarks/teacher.py "$TEACHER_RUN/checkpoints/last.ckpt" --data "$DATA" \
  --reference "$RUN/checkpoints/last.ckpt" --output results/recipe/teacher.json
python benchmarks/exit_recipes.py "$RUN" "$DISTILLED_RUN" --data "$DATA" --saved 50 40 60 51 \
  --output results/recipe/distillation.json

# 2. Ship it in fp16; the export writes its training curves beside it (classifier-curves.csv) for the report's plot.
eecnn-export "$DISTILLED_RUN/checkpoints/last.ckpt" results/classifier.ckpt --half
cp "$DISTILLED_RUN/config.yaml" results/classifier-config.yaml

# 3. One agent per seed along the trade-off against the threshold baselines, on the shipped classifier.
/usr/bin/time -f "sweep: %e s wall" \
  eecnn-sweep --classifier-ckpt results/classifier.ckpt --fixed-weights 0.1 0.3 --output results/sweep \
    -- --data.data_dir "$DATA"
# 3b. Ablations of the agent's state and experience (docs/agent.md).
eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/agent/sweep-class-aware \
  -- --data.data_dir "$DATA" --model.class_aware true
eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/agent/sweep-one-view \
  -- --data.data_dir "$DATA" --data.val_views 1

# 4. Ship the seed with the best validation reward (chosen on the validation split only), at the config's
#    target_flops_saved; its best checkpoint is tested through the engine, in fp32 on any CPU.
best_agent() {  # a sweep folder, then a field (checkpoint or seed) of its seed with the best validation reward
  python -c "import json, sys; runs = json.load(open(sys.argv[1] + '/sweep.json'))['runs']
print(max((r for r in runs if 'seed' in r), key=lambda r: r['val_reward'])[sys.argv[2]])" "$1" "${2:-checkpoint}"
}
agent=$(best_agent results/sweep)
eecnn-export "$agent" results/agent.ckpt
cp "$(dirname "$(dirname "$agent")")/config.yaml" results/agent-config.yaml
rm -rf results/report  # the report's folder holds one run's events and plots, not every rerun's
eecnn test --ckpt_path results/agent.ckpt --data.data_dir "$DATA" --trainer.precision 32-true \
  --trainer.logger.init_args.save_dir results --trainer.logger.init_args.name "" \
  --trainer.logger.init_args.version report
rm -f results/report/events.out.tfevents.* results/report/hparams.yaml  # the logger's files; report.json holds it all

# 5. Benchmarks, each in one process on this machine.
python benchmarks/train_throughput.py --data "$DATA" --output results/benchmarks/train-throughput.json
python benchmarks/train_throughput.py --data "$DATA" --output /tmp/without-compile.json
python benchmarks/train_throughput.py --data "$DATA" --compile --output /tmp/with-compile.json
python -c 'import json, sys; json.dump({"without_compile": json.load(open(sys.argv[1])),
  "with_compile": json.load(open(sys.argv[2]))}, open(sys.argv[3], "w"), indent=2)' \
  /tmp/without-compile.json /tmp/with-compile.json results/benchmarks/compile.json
python benchmarks/loader_throughput.py --data "$DATA" --output results/benchmarks/loader-throughput.json
python benchmarks/inference_throughput.py --agent results/agent.ckpt --data "$DATA" \
  --output results/benchmarks/inference-throughput.json
python benchmarks/onnx_latency.py --agent results/agent.ckpt --data "$DATA" \
  --output results/benchmarks/onnx-latency.json
python benchmarks/agent_training.py --classifier-ckpt results/classifier.ckpt --data "$DATA" \
  --output results/benchmarks/agent-training.json
python benchmarks/time_to_accuracy.py "$RUN" "$PREVIOUS_RUN" "$DEFAULT_RUN" "${LONG_RUNS[@]}" \
  --output results/recipe/time-to-accuracy.json
# 6. Exits that reuse the earlier exits' answers (Zero Time Waste's ensemble), fitted after the fact: docs/recipe.md.
python benchmarks/combined_exits.py results/classifier.ckpt --data "$DATA" --output results/recipe/combined-exits.json
# 7. The shipped agent and the threshold rule on corrupted copies of the test split (docs/agent.md, "Under
#    distribution shift").
#    And the agent that sees each validation image once (step 3b's), whose early exits go wrong more often there.
python benchmarks/shift.py results/agent.ckpt --data "$DATA" --output results/agent/shift.json
python benchmarks/shift.py "$(best_agent results/agent/sweep-one-view)" --data "$DATA" \
  --output results/agent/shift-one-view.json
# 8. Time instead of FLOPs as the agent's cost (docs/agent.md, "Costs in seconds"): a latency profile at one image,
#    an agent trained against it (the shipped agent's seed), and the two agents compared at equal time saved.
eecnn-latency results/classifier.ckpt results/agent/latency-batch1.json --batch-size 1 --images 2000
eecnn fit --config configs/agent.yaml --data.classifier_ckpt results/classifier.ckpt --data.data_dir "$DATA" \
  --data.costs results/agent/latency-batch1.json --seed_everything "$(best_agent results/sweep seed)" --trainer.logger.name latency-agent
latency_agent=$(ls -t logs/latency-agent/version_*/checkpoints/epoch*.ckpt | head -1)
python benchmarks/latency_costs.py results/agent.ckpt "$latency_agent" --profile results/agent/latency-batch1.json \
  --data "$DATA" --output results/agent/latency-costs.json
